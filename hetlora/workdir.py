"""A run's working directory: one run at a time, one experiment per directory, no debris.

:func:`open_run` is the context manager :func:`hetlora.trainer.run` enters
after the experiment is built (so an invalid config creates nothing):

1. **Lock.** An exclusive, non-blocking ``fcntl.flock`` on ``workdir/run.lock``,
   which then holds the holder's pid, host, start time and command. A second
   run on the same workdir is refused at once (:class:`WorkdirLocked`) with
   the holder named. The kernel drops the lock when its holder exits, however
   it exits (exception, SIGINT, SIGKILL), so a lock file left by a dead
   process is no obstacle. Under ``jax.distributed`` only process 0 locks.
   (``flock`` is not reliable on every network file system.)
2. **Identity.** The first start stores ``identity.json``: the whole config
   except the :data:`RESUMABLE` fields (so method name and kwargs, model,
   data source and kwargs, partition, client ranks, LoRA pattern / ``r_max`` /
   ``alpha`` / scale rule, optimiser, seed, clients, ...) and what the config
   derives (label count, training / test set sizes, every LoRA module's
   factor shapes, the shapes of dense trainables such as a trained head;
   ``model.head`` is a config field). A resume whose identity differs in any
   field is refused with a ``ValueError`` listing each field (``old -> new``)
   before anything in the workdir changes; ``config.json`` is written only by
   a new run.
3. **No debris.** If the run fails before its first round is recorded, what
   this run created is removed: the whole workdir (and the parent directories
   it made, while empty) if this run made it, else only the files it added
   (a user's files are never touched).

:data:`RESUMABLE` fields may change on resume: ``server.rounds`` (extend or
finish a run; never below the rounds already done), ``eval.every``,
``eval.batch_size``, the generation settings ``eval.at_start``,
``eval.generate_examples``, ``eval.max_new_tokens``, ``eval.answer_marker``,
``eval.samples_per_task``, ``checkpoint_every``, ``checkpoints_to_keep``,
``tensorboard``, ``client.backend``, ``client.chunk_size`` and
``data.row_stream`` (every backend, and packed steps or their row stream,
give the same numbers up to float summation order).

Example::

    with open_run(workdir, identity(config, exp), config.to_json_best_effort(indent=2)) as run_dir:
      ...                  # restore, train
      run_dir.started()    # the first round is recorded: keep the workdir from now on
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from flax import traverse_util

from hetlora import lora as lora_lib

LOCK_FILE = "run.lock"
IDENTITY_FILE = "identity.json"
CONFIG_FILE = "config.json"
# Everything a run writes at the top of its workdir (removed if the run fails before its first round).
RUN_FILES = (LOCK_FILE, IDENTITY_FILE, CONFIG_FILE, "metrics.jsonl", "data_stats.json", "checkpoints",
             "summary.json", "plots.png", "tensorboard", "generations")
RESUMABLE = ("server.rounds", "eval.every", "eval.batch_size", "eval.at_start", "eval.generate_examples",
             "eval.max_new_tokens", "eval.answer_marker", "eval.samples_per_task", "checkpoint_every",
             "checkpoints_to_keep", "tensorboard", "client.backend", "client.chunk_size", "data.row_stream")
_ABSENT = "(absent)"


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir's lock."""


def atomic_write_text(path: Path, text: str) -> None:
  """Writes ``path`` so that a reader (or a kill) sees the old content or the new, never a part."""
  tmp = path.with_name(f".{path.name}.tmp")   # one writer: the lock holder
  tmp.write_text(text)
  os.replace(tmp, path)


