"""Builds ``docs/results.md`` from what the runners wrote under ``benchmarks/results/``.

    python benchmarks/results_page.py           # rewrites docs/results.md
    python benchmarks/results_page.py --check   # exits 1 if the page is stale or a result has no command

Every result is a Markdown file the runner wrote (``<name>.md``, usually beside
``<name>.json``; a ``launch/compare.py`` output directory holds ``results.md``
and ``results.json``). The page puts each one, as written, under a heading
that says its command, setting, machine and date:

* command: the result's JSON's ``command`` (or ``command_<what>``) field, else a
  ``Command...: `...``` line or a line that is just a backticked ``python``
  command in the result's Markdown, else the same in its notes, else a
  ``bash`` block of its notes. A result without one is listed under
  "Results without a recorded command" at the top of the page, never guessed.
* setting: the JSON's ``setting`` / ``budget``, else its ``args``, else its
  ``config`` and ``overrides``, else its ``setup``.
* machine: the JSON's ``machine`` field (or ``meta.machine``).
* date: the JSON's ``date`` (or ``machine.date`` / ``meta.date``), recorded by
  the runner; else the date of the commit that last changed the Markdown
  (``git log -1 --format=%cs``); else the file's modification time. The page
  says which.

Notes written by hand (what a number means, its caveats) live beside the
result as ``<name>.notes.md`` (for a compare directory also its
``README.md``) and follow the result's table on the page.

Runners call :func:`refresh` after writing (``benchmarks/common.write``,
``launch/compare.py``). The module uses the standard library only, so it
imports in a few milliseconds and nothing in ``hetlora`` depends on it. The
output depends only on the result files (sorted, no build time), so running
it twice gives the same file; ``tests/test_results_page.py`` checks that the
committed page is what this builds.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"

# Sections of the page in order; a result goes to the first group with a matching pattern, and
# within a group results follow the patterns' order, then their names. Anything else goes last.
GROUPS: list[tuple[str, list[str]]] = [
    ("Main jobs", ["main_job_tweets", "main_job_*"]),
    ("Method comparisons", ["banking77_cpu15/results", "banking77_cpu15/seeds*", "banking77_cpu15/*",
                            "banking77_cpu/methods", "banking77_cpu/*"]),
    ("Image classification", ["mnist_vit_cpu/results", "mnist_vit*", "vit_parity*"]),
    ("LLM", ["natinst*", "commonsense*", "decoder_round", "decoder_round_*"]),
    ("Throughput and memory", ["round_throughput_tiny", "round_throughput_*", "peer_comparison",
                               "peer_comparison_*", "aggregation_time*", "flexlora_svd*", "screening_overhead*"]),
    ("Deployment round trips", ["flower_round", "flower_round_*", "peft_roundtrip*", "llamacpp_roundtrip",
                                "llamacpp_roundtrip_*"]),
    ("GPU suite", ["gpu_suite*"]),
]
OTHER = "Other results"

_COMMAND_LINE = re.compile(r"^Command[^:\n]*:\s*`([^`\n]+)`", re.M)
_BARE_COMMAND = re.compile(r"^`((?:\.venv/bin/)?python3? [^`\n]+)`\s*$", re.M)
_BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


@dataclass
class Result:
  name: str                     # path under results/ without ".md", e.g. "banking77_cpu/methods"
  title: str
  body: str                     # the Markdown as written, its title line taken off
  notes: str
  commands: list[tuple[str, str]] = field(default_factory=list)   # (label, command)
  command_source: str = ""
  setting: str = ""
  machine: str = ""
  date: str = ""
  date_source: str = ""
  files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- reading


def _load_json(path: Path) -> dict[str, Any]:
  if not path.exists():
    return {}
  try:
    data = json.loads(path.read_text())
  except ValueError:
    return {}
  return data if isinstance(data, dict) else {}


def _as_command(value: Any) -> str:
  return shlex.join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def _json_commands(data: dict[str, Any]) -> list[tuple[str, str]]:
  out = []
  for key in sorted(data):
    if key == "command" or key.startswith("command_"):
      out.append((key[len("command_"):].replace("_", " ") if key != "command" else "", _as_command(data[key])))
  return out


def _text_commands(text: str, bash_blocks: bool) -> list[tuple[str, str]]:
  found = _COMMAND_LINE.findall(text) + _BARE_COMMAND.findall(text)
  if not found and bash_blocks:
    for block in _BASH_BLOCK.findall(text):
      for line in block.replace("\\\n", " ").splitlines():
        if re.match(r"\s*(\.venv/bin/)?python3? ", line):
          found.append(" ".join(line.split()))
  seen = []
  for c in found:
    if c not in seen:
      seen.append(c)
  return [("", c) for c in seen]


def _setting(data: dict[str, Any]) -> str:
  for key in ("setting", "budget"):
    if isinstance(data.get(key), str):
      return data[key]
  if isinstance(data.get("args"), dict):
    return "args: " + ", ".join(f"{k}={v}" for k, v in data["args"].items())
  if "config" in data:
    return f"config {data['config']}" + (f", overrides {data['overrides']}" if data.get("overrides") else "")
  if isinstance(data.get("setup"), dict):
    return ", ".join(f"{k}={v}" for k, v in data["setup"].items())
  return ""


def _machine(data: dict[str, Any]) -> str:
  m = data.get("machine", (data.get("meta") or {}).get("machine"))
  if isinstance(m, str):
    return m
  if isinstance(m, dict):
    parts = []
    if m.get("cpu_count"):
      parts.append(f"{m['cpu_count']} CPU cores" + (f" ({m['cpu']})" if m.get("cpu") else ""))
    if m.get("devices"):
      parts.append("devices " + ", ".join(m["devices"]))
    if m.get("platform"):
      parts.append(m["platform"])
    versions = [f"{k} {m[k]}" for k in ("python", "jax", "flax") if m.get(k)]
    if versions:
      parts.append(", ".join(versions))
    if m.get("xla_flags"):
      parts.append(f"XLA_FLAGS={m['xla_flags']}")
    return "; ".join(parts)
  return ""


def _recorded_date(data: dict[str, Any]) -> str:
  for holder in (data, data.get("machine"), data.get("meta")):
    if isinstance(holder, dict) and isinstance(holder.get("date"), str) and holder["date"][:4].isdigit():
      return holder["date"][:10]
  return ""


def _git_date(path: Path) -> str:
  try:
    out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=path.parent,
                         capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return ""
  return out.stdout.strip() if out.returncode == 0 else ""


def _strip_title(text: str) -> tuple[str, str]:
  lines = text.splitlines()
  while lines and not lines[0].strip():
    lines.pop(0)
  title = ""
  if lines and lines[0].startswith("# "):
    title = lines.pop(0)[2:].strip()
  return title, _demote("\n".join(lines).strip())


def _demote(text: str) -> str:
  """Headings inside a result sit below the page's ``###``: its topmost heading becomes ``####``."""
  lines, fenced, levels = text.splitlines(), False, []
  for line in lines:
    if line.startswith("```"):
      fenced = not fenced
    elif not fenced and re.match(r"#{1,6} ", line):
      levels.append(len(line) - len(line.lstrip("#")))
  shift = 4 - min(levels) if levels else 0
  out, fenced = [], False
  for line in lines:
    if line.startswith("```"):
      fenced = not fenced
    elif not fenced and shift > 0 and re.match(r"#{1,6} ", line):
      line = "#" * min(len(line) - len(line.lstrip("#")) + shift, 6) + " " + line.lstrip("#").lstrip()
    out.append(line)
  return "\n".join(out)


