"""The experiment loop: rounds, evaluation, metrics, checkpoints, resume.

``run(config, workdir)`` builds the experiment (:mod:`hetlora.experiment`)
and runs ``config.server.rounds`` rounds. It writes to ``workdir``:

- ``metrics.jsonl``: one JSON object per round (scalars, plus per-client
  arrays ``client_ids``, ``ranks``, ``losses``, ``examples``, ``update_norms``;
  wall-clock fields live under ``"time"``);
- ``checkpoints/``: orbax checkpoints of the server state every
  ``config.checkpoint_every`` rounds and at the end;
- ``summary.json`` and ``plots.png`` (accuracy vs round, rank distribution);
- ``tensorboard/`` when ``config.tensorboard`` is set.

Under ``jax.distributed`` every process runs the rounds and saves its part
of each checkpoint; only process 0 writes the metrics, summary and plots.

Restarting with the same ``workdir`` resumes from the last checkpoint; the
client sampler, data order and PRNG keys are pure functions of
``(seed, round)``, so a resumed run ends with the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from hetlora import data as data_lib
from hetlora import experiment as experiment_lib
from hetlora import lora as lora_lib
from hetlora import server

METRICS_FILE = "metrics.jsonl"


def make_evaluator(exp: experiment_lib.Experiment) -> Callable[[server.ServerState], dict[str, float]]:
  """``evaluate(state) -> {'test_<metric>': value}`` of the server's adapter on the test set.

  The metrics are the model provider's ``eval_sums`` (accuracy and loss for
  a classifier; token loss and accuracy for a language model, plus
  ``test_perplexity``), each ``sum / weight`` over the test set. The method's
  ``global_adapters`` gives the ``G`` models to evaluate (one for most
  methods, one per rank group for methods that keep several) on its ``effective_base``; with
  ``G > 1`` the mean is reported beside ``test_<metric>_by_group``.
  """
  alpha, rule = exp.config.lora.alpha, exp.config.lora.scale_rule
  method = exp.method
  models = jax.jit(lambda s: (method.effective_base(s, exp.base_params),
                              method.global_adapters(s, alpha, rule)))
  step = jax.jit(jax.vmap(exp.eval_sums, in_axes=(None, 0, None)))
  batches = list(data_lib.batches(exp.test, exp.config.eval.batch_size))

  def evaluate(state):
    base, adapters = models(state.method_state)   # once per evaluation, not per batch
    totals: dict[str, list[np.ndarray]] = {}
    for b in batches:
      for name, (value, weight) in step(base, adapters, b).items():
        acc = totals.setdefault(name, [0.0, 0.0])
        acc[0], acc[1] = acc[0] + np.asarray(value), acc[1] + np.asarray(weight)
    out = {}
    for name, (value, weight) in totals.items():
      per_model = value / np.maximum(weight, 1e-12)
      out[f"test_{name}"] = float(per_model.mean())
      if per_model.size > 1:
        out[f"test_{name}_by_group"] = per_model.tolist()
    if "test_accuracy" not in out and "test_loss" in out:
      out["test_perplexity"] = float(np.exp(out["test_loss"]))
    return out

  return evaluate


def _comm_params(exp, ranks: np.ndarray) -> int:
  """Parameters uploaded by the cohort: ``sum_k r_k * sum_modules (d_in + d_out)`` (``d_out`` alone
  when the method trains only ``b``)."""
  mods = lora_lib.modules(exp.global_lora).values()
  width = sum(m["b"].shape[-1] + (m["a"].shape[-2] if "a" in exp.method.local.trainable else 0)
              for m in mods)
  return int(np.sum(ranks)) * int(width)


def _round_record(exp, r, cohort, result, n, seconds) -> dict[str, Any]:
  examples = np.asarray(result.examples)
  losses = np.asarray(result.loss)
  ranks = np.asarray(result.rank)
  return {
      "round": r + 1,
      "train_loss": float(np.sum(losses * examples) / max(examples.sum(), 1.0)),
      "mean_rank": float(ranks.mean()),
      "comm_params": _comm_params(exp, ranks),
      "client_ids": cohort.tolist(),
      "ranks": ranks.tolist(),
      "losses": losses.tolist(),
      "examples": examples.tolist(),
      "num_examples": np.asarray(n).tolist(),
      "update_norms": np.asarray(result.update_norm).tolist(),
      "time": {"round_s": seconds, "clients_per_s": len(cohort) / seconds,
               "examples_per_s": float(examples.sum()) / seconds},
  }


def _read_metrics(path: Path, upto_round: int) -> list[dict[str, Any]]:
  if not path.exists():
    return []
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return [row for row in rows if row["round"] <= upto_round]


def is_writer() -> bool:
  """Process 0 writes metrics, summary and plots (one process of a ``jax.distributed`` run)."""
  return jax.process_index() == 0


def _checkpoint_manager(workdir: Path, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      (workdir / "checkpoints").resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.get("checkpoints_to_keep", 2), create=True))


def run(config: ml_collections.ConfigDict, workdir: str | Path,
        on_round_end: Callable[[int, dict[str, Any]], None] | None = None,
        progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the experiment of ``config`` in ``workdir``; returns the summary.

  ``on_round_end(round, record)`` is called after each round's metrics are
  written (the round's checkpoint, if due, is saved before).
  """
  workdir = Path(workdir)
  writes = is_writer()
  workdir.mkdir(parents=True, exist_ok=True)
  exp = experiment_lib.build(config)
  if writes:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  evaluate = make_evaluator(exp)
  manager = _checkpoint_manager(workdir, config)
  state = exp.init_state
  start = manager.latest_step() or 0
  if start:
    state = manager.restore(start, args=ocp.args.StandardRestore(state))
  metrics_path = workdir / METRICS_FILE
  history = _read_metrics(metrics_path, start)
  if writes:
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in history))
  writer = _tensorboard(workdir) if writes and config.get("tensorboard", False) else None
  rounds, n_clients, per_round = config.server.rounds, config.data.num_clients, config.server.clients_per_round
  run_key = jax.random.key(config.seed + 1)
  bar = tqdm.trange(start, rounds, initial=start, total=rounds, disable=not progress, desc="rounds")
  for r in bar:
    cohort = server.sample_cohort(config.seed, r, n_clients, per_round)
    data, n = experiment_lib.cohort_data(exp, cohort, r)
    t0 = time.perf_counter()
    state, result = exp.round_fn(state, exp.base_params, cohort, data, n,
                                 key=jax.random.fold_in(run_key, r), public=exp.public)
    jax.block_until_ready(state)
    record = _round_record(exp, r, cohort, result, n, time.perf_counter() - t0)
    if (r + 1) % config.eval.every == 0 or r + 1 == rounds:
      record.update(evaluate(state))
    if writes:
      with metrics_path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    history.append(record)
    if writer is not None:
      for k, v in record.items():
        if isinstance(v, float):
          writer.add_scalar(k, v, r + 1)
    if (r + 1) % config.checkpoint_every == 0 or r + 1 == rounds:
      manager.save(r + 1, args=ocp.args.StandardSave(state))
      manager.wait_until_finished()
    bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                    test=f"{history_last(history, headline_metric(history)):.3f}",
                    clients_s=f"{record['time']['clients_per_s']:.2f}")
    if on_round_end is not None:
      on_round_end(r + 1, record)
  manager.close()
  summary = _summary(config, exp, state, history)
  if writes:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(history, np.asarray(exp.init_state.client_ranks), np.asarray(state.client_ranks),
         workdir / "plots.png", title=f"{config.method.name} on {config.data.source}")
  return summary