def identity(config, exp) -> dict[str, Any]:
  """What makes a run this run: ``{'config': {dotted field: value}, 'derived': {...}}``.

  ``config`` is every config field but :data:`RESUMABLE`; ``derived`` holds
  ``num_labels``, ``num_train_examples``, ``num_test_examples`` and
  ``lora_shapes`` (``{module path: 'a[d_in, r_max] b[r_max, d_out]'}``) of the
  built :class:`hetlora.experiment.Experiment`, and ``dense_shapes``
  (``{param path: [shape]}``) when the run has dense trainables.
  """
  flat = _flatten(json.loads(config.to_json_best_effort()))
  shapes = {path: " ".join(f"{k}{list(v.shape)}" for k, v in sorted(m.items()))
            for path, m in lora_lib.modules(exp.global_lora).items()}
  dense = traverse_util.flatten_dict(exp.init_state.dense, sep="/")
  column = next(iter(exp.train))
  derived = {"num_labels": len(exp.label_names), "num_train_examples": int(len(exp.train[column])),
             "num_test_examples": int(len(exp.test[column])), "lora_shapes": shapes}
  if dense:   # absent without dense trainables: workdirs made before them resume unchanged
    derived["dense_shapes"] = {path: list(x.shape) for path, x in sorted(dense.items())}
  return {"config": {k: v for k, v in flat.items() if k not in RESUMABLE and v is not None},
          "derived": derived}


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """``'field: old -> new'`` for each identity field that differs (LoRA shapes in one line).

  ``derived`` is compared only when ``old`` has it (a workdir older than ``identity.json`` does not).
  """
  lines = []
  for section in ("config", "derived"):
    if section not in old:
      continue
    a, b = dict(old[section]), dict(new.get(section, {}))
    shapes_a, shapes_b = a.pop("lora_shapes", {}), b.pop("lora_shapes", {})
    for key in sorted(set(a) | set(b)):
      if _norm(a.get(key)) != _norm(b.get(key)):   # None: not set, as if absent
        lines.append(f"{key}: {_show(a.get(key, _ABSENT))} -> {_show(b.get(key, _ABSENT))}")
    changed = sorted(k for k in set(shapes_a) | set(shapes_b) if shapes_a.get(k) != shapes_b.get(k))
    if changed:
      first = changed[0]
      lines.append(f"LoRA module shapes: {len(changed)} of {len(set(shapes_a) | set(shapes_b))} modules "
                   f"differ, e.g. {first}: {shapes_a.get(first, _ABSENT)} -> {shapes_b.get(first, _ABSENT)}")
  return lines


def check_identity(workdir: Path, new: dict[str, Any]) -> bool:
  """Raises ``ValueError`` if ``workdir`` holds a run of another identity; True if it holds this one.

  A workdir with no metrics row and no checkpoint holds no run yet (False).
  One made before ``identity.json`` existed is compared on the fields of its
  ``config.json``. A field set to ``None`` counts as not set. Reads only.
  """
  workdir = Path(workdir)
  path = workdir / IDENTITY_FILE
  if not _has_run(workdir):   # nothing recorded yet (e.g. killed before its first round): a new run
    return False
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except ValueError as e:
      raise ValueError(f"{path} is unreadable ({e}); restore it, or pass a new --workdir.") from None
  elif (workdir / CONFIG_FILE).exists():
    flat = _flatten(json.loads((workdir / CONFIG_FILE).read_text()))
    old = {"config": {k: v for k, v in flat.items() if k not in RESUMABLE}}
    new = {"config": {k: v for k, v in new["config"].items() if k in old["config"]}}  # fields it knew
    path = workdir / CONFIG_FILE
  else:
    return False
  diff = identity_diff(old, new)
  if diff:
    listed = "\n".join(f"  {line}" for line in diff)
    raise ValueError(
        f"workdir {workdir} holds another run; resuming it with this config would mix two experiments. "
        f"Differing fields (stored -> now):\n{listed}\n"
        f"Fix: pass a new --workdir for the new experiment, or restore these fields to the values in "
        f"{path} to resume. Fields that may change on resume: {', '.join(RESUMABLE)}.")
  return True


class RunDir:
  """The open workdir of one run (see :func:`open_run`)."""

  def __init__(self, path: Path, resumed: bool):
    self.path, self.resumed, self.is_started = path, resumed, False

  def started(self) -> None:
    """Marks the first round as recorded: from now on a failure keeps the workdir."""
    self.is_started = True