def collect(results: Path = RESULTS) -> list[Result]:
  """Every result under ``results`` (``*.md`` except notes and directory READMEs), with its provenance."""
  out = []
  for md in sorted(results.rglob("*.md")):
    if md.name.endswith(".notes.md") or md.name == "README.md":
      continue
    name = md.relative_to(results).with_suffix("").as_posix()
    data = _load_json(md.with_suffix(".json"))
    notes_files = [md.with_name(md.stem + ".notes.md")]
    if md.parent != results and md.stem == "results":
      notes_files.append(md.parent / "README.md")
    notes_files = [p for p in notes_files if p.exists()]
    titled = [_strip_title(p.read_text()) for p in notes_files]
    notes = "\n\n".join(_demote(p.read_text().strip()) if p.name != "README.md" else t[1]
                          for p, t in zip(notes_files, titled))
    title, body = _strip_title(md.read_text())
    title = title or next((t[0] for p, t in zip(notes_files, titled) if p.name == "README.md" and t[0]), "")
    r = Result(name=name, title=title or name, body=body, notes=notes)
    r.files = [p.relative_to(results).as_posix() for p in sorted(md.parent.glob(md.stem + ".*"))
               if not p.name.endswith(".notes.md")]
    for source, commands in (("the result's JSON", _json_commands(data)),
                             ("the result's Markdown", _text_commands(md.read_text(), bash_blocks=False)),
                             ("the notes beside it", _text_commands(notes, bash_blocks=True))):
      if commands:
        r.commands, r.command_source = commands, source
        break
    r.setting = _setting(data)
    r.machine = _machine(data)
    r.date = _recorded_date(data)
    if r.date:
      r.date_source = data.get("date_source") or "recorded by the runner"
    else:
      r.date = _git_date(md)
      if r.date:
        r.date_source = "date of the last commit that changed the file"
      else:
        r.date = datetime.datetime.fromtimestamp(md.stat().st_mtime, datetime.timezone.utc).date().isoformat()
        r.date_source = "the file's modification time (not committed, no date recorded)"
    out.append(r)
  return out