def headline_metric(history: list[dict[str, Any]]) -> str:
  """``'test_accuracy'`` for classifiers, else ``'test_loss'`` (language models)."""
  return "test_accuracy" if any("test_accuracy" in row for row in history) else "test_loss"


def history_last(history: list[dict[str, Any]], key: str) -> float:
  """The latest value of ``key`` in the metric rows (NaN if never recorded)."""
  values = [row[key] for row in history if key in row]
  return values[-1] if values else float("nan")


def _summary(config, exp, state, history) -> dict[str, Any]:
  accs = [(row["round"], row["test_accuracy"]) for row in history if "test_accuracy" in row]
  return {
      "method": config.method.name,
      "source": config.data.source,
      "rounds": len(history),
      "final_test_accuracy": history_last(history, "test_accuracy"),
      "final_test_loss": history_last(history, "test_loss"),
      "best_test_accuracy": max((a for _, a in accs), default=float("nan")),
      "accuracy_by_round": accs,
      "final_train_loss": history_last(history, "train_loss"),
      "total_comm_params": int(sum(row["comm_params"] for row in history)),
      "train_seconds": float(sum(row["time"]["round_s"] for row in history)),
      "final_client_ranks": np.asarray(state.client_ranks).tolist(),
      "num_train_examples": int(len(exp.train["input_ids"])),
      "num_test_examples": int(len(exp.test["input_ids"])),
  }


def _tensorboard(workdir: Path):
  from tensorboardX import SummaryWriter  # optional: only when config.tensorboard is set
  return SummaryWriter(str(workdir / "tensorboard"))


def plot(history, ranks_start: np.ndarray, ranks_end: np.ndarray, path: Path, title: str = "") -> None:
  """Saves a PNG: test accuracy vs round, and the client rank histogram at start and end."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
  metric = headline_metric(history)
  values = [(row["round"], row[metric]) for row in history if metric in row]
  if values:
    ax1.plot(*zip(*values), marker="o")
  ax1.set(xlabel="round", ylabel=metric.replace("_", " "), title=title)
  ax1.grid(alpha=0.3)
  bins = np.arange(1, max(ranks_start.max(), ranks_end.max()) + 2) - 0.5
  ax2.hist([ranks_start, ranks_end], bins=bins, label=["start", "end"])
  ax2.set(xlabel="client rank", ylabel="clients", title="rank distribution")
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
