"""The experiment loop: rounds, evaluation, metrics, checkpoints, resume.

``run(config, workdir)`` builds the experiment (:mod:`hetlora.experiment`)
and runs ``config.server.rounds`` rounds. It writes to ``workdir``:

- ``metrics.jsonl``: one JSON object per round (scalars, plus per-client
  arrays ``client_ids``, ``ranks``, ``losses``, ``examples``, ``update_norms``;
  wall-clock fields live under ``"time"``); with ``eval.at_start`` a first row
  ``{"round": 0, ...}`` holds the evaluation of the initial model (for a
  language model, the zero-shot floor);
- ``checkpoints/``: orbax checkpoints of the server state every
  ``config.checkpoint_every`` rounds and at the end;
- ``data_stats.json``: examples, truncated and empty examples and label counts
  per split and per client (:func:`hetlora.data.statistics`; printed at the
  start of a run with a progress bar);
- ``generations/round_<r>.jsonl`` (language models with ``eval.generate_examples``):
  a few prompts per task with the reference, the model's greedy answer and
  its ROUGE-L and exact match, at every evaluation;
- ``summary.json`` and ``plots.png`` (accuracy, or ROUGE-L and loss, vs round;
  rank distribution);
- ``tensorboard/`` when ``config.tensorboard`` is set.

Under ``jax.distributed`` every process runs the rounds and saves its part
of each checkpoint; only process 0 writes the metrics, summary and plots.

Restarting with the same ``workdir`` resumes from the last checkpoint; the
client sampler, data order and PRNG keys are pure functions of
``(seed, round)``, so a resumed run ends with the same numbers as an
uninterrupted one. The workdir is guarded by :mod:`hetlora.workdir`: one run
at a time (a lock naming its holder), a resume only of the same experiment
(``identity.json``), nothing left behind by a run that fails before its
first round. A newest checkpoint that cannot be read (truncated, missing or
garbage files) is reported in one line and set aside as
``checkpoints/<step>.corrupt``; the run resumes from the newest one that
restores, with ``metrics.jsonl`` cut back to it. Files are replaced
atomically, so a kill at any moment leaves a resumable workdir.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as py_logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from hetlora import data as data_lib
from hetlora import dense as dense_lib
from hetlora import experiment as experiment_lib
from hetlora import lora as lora_lib
from hetlora import privacy as privacy_lib
from hetlora import server
from hetlora import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"
DATA_STATS_FILE = "data_stats.json"
GENERATIONS_DIR = "generations"


def make_evaluator(exp: experiment_lib.Experiment
                   ) -> Callable[[server.ServerState], tuple[dict[str, Any], list[dict[str, Any]]]]:
  """``evaluate(state) -> (metrics, samples)`` of the server's models on the evaluation data.

  ``metrics`` holds the model provider's ``eval_sums`` (accuracy and loss for
  a classifier; token loss and accuracy for a language model, plus
  ``test_perplexity``), each ``sum / weight`` over the test set as
  ``test_<metric>``, and over the held-out tasks (``data.unseen_tasks``) as
  ``test_<metric>_unseen``. With a model that generates and
  ``eval.generate_examples > 0`` it adds the provider's generation metrics,
  ``test_rougeL``, ``test_exact_match`` (where defined) and their ``_unseen``
  forms, and ``samples`` holds a few generations per task (else it is empty). On
  multiple-choice data it adds the provider's option-scoring accuracies, ``test_accuracy``
  (the mean over tasks), ``test_accuracy_norm`` and ``test_accuracy/<task>``, and a few
  chosen answers per task to ``samples``.
  :func:`hetlora.server.eval_models` gives the ``G`` models to evaluate (one
  for most methods, one per rank group for methods that keep several); with
  ``G > 1`` the mean is reported beside ``<metric>_by_group``.
  """
  alpha, rule = exp.config.lora.alpha, exp.config.lora.scale_rule
  models = jax.jit(lambda state, base: server.eval_models(exp.method, state, base, alpha, rule))
  step = jax.jit(jax.vmap(exp.eval_sums, in_axes=(None, 0, None)))
  sets = {"": exp.test, **({"_unseen": exp.unseen} if exp.unseen is not None else {})}
  batches = {suffix: list(data_lib.batches(cols, exp.config.eval.batch_size)) for suffix, cols in sets.items()}

  def evaluate(state):
    base, adapters = models(state, exp.base_params)   # once per evaluation, not per batch
    out: dict[str, Any] = {}
    for suffix, set_batches in batches.items():
      totals: dict[str, list[np.ndarray]] = {}
      for b in set_batches:
        for name, (value, weight) in step(base, adapters, b).items():
          acc = totals.setdefault(name, [0.0, 0.0])
          acc[0], acc[1] = acc[0] + np.asarray(value), acc[1] + np.asarray(weight)
      for name, (value, weight) in totals.items():
        _put(out, f"test_{name}{suffix}", value / np.maximum(weight, 1e-12))
      if "accuracy" not in totals and "loss" in totals:
        out[f"test_perplexity{suffix}"] = float(np.exp(out[f"test_loss{suffix}"]))
    samples: list[dict[str, Any]] = []
    for host_eval in (exp.generation_eval, exp.choice_eval):
      if host_eval is None:
        continue
      metrics, more = host_eval(base, adapters)
      samples += more
      for set_name, values in metrics.items():
        suffix = "" if set_name == "test" else f"_{set_name}"
        for name, per_model in values.items():
          _put(out, f"test_{name}{suffix}", np.asarray(per_model, np.float64))
    return out, samples

  return evaluate


def _put(out: dict[str, Any], key: str, per_model: np.ndarray) -> None:
  """``out[key]``: the mean over the ``G`` models; ``out[key + '_by_group']`` too when ``G > 1``."""
  out[key] = float(np.mean(per_model))
  if per_model.size > 1:
    out[f"{key}_by_group"] = per_model.tolist()


def _evaluate_into(record: dict[str, Any], evaluate, state, workdir: Path, writes: bool) -> None:
  """Adds the evaluation of ``state`` to ``record`` (time under ``time.eval_s``); the writer saves
  the generations to ``generations/round_<r>.jsonl``."""
  t0 = time.perf_counter()
  metrics, samples = evaluate(state)
  record.update(metrics)
  record.setdefault("time", {})["eval_s"] = time.perf_counter() - t0
  if writes and samples:
    path = workdir / GENERATIONS_DIR / f"round_{record['round']}.jsonl"
    path.parent.mkdir(exist_ok=True)
    workdir_lib.atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in samples))


def _comm_params(exp, ranks: np.ndarray) -> int:
  """Parameters uploaded by the cohort: ``sum_k r_k * sum_modules (d_in + d_out)`` (``d_out`` alone
  when the method trains only ``b``), plus ``K`` copies of the dense trainables (a trained head)."""
  mods = lora_lib.modules(exp.global_lora).values()
  width = sum(m["b"].shape[-1] + (m["a"].shape[-2] if "a" in exp.method.local.trainable else 0)
              for m in mods)
  return int(np.sum(ranks)) * int(width) + len(ranks) * dense_lib.size(exp.init_state.dense)


def _round_record(exp, r, cohort, result, n, seconds) -> dict[str, Any]:
  examples = np.asarray(result.examples)
  losses = np.asarray(result.loss)
  ranks = np.asarray(result.rank)
  included = np.asarray(result.included, bool)
  excluded = [int(c) for c in np.asarray(cohort)[~included]]
  if excluded:
    logging.warning("round %d: excluded the uploads of clients %s (non-finite, or factor update norm "
                    "above server.max_update_norm=%g); the round aggregates the other %d.",
                    r + 1, excluded, exp.config.server.max_update_norm, int(included.sum()))
  kept = np.where(included, examples, 0.0)
  privacy = experiment_lib.make_privacy(exp.config)
  dp = {}
  if privacy is not None:
    rate = exp.config.server.clients_per_round / exp.config.data.num_clients
    dp = {"dp_epsilon": privacy_lib.epsilon(privacy.noise_multiplier, rate, r + 1, privacy.delta),
          "dp_delta": privacy.delta}
  return {
      "round": r + 1,
      "train_loss": float(np.sum(np.where(included, losses, 0.0) * kept) / max(kept.sum(), 1.0)),
      "excluded": len(excluded),
      "excluded_clients": excluded,
      **dp,
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
  """The rows of rounds ``<= upto_round``; a last line cut short by a kill is dropped."""
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i + 1 < len(lines):
        raise ValueError(f"{path} line {i + 1} is not JSON; repair or remove that line to resume.") from None
  return [row for row in rows if row["round"] <= upto_round]


def is_writer() -> bool:
  """Process 0 writes metrics, summary and plots (one process of a ``jax.distributed`` run)."""
  return jax.process_index() == 0


def _checkpoint_manager(workdir: Path, config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      (workdir / "checkpoints").resolve(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.get("checkpoints_to_keep", 2), create=True))


def _restore(workdir: Path, config, state, writes: bool):
  """``(manager, step, state)`` from the newest checkpoint that restores (``(manager, 0, state)`` if none).

  An unreadable step (truncated, missing or garbage files) is reported in one
  line and set aside as ``checkpoints/<step>.corrupt``; the next older one is
  tried. If every step fails, nothing is set aside and a ``RuntimeError``
  lists them (a checkpoint of another code version is not corruption).
  """
  directory = (workdir / "checkpoints").resolve()
  if writes and directory.is_dir():   # saves a kill cut short (orbax renames a step dir into place when done)
    for tmp in directory.glob("*.orbax-checkpoint-tmp*"):
      shutil.rmtree(tmp, ignore_errors=True)
  failed: list[tuple[int, str]] = []
  step, restored = 0, state
  with _quiet_orbax():
    manager = _checkpoint_manager(workdir, config)
    for candidate in sorted(manager.all_steps(), reverse=True):
      try:
        restored = state.replace(**manager.restore(
            candidate, args=ocp.args.StandardRestore(server.checkpoint_tree(state))))
        step = candidate
        break
      except Exception as e:  # noqa: BLE001 -- any failure to read a step: try the previous one
        failed.append((candidate, _unreadable_reason(directory / str(candidate), e)))
        gc.collect()   # its abandoned reads report now, into _drop_abandoned_read_errors
        manager.close()
        manager = _checkpoint_manager(workdir, config)   # a failed restore can leave the manager's mode set
  if not failed:
    return manager, step, restored
  manager.close()
  if not step:
    listed = "; ".join(f"step {s}: {reason}" for s, reason in failed)
    raise RuntimeError(f"no checkpoint in {directory} can be restored ({listed}). If they come from another "
                       "hetlora version, resume with that version, or pass a new --workdir.")
  for bad, reason in failed:
    path, aside = directory / str(bad), directory / f"{bad}.corrupt"
    if writes:   # kept for inspection; orbax ignores the name
      shutil.rmtree(aside, ignore_errors=True)
      path.rename(aside)
    logging.warning("checkpoint %s is unreadable (%s); %sresuming from step %d", path, reason,
                    f"set aside as {aside.name}, " if writes else "", step)
  with _quiet_orbax():
    return _checkpoint_manager(workdir, config), step, restored   # without the set-aside steps


def _unreadable_reason(step_dir: Path, error: Exception) -> str:
  """A short cause: missing files of orbax's layout first, then the error without TensorStore's spec dump."""
  if step_dir.is_dir() and not any(step_dir.iterdir()):
    return "the directory is empty"
  missing = [n for n in ("_CHECKPOINT_METADATA", "default/_METADATA", "default/manifest.ocdbt")
             if not (step_dir / n).exists()]
  text = str(error).splitlines()[0] if str(error) else ""
  text = text.split(" [tensorstore_spec")[0].replace(f"{step_dir}/", "")
  code = re.match(r"[A-Z_]+: ", text)
  if "Error " in text:   # TensorStore chains causes: "Error opening ...: Error reading ...: <cause>"
    text = (code.group(0) if code else "") + text[text.rindex("Error "):]
  text = f"{type(error).__name__}: {text}"[:300]
  return f"missing {', '.join(missing)}; {text}" if missing else text


@contextlib.contextmanager
def _quiet_orbax():
  """Silences orbax's (absl) log records while trying a restore: our one line says what failed."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.FATAL)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)


