"""Runs (or resumes) one federated experiment.

  python launch/train.py --config configs/tweets_hetlora.py --workdir workdirs/tweets
  python launch/train.py --config configs/banking77.py:method=zero_pad,alpha=0.1 \
      --workdir workdirs/b77 --config.server.rounds=50

Flags: ``--config`` (a config file, optionally ``:arg``), ``--workdir``
(metrics, checkpoints, plots; an existing one is resumed), and any
``--config.<field>=<value>`` override.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from hetlora import parallel, trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  parallel.maybe_initialize_distributed()
  summary = trainer.run(_CONFIG.value, _WORKDIR.value)
  keys = ("method", "rounds", "final_test_accuracy", "best_test_accuracy", "final_test_loss",
          *(f"final_{k}" for k in trainer.GENERATION_SUMMARY), "train_seconds")
  print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=2))
  if math.isnan(summary["final_test_accuracy"]):
    print(f"final test loss: {summary['final_test_loss']:.4f}")
  else:
    print(f"final test accuracy: {summary['final_test_accuracy']:.4f}")
  if "generation_by_round" in summary:
    print("test ROUGE-L by round (seen tasks, unseen tasks): " + ", ".join(
        f"{r}: {m['test_rougeL']:.3f}" + (f" / {m['test_rougeL_unseen']:.3f}" if "test_rougeL_unseen" in m else "")
        for r, m in summary["generation_by_round"]))


if __name__ == "__main__":
  app.run(main)
