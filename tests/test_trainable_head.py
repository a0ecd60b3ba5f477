"""A classifier head every client trains (dense trainables, ``hetlora/dense.py``) and ``model.head``.

The head's FedAvg against plain numpy, the client's step on it against a
direct gradient, screening and DP covering it, ``model.head`` resolving to
LoRA targets and dense trainables, and a trained head carried through a
run's checkpoint (what a resumed run starts from), its identity and the PEFT
export.
"""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from hetlora import client as client_lib
from hetlora import dense as dense_lib
from hetlora import experiment
from hetlora import lora as lora_lib
from hetlora import methods
from hetlora import privacy
from hetlora import screening
from hetlora import server
from hetlora.models import tiny

K, STEPS, B, D_IN, CLASSES, R_MAX, LR = 4, 1, 6, 5, 3, 4, 0.5
HEAD = r"^head/"
BODY = r"hidden_\d/kernel$"


def test_average_is_the_example_weighted_mean_and_keeps_the_head_without_weight():
  rng = np.random.default_rng(0)
  stacked = {"head": {"kernel": rng.normal(size=(3, 4, 2)).astype(np.float32),
                      "bias": rng.normal(size=(3, 2)).astype(np.float32)}}
  current = {"head": {"kernel": np.zeros((4, 2), np.float32), "bias": np.ones(2, np.float32)}}
  n = np.array([2.0, 0.0, 6.0], np.float32)
  got = dense_lib.average(jax.tree.map(jnp.asarray, stacked), jnp.asarray(n), current)
  for leaf in ("kernel", "bias"):
    want = np.einsum("k,k...->...", n / n.sum(), stacked["head"][leaf])
    np.testing.assert_allclose(np.asarray(got["head"][leaf]), want, rtol=1e-6)
  kept = dense_lib.average(jax.tree.map(jnp.asarray, stacked), jnp.zeros(3), current)
  jax.tree.map(np.testing.assert_array_equal, kept, current)


def _setup(head: str):
  model = tiny.MLPClassifier(hidden=(6,), num_classes=CLASSES)
  base = tiny.init_params(model, jax.random.key(0), D_IN)
  glob = lora_lib.init(jax.random.key(1), base, BODY, R_MAX)
  glob = lora_lib.map_modules(lambda m: {"a": m["a"], "b": 0.1 * jnp.ones_like(m["b"])}, glob)
  spec = client_lib.LocalSpec(tiny.classification_loss(model), optax.sgd(LR), alpha=8.0, dense=head)
  rng = np.random.default_rng(3)
  mask = np.ones((K, STEPS, B), np.float32)
  mask[2, :, 4:] = 0.0                                  # fewer examples
  mask[3] = 0.0                                         # no example: no weight
  x = rng.normal(size=(K, STEPS, B, D_IN)).astype(np.float32)
  x[1, 0, 0, 0] = np.nan                                # a broken client: excluded
  data = {"batch": {"x": x, "label": rng.integers(0, CLASSES, (K, STEPS, B)).astype(np.int32)},
          "mask": mask}
  return model, base, glob, spec, data


