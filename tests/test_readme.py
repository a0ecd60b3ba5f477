"""The README's library examples run as written, and CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _section(title: str) -> str:
  text = README.read_text()
  start = text.index(f"## {title}\n")
  end = text.find("\n## ", start + 1)
  return text[start:end if end > 0 else None]


def test_readme_library_examples_run(capsys):
  blocks = re.findall(r"```python\n(.*?)```", _section("The library in a few lines"), re.S)
  assert len(blocks) >= 2
  for code in blocks:
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
  assert "[" in capsys.readouterr().out
  assert namespace["new_global"]["q"]["a"].shape == (8, 4)


def test_ci_runs_the_readme_test_command():
  commands = re.findall(r"^bash launch/setup\.sh && (.*pytest.*)$", _section("Two commands"), re.M)
  assert len(commands) == 1
  ci = (ROOT / ".ci" / "run").read_text()
  assert commands[0] in ci
  full = re.findall(r"`(HETLORA_FULL_TESTS=1 [^`]*pytest[^`]*)`", _section("Two commands"))
  assert len(full) == 1 and full[0] in ci   # the heavy checks the README command skips run in CI
