import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hetlora import compare

REPO = Path(__file__).resolve().parents[1]


def test_cpu_model_reads_the_model_name(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
  assert compare.cpu_model(info) == "AMD EPYC 9654 96-Core Processor"
  assert compare.cpu_model(tmp_path / "absent") == platform.processor()   # no cpuinfo: the platform's string


def test_accuracy_at_fraction_of_rounds():
  accs = [(2, 0.1), (4, 0.3), (6, 0.5), (8, 0.7)]
  assert compare.accuracy_at(accs, 0.25, 8) == 0.1
  assert compare.accuracy_at(accs, 0.5, 8) == 0.3
  assert math.isnan(compare.accuracy_at(accs, 0.1, 8))


def test_row_and_markdown():
  summary = {"rounds": 4, "method": "hetlora", "final_test_accuracy": 0.5, "accuracy_by_round": [(2, 0.25), (4, 0.5)],
             "total_comm_params": 4000, "train_seconds": 12.0, "initial_client_ranks": [8, 4, 2, 2],
             "final_client_ranks": [6, 3, 2, 1]}
  r = compare.row("hetlora_alpha0.1", summary)
  assert r["comm_params_per_round"] == 1000 and r["accuracy_at_50pct"] == 0.25
  table = compare.markdown([r])
  assert table.count("\n") == 3 and "| hetlora_alpha0.1 | hetlora | 0.5000 |" in table
  assert "| 1,000 | 4.00 -> 3.00 | 12 |" in table


def test_generation_table_puts_the_base_model_first_and_marks_what_was_not_recorded():
  def summary(by_round):
    return {"rounds": 2, "method": "hetlora", "final_test_accuracy": float("nan"), "accuracy_by_round": [],
            "total_comm_params": 10, "train_seconds": 30.0, "eval_seconds": 12.0, "generation_by_round": by_round}
  with_base = compare.row("hetlora_alpha0", summary(
      [(0, {"test_rougeL": 0.2, "test_rougeL_unseen": 0.3, "test_loss": 3.0}),
       (2, {"test_rougeL": 0.25, "test_rougeL_unseen": 0.35, "test_loss": 2.5})]))
  without = compare.row("homlora_min_alpha0", summary([(2, {"test_rougeL": 0.1, "test_loss": 2.9})]))
  assert without["zero_shot_generation"] == {} and with_base["generation"]["test_rougeL"] == 0.25
  assert "| homlora_min_alpha0 | hetlora | - | - | - | 5 |" in compare.markdown([without])
  lines = compare.generation_markdown([without, with_base]).splitlines()
  assert len(lines) == 5 and lines[0].startswith("| run | method | ROUGE-L, seen tasks | ROUGE-L, unseen tasks |")
  assert lines[2] == "| base model (round 0) | - | 0.200 | 0.300 | - | - | 3.000 | - | - |"
  assert lines[3] == "| homlora_min_alpha0 | hetlora | 0.100 | - | - | - | 2.900 | - | 30 / 12 |"
  assert lines[4].startswith("| hetlora_alpha0 | hetlora | 0.250 | 0.350 |")


def test_rank_table_shows_the_rounds_where_ranks_fall_and_names_runs_that_keep_them():
  pruned = {"rank_counts_by_round": [(0, {"2": 2, "4": 2}), (1, {"2": 2, "4": 2}), (2, {"1": 1, "2": 1, "4": 2}),
                                     (3, {"1": 1, "2": 1, "4": 2}), (4, {"1": 1, "2": 2, "4": 1})]}
  kept = {"rank_counts_by_round": [(0, {"4": 4}), (1, {"4": 4})]}
  text = compare.rank_markdown({"hetlora_lam_alpha0.5": pruned, "hetlora_alpha0.5": kept})
  assert "| round | r=1 | r=2 | r=4 | mean rank |" in text
  rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
  assert rows == ["| 0 | 0 | 2 | 2 | 3.00 |", "| 2 | 1 | 1 | 2 | 2.75 |", "| 4 | 1 | 2 | 1 | 2.25 |"]
  assert "No client's rank changed in: hetlora_alpha0.5." in text


FAKE_CONFIG = '''
import ml_collections

def get_config(arg=None):
  items = dict(item.partition("=")[::2] for item in filter(None, (arg or "").split(",")))
  c = ml_collections.ConfigDict()
  c.method = ml_collections.ConfigDict({"name": items.get("method", "hetlora")})
  c.data = ml_collections.ConfigDict({"dirichlet_alpha": float(items.get("alpha", 0.5))})
  c.server = ml_collections.ConfigDict({"rounds": 2 if "cpu" in items else 50})
  return c
'''


def test_method_configs_rerun_get_config_then_apply_overrides(tmp_path):
  path = tmp_path / "fake.py"
  path.write_text(FAKE_CONFIG)
  configs = compare.method_configs(f"{path}:cpu,method=ignored,alpha=9", ["hetlora", "flexlora"], ["0.5", "0.1"],
                                   {"server.rounds": 3})
  assert list(configs) == ["hetlora_alpha0.5", "flexlora_alpha0.5", "hetlora_alpha0.1", "flexlora_alpha0.1"]
  c = configs["flexlora_alpha0.1"]
  assert (c.method.name, c.data.dirichlet_alpha, c.server.rounds) == ("flexlora", 0.1, 3)  # loop wins over arg
  assert compare.method_configs(str(path), ["hetlora"], ["0.5"])["hetlora_alpha0.5"].server.rounds == 50
  with pytest.raises(AttributeError):   # locked, like launch/train.py's config
    c.server.roundz = 1
  with pytest.raises(FileNotFoundError, match="--config"):
    compare.method_configs(str(tmp_path / "missing.py"), ["hetlora"], ["0.5"])


def test_natinst_config_runs_side_by_side_one_client_per_task_or_mixed():
  from hetlora import experiment
  configs = compare.method_configs(str(REPO / "configs" / "natinst_smollm2.py") + ":cpu",
                                   ["hetlora", "homlora_min"], ["0", "0.5"])
  assert list(configs) == ["hetlora_alpha0", "homlora_min_alpha0", "hetlora_alpha0.5", "homlora_min_alpha0.5"]
  for name, c in configs.items():
    experiment.validate(c)
    assert c.data.num_clients == 18 and c.server.rounds == 4     # the :cpu budget, 18 seen tasks
    assert c.data.partition == ("natural" if name.endswith("alpha0") else "dirichlet")
  assert configs["hetlora_alpha0.5"].data.dirichlet_alpha == 0.5
  assert configs["homlora_min_alpha0"].lora.rank_choices == (2,)


def test_variants_run_every_method_again_with_their_fields(tmp_path):
  path = tmp_path / "fake.py"
  path.write_text(FAKE_CONFIG)
  variants = dict(map(compare.parse_variant, ["short: server.rounds=4", "flex.1: method.name='flexlora' "
                                                                         "server.rounds=5"]))
  assert variants == {"short": {"server.rounds": 4}, "flex.1": {"method.name": "flexlora", "server.rounds": 5}}
  configs = compare.method_configs(f"{path}:cpu", ["hetlora"], ["0.5"], {"server.rounds": 3}, variants)
  assert list(configs) == ["hetlora_short_alpha0.5", "hetlora_flex.1_alpha0.5"]
  assert configs["hetlora_short_alpha0.5"].server.rounds == 4      # the variant wins over --config.
  assert (configs["hetlora_flex.1_alpha0.5"].method.name, configs["hetlora_flex.1_alpha0.5"].server.rounds) == (
      "flexlora", 5)
  for bad in ("server.rounds=4", "a b: server.rounds=4", "x/y: server.rounds=4", "ok: server.rounds"):
    with pytest.raises(ValueError):
      compare.parse_variant(bad)


SUMMARY = {"rounds": 2, "method": "hetlora", "final_test_accuracy": 0.5, "accuracy_by_round": [(1, 0.4), (2, 0.5)],
           "total_comm_params": 10, "train_seconds": 1.0}


@pytest.mark.parametrize("process", [0, 1])
def test_compare_writes_results_on_process_zero_only(tmp_path, monkeypatch, process):
  monkeypatch.setattr(compare.trainer, "run", lambda cfg, workdir, progress=True: dict(SUMMARY))
  monkeypatch.setattr(compare.jax, "process_index", lambda: process)
  rows = compare.compare({"hetlora_alpha0.5": None}, tmp_path, progress=False)
  assert rows[0]["final_accuracy"] == 0.5
  written = sorted(p.name for p in tmp_path.iterdir())
  assert written == (["accuracy.png", "results.json", "results.md"] if process == 0 else [])


def test_launcher_takes_config_overrides(tmp_path):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  out = subprocess.run(
      [sys.executable, str(REPO / "launch" / "compare.py"), "--config", "configs/banking77.py:cpu",
       "--config.server.rounds=3", "--methods", "hetlora,flexlora", "--alphas", "0.1", "--out", str(tmp_path),
       "--variant", "plain: server.rounds=3", "--variant", "longer: server.rounds=4", "--seeds", "2",
       "--dry_run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  configs = json.loads(out.stdout)
  assert sorted(configs) == ["flexlora_longer_alpha0.1_seed2", "flexlora_plain_alpha0.1_seed2",
                             "hetlora_longer_alpha0.1_seed2", "hetlora_plain_alpha0.1_seed2"]
  for name, c in configs.items():
    assert c["method"]["name"] == name.split("_")[0]
    assert c["server"]["rounds"] == (4 if "longer" in name else 3)     # the override, then the variant
    assert c["data"]["dirichlet_alpha"] == 0.1
    assert c["seed"] == 2
    assert c["model"]["max_len"] == 32               # ':cpu' reached get_config
  assert list(tmp_path.iterdir()) == []              # a dry run trains and writes nothing


def _lora_a2(out, *flags, arg=""):
  env = {**os.environ, "PYTHON": sys.executable, "LORA_A2_ARG": arg,
         "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  return subprocess.run(["bash", str(REPO / "launch" / "lora_a2.sh"), str(out), *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_lora_a2_command_is_the_full_setting_for_the_main_methods(tmp_path):
  out = _lora_a2(tmp_path / "a2", "/models/roberta-base", "--dry_run")
  assert out.returncode == 0, out.stderr[-3000:]
  configs = json.loads(out.stdout)
  assert sorted(configs) == sorted(f"{m}_alpha{a}" for m in ("hetlora", "zero_pad", "homlora_min", "homlora_max",
                                                             "ffa_lora", "flexlora") for a in ("0.5", "0.1"))
  for c in configs.values():
    assert (c["model"]["head"], c["model"]["dtype"], c["model"]["name"]) == ("frozen", "bfloat16",
                                                                            "/models/roberta-base")
    assert (c["server"]["rounds"], c["client"]["local_epochs"], c["data"]["num_clients"],
            c["server"]["clients_per_round"]) == (50, 5.0, 30, 30)


def test_lora_a2_command_trains_a_tiny_roberta_on_banking77(tmp_path, shared_dir):
  from hetlora.models import testing
  model = testing.write_tiny_roberta(tmp_path / "roberta")
  out = _lora_a2(tmp_path / "a2", str(model), "--methods", "hetlora", "--alphas", "0.5",
                 "--config.model.dtype=float32", "--config.server.rounds=1", arg="runlocal")
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "a2" / "results.json").read_text())["summaries"]["hetlora_alpha0.5"]
  assert summary["rounds"] == 1 and 0.0 <= summary["final_test_accuracy"] <= 1.0
  config = json.loads((tmp_path / "a2" / "hetlora_alpha0.5" / "config.json").read_text())
  assert config["model"]["name"] == str(model) and config["model"]["head"] == "frozen"


def test_seeds_repeat_every_run_and_add_a_mean_std_table(tmp_path, monkeypatch):
  path = tmp_path / "fake.py"
  path.write_text(FAKE_CONFIG.replace('c = ml_collections.ConfigDict()', 'c = ml_collections.ConfigDict({"seed": 0})'))
  configs = compare.method_configs(f"{path}:cpu", ["hetlora", "flexlora"], ["0.5"], seeds=[0, 3])
  assert list(configs) == ["hetlora_alpha0.5_seed0", "hetlora_alpha0.5_seed3", "flexlora_alpha0.5_seed0",
                           "flexlora_alpha0.5_seed3"]
  assert [c.seed for c in configs.values()] == [0, 3, 0, 3]
  finals = {"hetlora_alpha0.5_seed0": 0.5, "hetlora_alpha0.5_seed3": 0.7, "flexlora_alpha0.5": 0.2}
  monkeypatch.setattr(compare.trainer, "run", lambda cfg, workdir, progress=True: {
      **SUMMARY, "final_test_accuracy": finals[workdir.name]})
  compare.compare(dict.fromkeys(finals), tmp_path / "out", progress=False)
  table = (tmp_path / "out" / "results.md").read_text()
  std = np.std([0.5, 0.7], ddof=1)
  assert f"| hetlora_alpha0.5_seed* | hetlora | 2 | 0.6000 +- {std:.4f} |" in table
  assert "flexlora_alpha0.5_seed*" not in table        # a run without a seed suffix is not a group


def test_launcher_names_a_seed_that_is_not_an_integer(tmp_path):
  out = subprocess.run([sys.executable, str(REPO / "launch" / "compare.py"), "--config", "configs/banking77.py:cpu",
                        "--seeds", "0,one", "--out", str(tmp_path), "--dry_run"],
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0
  assert "--seeds=0,one must be integers" in out.stderr

