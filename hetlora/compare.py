"""Running several methods on the same federation and tabulating the results.

``compare(configs, out_dir)`` runs :func:`hetlora.trainer.run` for each named
config (same seed, clients, ranks and budget, by construction of the
configs), then writes ``results.md`` (a Markdown table), ``results.json``
and ``accuracy.png`` (test accuracy vs round, one line per run) to
``out_dir``. Runs already finished in ``out_dir/<name>`` are resumed, not
redone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import ml_collections
import numpy as np

from hetlora import trainer


def accuracy_at(accuracy_by_round: list[tuple[int, float]], fraction: float, rounds: int) -> float:
  """Test accuracy at the last evaluation no later than ``fraction * rounds`` (NaN if none)."""
  limit = fraction * rounds
  seen = [acc for r, acc in accuracy_by_round if r <= limit]
  return seen[-1] if seen else float("nan")


def row(name: str, summary: Mapping[str, Any]) -> dict[str, Any]:
  rounds = summary["rounds"]
  return {
      "run": name,
      "method": summary["method"],
      "final_accuracy": summary["final_test_accuracy"],
      "accuracy_at_25pct": accuracy_at(summary["accuracy_by_round"], 0.25, rounds),
      "accuracy_at_50pct": accuracy_at(summary["accuracy_by_round"], 0.5, rounds),
      "comm_params_per_round": summary["total_comm_params"] / max(rounds, 1),
      "train_seconds": summary["train_seconds"],
      "rounds": rounds,
  }


def markdown(rows: list[dict[str, Any]]) -> str:
  head = ("| run | method | final acc | acc @25% | acc @50% | uploaded params / round | train time (s) |\n"
          "|---|---|---|---|---|---|---|\n")
  body = "".join(
      f"| {r['run']} | {r['method']} | {r['final_accuracy']:.4f} | {r['accuracy_at_25pct']:.4f} | "
      f"{r['accuracy_at_50pct']:.4f} | {r['comm_params_per_round']:,.0f} | {r['train_seconds']:.0f} |\n"
      for r in rows)
  return head + body


def compare(configs: Mapping[str, ml_collections.ConfigDict], out_dir: str | Path,
            progress: bool = True) -> list[dict[str, Any]]:
  """Runs every config in ``out_dir/<name>``; writes and returns the table rows."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  summaries = {name: trainer.run(cfg, out_dir / name, progress=progress) for name, cfg in configs.items()}
  rows = [row(name, s) for name, s in summaries.items()]
  (out_dir / "results.json").write_text(json.dumps({"rows": rows, "summaries": summaries}, indent=2))
  (out_dir / "results.md").write_text(markdown(rows))
  _plot(summaries, out_dir / "accuracy.png")
  return rows


def _plot(summaries: Mapping[str, Mapping[str, Any]], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for name, s in summaries.items():
    if s["accuracy_by_round"]:
      r, acc = np.asarray(s["accuracy_by_round"]).T
      ax.plot(r, acc, marker=".", label=name)
  ax.set(xlabel="round", ylabel="test accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