@contextlib.contextmanager
def open_run(workdir: str | os.PathLike, new_identity: dict[str, Any], config_json: str,
             writer: bool = True) -> Iterator[RunDir]:
  """Locks ``workdir``, checks or stores the run identity, cleans up a failed start (module docstring).

  ``writer=False`` (processes other than 0 under ``jax.distributed``) only
  checks the identity: no lock, no files, no cleanup.
  """
  workdir = Path(workdir)
  resumed = check_identity(workdir, new_identity)   # before anything in the workdir changes
  if not writer:
    yield RunDir(workdir, resumed)
    return
  made = _make_dir(workdir)
  existed = {name for name in RUN_FILES if (workdir / name).exists()}
  with lock(workdir):
    run_dir = RunDir(workdir, check_identity(workdir, new_identity))  # again, now that the workdir is ours
    try:
      if not run_dir.resumed or not (workdir / IDENTITY_FILE).exists():
        atomic_write_text(workdir / IDENTITY_FILE, json.dumps(
            {**new_identity, "created": _now(), "resumable_fields": list(RESUMABLE)}, indent=2))
      if not run_dir.resumed:
        atomic_write_text(workdir / CONFIG_FILE, config_json)
      yield run_dir
    except BaseException:
      if not run_dir.is_started:
        _remove_created(workdir, made, existed)
      raise


@contextlib.contextmanager
def lock(workdir: Path) -> Iterator[None]:
  """Holds an exclusive ``flock`` on ``workdir/run.lock``; raises :class:`WorkdirLocked` naming the holder."""
  path = Path(workdir) / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirLocked(
          f"workdir {workdir} is in use by another run ({_describe_holder(path)}); wait for it to finish "
          "or stop it, or pass another --workdir.") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
              "command": " ".join([os.path.basename(sys.executable), *sys.argv])}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    yield
  finally:
    os.close(fd)   # drops the lock


def _describe_holder(path: Path) -> str:
  try:
    h = json.loads(path.read_text())
    return f"pid {h['pid']} on host {h['host']}, started {h['started']}, command: {h['command']}"
  except (OSError, ValueError, KeyError):
    return f"holder unknown: {path} is being written"


def _make_dir(workdir: Path) -> list[Path]:
  """Creates ``workdir`` and missing parents; returns the directories this call made, deepest first."""
  made = [p for p in [workdir, *workdir.parents] if not p.exists()]
  workdir.parent.mkdir(parents=True, exist_ok=True)
  try:
    workdir.mkdir()
  except FileExistsError:
    if not workdir.is_dir():
      raise NotADirectoryError(f"--workdir {workdir} exists and is not a directory; pass a directory.") from None
    return []   # another run made it first
  return made


def _remove_created(workdir: Path, made: list[Path], existed: set[str]) -> None:
  """Removes what this run created: ``workdir`` and the parents it made (if empty), else its new run files."""
  targets = [workdir] if made else [workdir / n for n in RUN_FILES if n not in existed]
  for target in targets:
    try:
      if target.is_dir():
        shutil.rmtree(target)
      elif target.exists():
        target.unlink()
    except OSError:
      pass   # best effort: never hide the run's own error
  for parent in made[1:]:
    try:
      parent.rmdir()   # only while empty: another run may have started beside ours
    except OSError:
      break


def _has_run(workdir: Path) -> bool:
  """True once a round is recorded: a metrics row, a checkpoint step or a summary."""
  metrics, checkpoints = workdir / "metrics.jsonl", workdir / "checkpoints"
  return ((metrics.exists() and metrics.stat().st_size > 0) or (workdir / "summary.json").exists()
          or (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{'a': {'b': 1, 'c': {}}}`` -> ``{'a.b': 1}`` (empty sections vanish)."""
  if isinstance(tree, dict):
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _norm(value: Any) -> Any:
  return json.loads(json.dumps(value))


def _show(value: Any) -> str:
  return value if value is _ABSENT else json.dumps(value)


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
