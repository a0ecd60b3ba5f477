"""docs/results.md is built from the runners' files (benchmarks/results_page.py), never by hand."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results_page", ROOT / "benchmarks" / "results_page.py")
results_page = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("results_page", results_page)   # its dataclass looks its module up
_spec.loader.exec_module(results_page)


def _fixture(tmp_path: Path) -> Path:
  results = tmp_path / "benchmarks" / "results"
  results.mkdir(parents=True)
  machine = {"platform": "Linux-x86_64", "cpu_count": 2, "devices": ["cpu:0"], "python": "3.11.7", "jax": "0.10.2",
             "date": "2026-01-02T03:04:05"}
  (results / "round_throughput_tiny.json").write_text(json.dumps(
      {"command": "python benchmarks/round_throughput.py", "date": "2026-01-03", "args": {"clients": "4,16"},
       "rows": [], "machine": machine}))
  (results / "round_throughput_tiny.md").write_text("# round_throughput_tiny\n\n| K |\n|---|\n| 4 |\n")
  # the older runners' form: no top-level command or date, the date inside the machine
  (results / "aggregation_time.json").write_text(json.dumps({"args": {"d": 1024}, "machine": machine}))
  (results / "aggregation_time.md").write_text("# aggregation_time\n\n| agg |\n|---|\n| fedavg |\n")
  (results / "aggregation_time.notes.md").write_text("Command (from the README): `python benchmarks/aggregation_time.py`\n")
  (results / "main_job_tweets.md").write_text("# Main job\n\nno command anywhere\n")
  compare = results / "b77"
  compare.mkdir()
  (compare / "results.json").write_text(json.dumps({"command": "python launch/compare.py --out b77", "rows": []}))
  (compare / "results.md").write_text("| run |\n|---|\n| hetlora_alpha0.5 |\n")
  return results


def test_sections_carry_command_machine_and_date(tmp_path):
  results = _fixture(tmp_path)
  page = tmp_path / "docs" / "results.md"
  text, missing = results_page.build(results, page)
  assert missing == ["main_job_tweets"]
  sections = {s.split("\n", 1)[0]: s for s in text.split("\n### ")[1:]}
  tiny = sections["round_throughput_tiny"]
  assert "- Command: `python benchmarks/round_throughput.py` (from the result's JSON)" in tiny
  assert "- Date: 2026-01-03 (recorded by the runner)" in tiny
  assert "- Machine: 2 CPU cores; devices cpu:0; Linux-x86_64; python 3.11.7, jax 0.10.2" in tiny
  assert "- Setting: args: clients=4,16" in tiny and "| 4 |" in tiny
  assert "](../benchmarks/results/round_throughput_tiny.json)" in tiny
  agg = sections["aggregation_time"]
  assert "`python benchmarks/aggregation_time.py` (from the notes beside it)" in agg
  assert "- Date: 2026-01-02 (recorded by the runner)" in agg
  assert "`python launch/compare.py --out b77`" in sections["b77/results"]
  # order: main jobs, then throughput; then what no group claims
  assert text.index("## Main jobs") < text.index("## Throughput and memory") < text.index("## Other results")
  # no date recorded, not in git: the file's modification time, and the page says so
  assert "modification time" in sections["Main job"]


def test_a_result_without_a_command_is_reported(tmp_path):
  results = _fixture(tmp_path)
  page = tmp_path / "docs" / "results.md"
  assert results_page.main(["--results", str(results), "--page", str(page)]) == 0
  text = page.read_text()
  warnings = text.split("## Results without a recorded command", 1)[1].split("\n## ", 1)[0]
  assert "- `main_job_tweets`" in warnings and "aggregation_time" not in warnings
  assert "- Command: **not recorded**" in text
  assert results_page.main(["--results", str(results), "--page", str(page), "--check"]) == 1
  (results / "main_job_tweets.notes.md").write_text("Command: `python launch/train.py --config c.py`\n")
  assert results_page.main(["--results", str(results), "--page", str(page), "--check"]) == 1   # stale page
  assert results_page.main(["--results", str(results), "--page", str(page)]) == 0
  assert results_page.main(["--results", str(results), "--page", str(page), "--check"]) == 0
  assert "Results without a recorded command" not in page.read_text()


def test_rebuilding_twice_gives_the_same_page(tmp_path):
  results = _fixture(tmp_path)
  page = tmp_path / "docs" / "results.md"
  results_page.refresh(page, results, quiet=True)
  first = page.read_bytes()
  results_page.refresh(page, results, quiet=True)
  assert page.read_bytes() == first


def test_committed_page_is_what_the_results_build(tmp_path):
  if shutil.which("git") is None or subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
    pytest.skip("dates of results without a recorded date come from git")
  text, _ = results_page.build(results_page.RESULTS, results_page.PAGE)
  assert results_page.PAGE.read_text() == text, (
      "docs/results.md is out of date with benchmarks/results/: run python benchmarks/results_page.py "
      "(do not edit docs/results.md by hand)")