def _abandoned_read(message: str) -> bool:
  return "Task exception was never retrieved" in message and "async_deserialize" in message


@contextlib.contextmanager
def _drop_abandoned_read_errors():
  """Drops the echoes of a failed restore's other reads, which TensorStore and asyncio report late.

  ``RuntimeError('Event loop is closed')`` through ``sys.unraisablehook`` and
  asyncio's "Task exception was never retrieved" for orbax's
  ``async_deserialize``; every other error is reported as before.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  def drop(record):
    return not _abandoned_read(record.getMessage())

  asyncio_logger = py_logging.getLogger("asyncio")
  sys.unraisablehook = hook
  asyncio_logger.addFilter(drop)
  try:
    yield
  finally:
    sys.unraisablehook = previous
    asyncio_logger.removeFilter(drop)


def run(config: ml_collections.ConfigDict, workdir: str | Path,
        on_round_end: Callable[[int, dict[str, Any]], None] | None = None,
        progress: bool = True,
        play_round: Callable[[experiment_lib.Experiment], PlayRound] | None = None) -> dict[str, Any]:
  """Runs (or resumes) the experiment of ``config`` in ``workdir``; returns the summary.

  ``on_round_end(round, record)`` is called after each round's metrics are
  written (the round's checkpoint, if due, is saved before). ``play_round(exp)``
  builds how a round is played (default :func:`local_round`: the cohort's data
  packed here, ``exp.round_fn``); a driver whose clients train elsewhere
  (:mod:`hetlora.flower`) plays it with the same server steps. The experiment
  is built (and the config validated) before the workdir is created; the
  workdir is locked, its run identity checked and a failed start cleaned up
  by :func:`hetlora.workdir.open_run`.
  """
  exp = experiment_lib.build(config)
  identity = workdir_lib.identity(config, exp)
  writes = is_writer()
  config_json = config.to_json_best_effort(indent=2)
  with workdir_lib.open_run(workdir, identity, config_json, writer=writes) as run_dir, \
      _drop_abandoned_read_errors():
    return _train(config, exp, run_dir, writes, on_round_end, progress, (play_round or local_round)(exp))


# play(state, cohort, round_index, key) -> (state, result, num_examples: float32[K], extra metrics)
PlayRound = Callable[[server.ServerState, np.ndarray, int, jax.Array],
                     tuple[server.ServerState, Any, np.ndarray, dict[str, Any]]]


def local_round(exp: experiment_lib.Experiment) -> PlayRound:
  """The in-process round: the cohort's data packed on this host, trained by ``exp.round_fn``."""
  def play(state, cohort, r, key):
    data, n = experiment_lib.cohort_data(exp, cohort, r)
    state, result = exp.round_fn(state, exp.base_params, cohort, data, n, key=key, public=exp.public)
    return state, result, n, {}
  return play


def _train(config, exp, run_dir: workdir_lib.RunDir, writes: bool, on_round_end, progress,
           play: PlayRound) -> dict[str, Any]:
  workdir = run_dir.path
  evaluate = make_evaluator(exp)
  rounds, n_clients = config.server.rounds, config.data.num_clients
  per_round = config.server.clients_per_round
  manager, start, state = _restore(workdir, config, exp.init_state, writes)
  with contextlib.closing(manager):   # also on an exception: orbax's threads finish first
    if start > rounds:
      raise ValueError(f"server.rounds={rounds} is below the {start} rounds {workdir} already holds; "
                       f"set server.rounds >= {start} to resume, or pass a new --workdir.")
    metrics_path = workdir / METRICS_FILE
    history = _read_metrics(metrics_path, start)
    if writes:
      workdir_lib.atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in history))
      if [row["round"] for row in history if row["round"] > 0] != list(range(1, start + 1)):
        logging.warning("%s holds rounds %s but the checkpoint is at round %d; the summary lacks the others",
                        metrics_path, [row["round"] for row in history], start)
    writer = _tensorboard(workdir) if writes and config.get("tensorboard", False) else None
    if writes:
      stats = data_lib.statistics(exp)
      workdir_lib.atomic_write_text(workdir / DATA_STATS_FILE, json.dumps(stats, indent=2))
      if progress:
        print(data_lib.format_statistics(stats), flush=True)
    if start == 0 and config.eval.get("at_start", False) and not any(row["round"] == 0 for row in history):
      record = {"round": 0}
      _evaluate_into(record, evaluate, state, workdir, writes)
      if writes:
        with metrics_path.open("a") as f:
          f.write(json.dumps(record) + "\n")
      history.append(record)
    run_key = jax.random.key(config.seed + 1)
    bar = tqdm.trange(start, rounds, initial=start, total=rounds, disable=not progress, desc="rounds")
    for r in bar:
      cohort = server.sample_cohort(config.seed, r, n_clients, per_round)
      t0 = time.perf_counter()
      state, result, n, extra = play(state, cohort, r, jax.random.fold_in(run_key, r))
      jax.block_until_ready(state)
      record = {**_round_record(exp, r, cohort, result, n, time.perf_counter() - t0), **extra,
                "rank_counts": rank_counts(state.client_ranks)}
      if (r + 1) % config.eval.every == 0 or r + 1 == rounds:
        _evaluate_into(record, evaluate, state, workdir, writes)
      if writes:
        with metrics_path.open("a") as f:
          f.write(json.dumps(record) + "\n")
      history.append(record)
      run_dir.started()
      if writer is not None:
        for k, v in record.items():
          if isinstance(v, float):
            writer.add_scalar(k, v, r + 1)
      if (r + 1) % config.checkpoint_every == 0 or r + 1 == rounds:
        manager.save(r + 1, args=ocp.args.StandardSave(server.checkpoint_tree(state)))
        manager.wait_until_finished()
      bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                      test=f"{history_last(history, headline_metric(history)):.3f}",
                      clients_s=f"{record['time']['clients_per_s']:.2f}")
      if on_round_end is not None:
        on_round_end(r + 1, record)
  summary = _summary(config, exp, state, history)
  if writes:
    workdir_lib.atomic_write_text(workdir / "summary.json", json.dumps(summary, indent=2))
    plot(history, np.asarray(exp.init_state.client_ranks), np.asarray(state.client_ranks),
         workdir / "plots.png", title=f"{config.method.name} on {config.data.source}")
  return summary