def test_round_fedavgs_the_trained_head_over_included_clients_by_examples():
  model, base, glob, spec, data = _setup(HEAD)
  ranks = np.array([1, 2, 4, 3])
  method = methods.get("zero_pad")
  state = server.init(glob, ranks, method, dense=dense_lib.select(base, HEAD))
  n = data["mask"].sum((1, 2))
  new, result = server.make_round(spec, method)(state, base, jnp.arange(K), data, n)
  np.testing.assert_array_equal(np.asarray(result.included), [True, False, True, True])

  def data_loss(head, k):   # the client's objective at its start, written out directly
    s = 8.0 / ranks[k]
    m = (np.arange(R_MAX) < ranks[k]).astype(np.float32)
    lora_eff = {"hidden_0": {"a": glob["hidden_0"]["a"] * m * s, "b": glob["hidden_0"]["b"] * m[:, None]}}
    logits = model.apply({"params": {**base, "head": head}, "lora": lora_eff}, data["batch"]["x"][k, 0])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, data["batch"]["label"][k, 0])
    mask = data["mask"][k, 0]
    return jnp.sum(losses * mask) / max(mask.sum(), 1.0)

  head0 = jax.tree.map(np.asarray, base["head"])
  grad = jax.jit(jax.grad(data_loss), static_argnums=1)
  trained = [jax.tree.map(lambda w, g: w - LR * np.asarray(g), head0, grad(base["head"], k))
             for k in (0, 2)]   # one SGD step each; client 1 excluded, client 3 has no example
  weights = n[[0, 2]] / n[[0, 2]].sum()
  for leaf in ("kernel", "bias"):
    want = sum(w * t[leaf] for w, t in zip(weights, trained))
    np.testing.assert_allclose(np.asarray(new.dense["head"][leaf]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(result.dense["head"][leaf][1]), head0[leaf])   # excluded: start
    np.testing.assert_array_equal(np.asarray(result.dense["head"][leaf][3]), head0[leaf])   # skipped steps
  evaluated, _ = server.eval_models(method, new, base, 8.0, "alpha/r")
  jax.tree.map(np.testing.assert_array_equal, evaluated["head"], new.dense["head"])


def test_frozen_head_stays_bit_identical_and_mismatched_dense_is_refused():
  _, base, glob, spec, data = _setup("")
  method = methods.get("zero_pad")
  state = server.init(glob, np.array([1, 2, 4, 3]), method)
  round_fn = server.make_round(spec, method)
  new, _ = round_fn(state, base, jnp.arange(K), data, data["mask"].sum((1, 2)))
  assert new.dense == {} and "head" not in new.method_state
  evaluated, _ = server.eval_models(method, new, base, 8.0, "alpha/r")
  jax.tree.map(np.testing.assert_array_equal, evaluated["head"], base["head"])
  trained = dense_lib.select(base, HEAD)
  with pytest.raises(ValueError, match="spec.dense=''"):
    round_fn(state.replace(dense=trained), base, jnp.arange(K), data, data["mask"].sum((1, 2)))
  with pytest.raises(ValueError, match="adapted by LoRA too"):
    server.init(lora_lib.init(jax.random.key(1), base, "kernel$", R_MAX), np.ones(4), method, dense=trained)


def test_screening_bounds_and_clips_the_head_with_the_factors():
  start = ({"q": {"a": jnp.zeros((2, 3, 1)), "b": jnp.zeros((2, 1, 1))}}, {"w": jnp.zeros((2, 2))})
  trained = ({"q": {"a": jnp.array([[[3.], [0.], [0.]], [[0.], [0.], [0.]]]), "b": jnp.zeros((2, 1, 1))}},
             {"w": jnp.array([[4., 0.], [100., 0.]])})
  (factors, head), included, norms = screening.screen(screening.Screening(max_norm=10.0, clip_norm=1.0),
                                                      start, trained, jnp.zeros(2))
  np.testing.assert_allclose(np.asarray(norms), [5.0, 100.0])
  assert np.asarray(included).tolist() == [True, False]   # the head alone pushed client 1 out
  np.testing.assert_allclose(np.asarray(head["w"]), [[0.8, 0.0], [0.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(factors["q"]["a"][0, 0]), [0.6], rtol=1e-6)


def test_dp_noises_the_head_like_the_factors():
  z, clip, k = 2.0, 0.5, 4
  lora = {"q": {"a": jnp.zeros((8, 2)), "b": jnp.zeros((2, 8))}}
  head = {"classifier": {"kernel": jnp.zeros((200, 100)), "bias": jnp.zeros(100)}}
  noisy_lora, noisy_head = privacy.add_noise(privacy.Privacy(z, clip), lora, head, jnp.int32(k), "b",
                                             jax.random.key(0))
  values = np.concatenate([np.ravel(x) for x in jax.tree.leaves(noisy_head)])
  np.testing.assert_allclose(np.std(values), z * clip / k, rtol=0.05)
  assert np.all(np.asarray(noisy_lora["q"]["a"]) == 0) and np.any(np.asarray(noisy_lora["q"]["b"]) != 0)


def test_model_head_picks_lora_targets_and_dense_trainables():
  provider = types.SimpleNamespace(DEFAULT_PATTERN=r"query/kernel$", HEAD_PATTERN=r"^classifier/(kernel|bias)$")
  base = {"enc": {"query": {"kernel": np.ones((2, 2))}},
          "classifier": {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}}

  def patterns(head, pattern="", kind="bert_classifier", provider=provider):
    config = ml_collections.ConfigDict(
        {"model": {"kind": kind, "head": head}, "lora": {"pattern": pattern}})
    lora_pattern, dense_pattern = experiment.trainable_patterns(config, provider, base)
    return sorted(lora_lib.modules(lora_lib.init(jax.random.key(0), base, lora_pattern, 2))), \
        dense_lib.paths(dense_lib.select(base, dense_pattern))

  assert patterns(None) == patterns("lora") == (["classifier", "enc/query"], [])
  assert patterns("frozen") == (["enc/query"], [])
  assert patterns("train") == (["enc/query"], ["classifier/bias", "classifier/kernel"])
  with pytest.raises(ValueError, match=r"model\.head='bogus' must be one of"):
    patterns("bogus")
  with pytest.raises(ValueError, match=r"lora\.pattern=.*selects the head's \['classifier/kernel'\]"):
    patterns("train", pattern=r"kernel$")
  no_head = types.SimpleNamespace(DEFAULT_PATTERN=r"query/kernel$")
  assert patterns(None, provider=no_head) == (["enc/query"], [])
  with pytest.raises(ValueError, match=r"model\.head='train'.*has no task head"):
    patterns("train", kind="llama_lm", provider=no_head)


def test_trained_head_is_checkpointed_part_of_the_identity_and_exported(tmp_path, tiny_model_dirs):
  from test_trainer import _tiny   # the main job on a tiny BERT (skips without its data package)
  from hetlora import trainer
  from hetlora import workdir as workdir_lib
  from hetlora.export import peft, workdir_adapter

  config = lambda head: _tiny(tiny_model_dirs["bert_classifier"], **{"server.rounds": 1, "model.head": head})
  trainer.run(config("train"), tmp_path, progress=False)
  exp = experiment.build(config("train"))
  restore = trainer._restore   # pylint: disable=protected-access
  manager, step, state = restore(tmp_path, exp.config, exp.init_state, writes=False)   # a resume's start
  manager.close()
  drawn = exp.init_state.dense["classifier"]
  assert step == 1 and not np.allclose(state.dense["classifier"]["kernel"], drawn["kernel"])
  identity = json.loads((tmp_path / workdir_lib.IDENTITY_FILE).read_text())
  assert identity["config"]["model.head"] == "train"
  assert identity["derived"]["dense_shapes"] == {"classifier/bias": [3], "classifier/kernel": [32, 3]}
  frozen = experiment.build(config("frozen"))
  assert frozen.init_state.dense == {} and "classifier" not in lora_lib.modules(frozen.global_lora)
  jax.tree.map(np.testing.assert_array_equal, frozen.base_params["classifier"], drawn)   # same seed, same head
  with pytest.raises(ValueError, match=r'model\.head: "train" -> "frozen"'):
    workdir_lib.check_identity(tmp_path, workdir_lib.identity(frozen.config, frozen))

  exported = workdir_adapter.from_workdir(tmp_path)
  assert "classifier" not in exported.modules
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(exported.extra[f"classifier/{leaf}"], state.dense["classifier"][leaf])
  peft.export(exported, tmp_path / "peft")
  tensors = load_file(str(tmp_path / "peft" / peft.ADAPTER_FILE))
  extra = exported.extra
  np.testing.assert_array_equal(tensors[peft.PREFIX + "classifier.weight"], extra["classifier/kernel"].T)
  np.testing.assert_array_equal(tensors[peft.PREFIX + "classifier.bias"], extra["classifier/bias"])
  assert json.loads((tmp_path / "peft" / peft.CONFIG_FILE).read_text())["modules_to_save"] == ["classifier"]


def test_checkpoint_of_a_run_without_dense_trainables_keeps_its_layout(tmp_path):
  from hetlora import trainer
  _, base, glob, _, _ = _setup("")
  state = server.init(glob, np.array([1, 2, 4, 3]), methods.get("zero_pad"))
  assert set(server.checkpoint_tree(state)) == {"method_state", "client_ranks", "round"}   # as before
  config = ml_collections.ConfigDict({"checkpoints_to_keep": 2})
  saved = state.replace(round=jnp.int32(3), client_ranks=jnp.array([4, 4, 1, 1], jnp.int32))
  with trainer._checkpoint_manager(tmp_path, config) as manager:   # pylint: disable=protected-access
    manager.save(3, args=trainer.ocp.args.StandardSave(server.checkpoint_tree(saved)))
    manager.wait_until_finished()
  restore = trainer._restore   # pylint: disable=protected-access
  manager, step, restored = restore(tmp_path, config, state, writes=False)
  manager.close()
  assert step == 3 and restored.dense == {}
  jax.tree.map(np.testing.assert_array_equal, restored, saved)
