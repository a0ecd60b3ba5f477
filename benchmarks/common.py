"""Shared pieces of the benchmarks: timing, memory, machine facts, Markdown + JSON output.

Benchmarks are scripts, never timed unit tests. Each writes
``benchmarks/results/<name>.json`` and ``<name>.md`` and prints the table;
the JSON records the command line and the date (UTC), and ``write`` then
rebuilds ``docs/results.md`` (``benchmarks/results_page.py``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared"     # the shared data and peer folder beside the checkout
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402  (after the path set-up so `hetlora` imports from the checkout)
from hetlora import compare  # noqa: E402


def block(tree: Any) -> Any:
  """Waits for every array of ``tree``."""
  return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Wall seconds of ``repeats`` calls of ``fn`` (results blocked on)."""
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn())
    out.append(time.perf_counter() - t0)
  return out


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def peak_rss_mib() -> float:
  """Peak resident set size of this process so far (``ru_maxrss``), MiB."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loadavg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
  """Facts that make a number reproducible: CPU, devices, versions, load average."""
  import flax
  import optax
  return {
      "platform": platform.platform(),
      "cpu": compare.cpu_model(),
      "cpu_count": os.cpu_count(),
      "devices": [str(d) for d in jax.devices()],
      "python": platform.python_version(),
      "jax": jax.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
  }


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  """A Markdown table of ``rows`` restricted to ``columns`` (floats to 4 significant digits)."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def command_line(argv: Sequence[str] | None = None) -> str | None:
  """This process's command as a reader would type it in the repository root
  (``python benchmarks/<script>.py <args>``); None when not run as a script."""
  argv = list(sys.argv if argv is None else argv)
  if not argv or not argv[0] or argv[0] == "-c" or not Path(argv[0]).is_file():
    return None
  script = Path(argv[0]).resolve()
  try:
    script = script.relative_to(ROOT)
  except ValueError:
    pass
  return shlex.join(["python", script.as_posix(), *argv[1:]])


def utc_date() -> str:
  return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def refresh_results_page() -> None:
  """Rebuilds ``docs/results.md`` from everything under ``benchmarks/results/``."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("results_page", Path(__file__).with_name("results_page.py"))
  module = sys.modules.setdefault("results_page", importlib.util.module_from_spec(spec))
  spec.loader.exec_module(module)
  module.refresh()


def write(name: str, payload: dict[str, Any], table: str, notes: str = "") -> Path:
  """Writes ``results/<name>.json`` and ``results/<name>.md``, prints the table, rebuilds docs/results.md.

  The JSON gets ``command`` (this process's command line, unless ``payload`` names one) and
  ``date`` (UTC) besides the load average and the machine.
  """
  RESULTS.mkdir(parents=True, exist_ok=True)
  command = payload.get("command") or command_line()
  payload = {**({"command": command} if command else {}), "date": utc_date(), **payload,
             "loadavg_at_end": loadavg(), "machine": machine()}
  path = RESULTS / f"{name}.json"
  path.write_text(json.dumps(payload, indent=1) + "\n")
  md = f"# {name}\n\n{notes}\n\n{table}\n\nload average at end: {payload['loadavg_at_end']}\n"
  (RESULTS / f"{name}.md").write_text(md)
  print(table)
  print(f"load average {payload['loadavg_at_end']}; wrote {path}")
  refresh_results_page()
  return path
