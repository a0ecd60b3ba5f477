"""The README's library example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs(capsys):
  code = re.search(r"## The library in a few lines\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
  exec(compile(code, str(README), "exec"), {})
  assert "[" in capsys.readouterr().out