def _group_key(name: str) -> tuple[int, int, str]:
  for g, (_, patterns) in enumerate(GROUPS):
    for p, pattern in enumerate(patterns):
      if fnmatch.fnmatchcase(name, pattern):
        return g, p, name
  return len(GROUPS), 0, name


def missing_commands(results: list[Result]) -> list[str]:
  return [r.name for r in results if not r.commands]


# ----------------------------------------------------------------------------------------- writing


def render(results: list[Result], link_prefix: str = "../benchmarks/results/") -> str:
  results = sorted(results, key=lambda r: _group_key(r.name))
  lines = [
      "# Results",
      "",
      "Every table here is a file a runner wrote under `benchmarks/results/` (the scripts in "
      "`benchmarks/`, `launch/compare.py`), put here as written by `benchmarks/results_page.py`; "
      "the runners rebuild this page after writing. Do not edit it by hand: edit or re-run the "
      "result, or its `<name>.notes.md`, then `python benchmarks/results_page.py`.",
      "",
      "Each section names its command, setting, machine and date. Most numbers were measured on the "
      "2-core x86-64 CPU this project is developed on (no GPU), JAX 0.10.2, float32; that machine was "
      "shared with other jobs during some runs, and the benchmark JSON files record the load average.",
      "",
  ]
  missing = missing_commands(results)
  if missing:
    lines += ["## Results without a recorded command", "",
              "No command in the runner's JSON, its Markdown or its notes; re-run them with a current runner "
              "(which records its command line) or add the command to `<name>.notes.md`:", ""]
    lines += [f"- `{name}`" for name in missing] + [""]
  groups = [title for title, _ in GROUPS] + [OTHER]
  current = None
  for r in results:
    group = groups[_group_key(r.name)[0]]
    if group != current:
      lines += [f"## {group}", ""]
      current = group
    lines += [f"### {r.title}", ""]
    links = ", ".join(f"[{f}]({link_prefix}{f})" for f in r.files)
    lines += [f"- Result: {links}"]
    if r.commands:
      for label, command in r.commands:
        lines += [f"- Command{f' ({label})' if label else ''}: `{command}` (from {r.command_source})"]
    else:
      lines += ["- Command: **not recorded**"]
    if r.setting:
      lines += [f"- Setting: {r.setting}"]
    lines += [f"- Machine: {r.machine or 'not recorded in the JSON (see the text below)'}"]
    lines += [f"- Date: {r.date} ({r.date_source})", ""]
    if r.body:
      lines += [r.body, ""]
    if r.notes:
      lines += [r.notes, ""]
  return "\n".join(lines).rstrip() + "\n"


def build(results_dir: Path = RESULTS, page: Path = PAGE) -> tuple[str, list[str]]:
  """The page's text (links relative to ``page``) and the results without a command."""
  results = collect(results_dir)
  prefix = Path(os.path.relpath(results_dir.resolve(), page.resolve().parent)).as_posix() + "/"
  return render(results, prefix), missing_commands(results)


def refresh(page: Path = PAGE, results_dir: Path = RESULTS, quiet: bool = False) -> list[str]:
  """Rewrites ``page`` from ``results_dir`` (if it changed); returns the results without a command."""
  text, missing = build(results_dir, page)
  page.parent.mkdir(parents=True, exist_ok=True)
  if not page.exists() or page.read_text() != text:
    page.write_text(text)
    if not quiet:
      print(f"rewrote {page}")
  if missing and not quiet:
    print(f"results without a recorded command: {', '.join(missing)}", file=sys.stderr)
  return missing


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 if the page is out of date or a result has no command")
  parser.add_argument("--results", type=Path, default=RESULTS)
  parser.add_argument("--page", type=Path, default=PAGE)
  args = parser.parse_args(argv)
  if args.check:
    text, missing = build(args.results, args.page)
    stale = not args.page.exists() or args.page.read_text() != text
    if stale:
      print(f"{args.page} is out of date: run python benchmarks/results_page.py", file=sys.stderr)
    if missing:
      print(f"results without a recorded command: {', '.join(missing)}", file=sys.stderr)
    return 1 if stale or missing else 0
  refresh(args.page, args.results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