def headline_metric(history: list[dict[str, Any]]) -> str:
  """``'test_accuracy'`` for classifiers, ``'test_rougeL'`` for language models evaluated by
  generation, else ``'test_loss'``."""
  for key in ("test_accuracy", "test_rougeL"):
    if any(key in row for row in history):
      return key
  return "test_loss"


def rank_counts(client_ranks) -> dict[str, int]:
  """Clients per rank over the whole population, ``{'<rank>': count}`` in rank order (JSON keys)."""
  values, counts = np.unique(np.asarray(client_ranks), return_counts=True)
  return {str(int(v)): int(c) for v, c in zip(values, counts)}


def history_last(history: list[dict[str, Any]], key: str) -> float:
  """The latest value of ``key`` in the metric rows (NaN if never recorded)."""
  values = [row[key] for row in history if key in row]
  return values[-1] if values else float("nan")


GENERATION_SUMMARY = ("test_rougeL", "test_rougeL_unseen", "test_exact_match", "test_exact_match_unseen",
                      "test_loss_unseen")
# what a language model's evaluation by generation records each time, for ``generation_by_round``
GENERATION_METRICS = (*GENERATION_SUMMARY, "test_loss")


def _summary(config, exp, state, history) -> dict[str, Any]:
  rounds = [row for row in history if row["round"] > 0]   # without the round-0 evaluation
  accs = [(row["round"], row["test_accuracy"]) for row in history if "test_accuracy" in row]
  summary = {
      "method": config.method.name,
      "source": config.data.source,
      "rounds": len(rounds),
      "final_test_accuracy": history_last(history, "test_accuracy"),
      "final_test_loss": history_last(history, "test_loss"),
      "best_test_accuracy": max((a for _, a in accs), default=float("nan")),
      "accuracy_by_round": accs,
      "final_train_loss": history_last(history, "train_loss"),
      "total_comm_params": int(sum(row["comm_params"] for row in rounds)),
      "train_seconds": float(sum(row["time"]["round_s"] for row in rounds)),
      "eval_seconds": float(sum(row["time"].get("eval_s", 0.0) for row in history)),
      "initial_client_ranks": np.asarray(exp.init_state.client_ranks).tolist(),
      "final_client_ranks": np.asarray(state.client_ranks).tolist(),
      # clients per rank at the start (round 0) and after each round: self-pruning shows here
      "rank_counts_by_round": [(0, rank_counts(exp.init_state.client_ranks))] + [
          (row["round"], row["rank_counts"]) for row in rounds if "rank_counts" in row],
      "num_train_examples": int(len(next(iter(exp.train.values())))),   # any column: [N, ...]
      "num_test_examples": int(len(next(iter(exp.test.values())))),
  }
  for key in GENERATION_SUMMARY:
    if any(key in row for row in history):
      summary[f"final_{key}"] = history_last(history, key)
  by_task = [(row["round"], metrics) for row in history if (metrics := _task_metrics(row))]
  if by_task:
    summary["by_task_by_round"] = by_task
  generation = [(row["round"], {k: row[k] for k in GENERATION_METRICS if k in row})
                for row in history if "test_rougeL" in row]   # round 0 is the base model when eval.at_start
  if generation:
    summary["generation_by_round"] = generation
  return summary


