"""The Flower ``ServerApp``: a hetlora run whose clients are Flower SuperNodes.

It runs :func:`hetlora.trainer.run` (the workdir lock and identity, resume
from the newest orbax checkpoint, evaluation on the server's test split,
``metrics.jsonl``, summary and plots) with the rounds played over Flower's
grid (:mod:`hetlora.flower.strategy`). Its settings come from the Flower
run config (``[tool.flwr.app.config]`` of the Flower App, or
``flwr run --run-config``):

- ``config``: the experiment config, ``path/to/config.py[:arg]`` (a relative
  path is looked up from the working directory, then from the repository);
- ``overrides``: ``'server.rounds=3 model.name="/models/minilm"'``, fields
  of the config as ``key=value`` (values as Python literals, else strings);
- ``workdir``: where the run writes (resumed when it holds the same run);
- ``round-timeout``, ``min-nodes``, ``node-wait``: :class:`hetlora.flower.strategy.Options`.

Example::

    flwr run launch/flower local-deployment --stream \\
        --run-config "config='configs/tweets_hetlora.py' workdir='workdirs/flower'"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import ml_collections
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from hetlora import compare
from hetlora import trainer
from hetlora.flower import strategy

REPOSITORY = Path(__file__).resolve().parents[2]

app = ServerApp()


def load_config(run_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The experiment config the run config names, with its overrides applied.

  Raises:
    ValueError: ``config`` is unset.
    FileNotFoundError: naming the config file when neither path exists.
  """
  if not run_config.get("config"):
    raise ValueError("the Flower run config has no 'config': pass --run-config "
                     "\"config='configs/tweets_hetlora.py'\".")
  path, _, arg = str(run_config["config"]).partition(":")
  if not Path(path).is_file() and (REPOSITORY / path).is_file():
    path = str(REPOSITORY / path)
  config = compare.load_config_module(path).get_config(arg or None)
  config.update_from_flattened_dict(compare.parse_overrides(str(run_config.get("overrides", ""))))
  return config


def options(run_config: Mapping[str, Any]) -> strategy.Options:
  """:class:`hetlora.flower.strategy.Options` from the run config (defaults where unset)."""
  default = strategy.Options()
  return strategy.Options(
      round_timeout=float(run_config.get("round-timeout", default.round_timeout)),
      min_nodes=int(run_config.get("min-nodes", default.min_nodes)),
      node_wait=float(run_config.get("node-wait", default.node_wait)))


@app.main()
def main(grid: Grid, context: Context) -> None:
  """Runs (or resumes) the configured experiment with the grid's SuperNodes as clients."""
  run_config = context.run_config
  if not run_config.get("workdir"):
    raise ValueError("the Flower run config has no 'workdir': pass --run-config \"workdir='workdirs/flower'\".")
  trainer.run(load_config(run_config), str(run_config["workdir"]), progress=False,
              play_round=strategy.play_round(grid, options(run_config)))
