import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

from hetlora import aggregation, client, lora as lora_lib
from hetlora.methods import hetlora as hetlora_method
from hetlora.models import tiny

import numpy_reference as ref

D_IN, D_OUT, R_MAX = 6, 3, 4


def _linear(seed=0):
  model = tiny.Linear(D_OUT)
  base = tiny.init_params(model, jax.random.key(seed), D_IN)
  return model, base


def _regression_data(rng, k, steps, batch, counts=None):
  x = rng.normal(size=(k, steps, batch, D_IN)).astype(np.float32)
  y = rng.normal(size=(k, steps, batch, D_OUT)).astype(np.float32)
  mask = np.ones((k, steps, batch), np.float32)
  if counts is not None:  # client k has counts[k] real examples, laid out in order
    flat = mask.reshape(k, -1)
    for i, c in enumerate(counts):
      flat[i, c:] = 0.0
    mask = flat.reshape(k, steps, batch)
  return {"batch": {"x": x, "y": y}, "mask": mask}


def _nonzero_lora(base, seed):
  lora = lora_lib.init(jax.random.key(seed), base, "linear", R_MAX)
  rng = np.random.default_rng(seed)
  return {"linear": {"a": lora["linear"]["a"],
                     "b": jnp.asarray(rng.normal(size=(R_MAX, D_OUT)) * 0.3, jnp.float32)}}


@pytest.mark.parametrize("rank,lam,prune", [(1, 0.0, False), (3, 0.5, True), (4, 2.0, True)])
def test_local_train_matches_numpy_sgd(rank, lam, prune):
  model, base = _linear()
  lora = _nonzero_lora(base, 1)
  data = _regression_data(np.random.default_rng(2), 1, 5, 4, counts=[17])
  data = jax.tree.map(lambda x: x[0], data)
  spec = client.LocalSpec(tiny.squared_loss(model), optax.sgd(0.05), alpha=2.0,
                          local=hetlora_method.local(lam=lam, gamma=0.7, r_min=1, prune=prune))
  out = jax.jit(lambda l, r, d: client.local_train(spec, base, l, r, d))(lora, jnp.int32(rank), data)
  s = ref.scale(rank, 2.0, "alpha/r", R_MAX)
  a, b, new_rank, loss = ref.linear_local_sgd(
      np.asarray(base["linear"]["kernel"], np.float64), np.asarray(lora["linear"]["a"]),
      np.asarray(lora["linear"]["b"]), rank, data["batch"]["x"], data["batch"]["y"], data["mask"],
      lr=0.05, s=s, lam=lam, gamma=0.7, prune=prune)
  assert int(out.rank) == new_rank
  np.testing.assert_allclose(np.asarray(out.lora["linear"]["a"]), a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.lora["linear"]["b"]), b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(out.loss), loss, rtol=1e-5)
  assert float(out.examples) == 17.0
  if lam == 2.0:
    assert new_rank < rank  # the strong tail penalty shrank the tail, so the rank was pruned


def test_pruning_drops_one_rank_at_gamma_099_and_respects_r_min():
  ranks = jnp.array([1, 3, 4, 10, 50], jnp.int32)
  got = hetlora_method.pruned_rank(ranks, jnp.ones(5), jnp.zeros(5), 0.99, 3)
  np.testing.assert_array_equal(np.asarray(got), [1, 3, 3, 9, 49])
  same = hetlora_method.pruned_rank(ranks, jnp.zeros(5), jnp.ones(5), 0.99, 3)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(ranks))


def test_regulariser_gradient_flows_through_tail():
  lora = {"m": {"a": jnp.ones((3, 4)), "b": jnp.ones((4, 2))}}
  g = jax.grad(lambda l: hetlora_method.tail_score(l, jnp.int32(4), 0.5))(lora)
  assert float(jnp.abs(g["m"]["a"][:, 2:]).sum()) > 0
  assert float(jnp.abs(g["m"]["a"][:, :2]).sum()) == 0.0
  zero = {"m": {"a": jnp.zeros((3, 4)), "b": jnp.zeros((4, 2))}}
  assert bool(jnp.all(jnp.isfinite(jax.grad(lambda l: hetlora_method.tail_score(l, jnp.int32(4), 0.5))(zero)["m"]["a"])))