def _task_metrics(row: dict[str, Any]) -> dict[str, float]:
  """The per-task test metrics of a metrics row, ``{'accuracy/boolq': ...}`` (``test_`` dropped)."""
  return {k[len("test_"):]: v for k, v in row.items()
          if k.startswith("test_") and "/" in k and not k.endswith("_by_group")}


def _tensorboard(workdir: Path):
  from tensorboardX import SummaryWriter  # optional: only when config.tensorboard is set
  return SummaryWriter(str(workdir / "tensorboard"))


def plot(history, ranks_start: np.ndarray, ranks_end: np.ndarray, path: Path, title: str = "") -> None:
  """Saves a PNG: the headline test metric vs round (ROUGE-L and the test loss for a language
  model evaluated by generation; held-out tasks dashed), and the client rank histogram at start
  and end."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metric = headline_metric(history)
  metrics = [metric, "test_loss"] if metric == "test_rougeL" else [metric]
  fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(5 * (len(metrics) + 1), 3.6))
  for ax, key in zip(axes, metrics):
    for name, style in ((key, "o-"), (f"{key}_unseen", "s--")):
      values = [(row["round"], row[name]) for row in history if name in row]
      if values:
        ax.plot(*zip(*values), style, label="unseen tasks" if name.endswith("_unseen") else "test")
    ax.set(xlabel="round", ylabel=key.replace("_", " "), title=title if ax is axes[0] else "")
    ax.grid(alpha=0.3)
    if any(f"{key}_unseen" in row for row in history):
      ax.legend()
  bins = np.arange(1, max(ranks_start.max(), ranks_end.max()) + 2) - 0.5
  axes[-1].hist([ranks_start, ranks_end], bins=bins, label=["start", "end"])
  axes[-1].set(xlabel="client rank", ylabel="clients", title="rank distribution")
  axes[-1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