def test_all_padding_client_is_unchanged_even_with_momentum():
  model, base = _linear()
  lora = _nonzero_lora(base, 3)
  data = _regression_data(np.random.default_rng(0), 1, 3, 4, counts=[0])
  data = jax.tree.map(lambda x: x[0], data)
  spec = client.LocalSpec(tiny.squared_loss(model), optax.adam(0.1), alpha=1.0)
  out = client.local_train(spec, base, lora, jnp.int32(R_MAX), data)
  np.testing.assert_array_equal(np.asarray(out.lora["linear"]["b"]), np.asarray(lora["linear"]["b"]))
  assert float(out.examples) == 0.0


@settings(max_examples=10)
@given(st.lists(st.integers(1, R_MAX), min_size=2, max_size=4), st.integers(0, 100))
def test_masked_slots_stay_zero_and_ranks_never_grow(ranks, seed):
  model, base = _linear()
  k = len(ranks)
  glob = _nonzero_lora(base, seed)
  stacked = lora_lib.truncate(glob, jnp.asarray(ranks, jnp.int32))
  data = _regression_data(np.random.default_rng(seed), k, 2, 3)
  spec = client.LocalSpec(tiny.squared_loss(model), optax.adamw(0.05), alpha=4.0,
                          local=hetlora_method.local(lam=1.0, gamma=0.5, prune=True))
  out = _TRAIN_CACHE.setdefault(k, client.vmap_backend(spec))(base, stacked, jnp.asarray(ranks, jnp.int32), data)
  new = np.asarray(out.rank)
  assert np.all(new <= np.asarray(ranks)) and np.all(new >= 1)
  for i, r in enumerate(new):
    assert float(jnp.abs(out.lora["linear"]["a"][i, :, r:]).max(initial=0.0)) == 0.0
    assert float(jnp.abs(out.lora["linear"]["b"][i, r:, :]).max(initial=0.0)) == 0.0


_TRAIN_CACHE = {}


def test_fedavg_one_sgd_step_equals_centralized_step():
  model, base = _linear()
  glob = _nonzero_lora(base, 4)
  counts = [3, 8, 5]
  data = _regression_data(np.random.default_rng(5), 3, 1, 8, counts=counts)
  spec = client.LocalSpec(tiny.squared_loss(model), optax.sgd(0.1), alpha=4.0, scale_rule="alpha/r_max")
  ranks = jnp.full(3, R_MAX, jnp.int32)
  out = client.vmap_backend(spec)(base, lora_lib.truncate(glob, ranks), ranks, data)
  fed = aggregation.example_average(out.lora, out.rank, jnp.asarray(counts, jnp.float32), jnp.ones(3))
  keep = data["mask"].reshape(-1) > 0
  central = {"batch": jax.tree.map(lambda x: x.reshape(-1, *x.shape[3:])[keep][None], data["batch"]),
             "mask": np.ones((1, sum(counts)), np.float32)}
  cen = client.local_train(spec, base, glob, jnp.int32(R_MAX), central)
  for f in ("a", "b"):
    np.testing.assert_allclose(np.asarray(fed["linear"][f]), np.asarray(cen.lora["linear"][f]),
                               rtol=1e-5, atol=1e-6)


def _mlp_round_inputs(k=5, steps=3, batch=4, seed=0):
  model = tiny.MLPClassifier(hidden=(16,), num_classes=3)
  base = tiny.init_params(model, jax.random.key(seed), 8)
  glob = lora_lib.init(jax.random.key(seed + 1), base, "kernel", 6)
  rng = np.random.default_rng(seed)
  data = {"batch": {"x": rng.normal(size=(k, steps, batch, 8)).astype(np.float32),
                    "label": rng.integers(0, 3, (k, steps, batch)).astype(np.int32)},
          "mask": (rng.uniform(size=(k, steps, batch)) < 0.8).astype(np.float32)}
  return model, base, glob, data


def test_sequential_backend_names_failing_client():
  model, base, glob, data = _mlp_round_inputs(k=3)
  bad = jax.tree.map(np.copy, data)
  bad["batch"]["x"][1, 0, 0, 0] = np.nan
  bad["mask"][1] = 1.0
  spec = client.LocalSpec(tiny.classification_loss(model), optax.sgd(1e-2), alpha=1.0)
  train = client.sequential_backend(spec)
  ranks = jnp.array([2, 3, 4], jnp.int32)
  with pytest.raises(FloatingPointError, match="cohort client 1"):
    train(base, lora_lib.truncate(glob, ranks), ranks, bad)
  with pytest.raises(ValueError, match="client.backend"):
    client.make_backend("threads", spec)
