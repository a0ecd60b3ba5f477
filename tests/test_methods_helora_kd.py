"""HeLoRA-KD: rank groups, within-group FedAvg, deep mutual learning on public data."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hetlora import client as client_lib
from hetlora.methods import helora_kd
from hetlora import lora as lora_lib
from hetlora import methods
from hetlora import server
from hetlora.models import tiny
import methods_reference as ref

GROUPS = (1, 2, 4)
R_MAX, D_IN, D_OUT = 4, 5, 3


@hypothesis.given(t=st.floats(0.5, 4.0), seed=st.integers(0, 100))
def test_kd_loss_matches_reference(t, seed):
  rng = np.random.default_rng(seed)
  z, y = rng.normal(size=(2, 6, 5)) * 3
  got = helora_kd.kd_loss(jnp.float32(z), jnp.float32(y), t)
  np.testing.assert_allclose(got, ref.kd_loss(z, y, t), rtol=1e-4, atol=1e-6)


def test_group_aggregation_matches_loops_and_marks_absent_groups():
  ranks, n = [2, 1, 2, 2], [1.0, 4.0, 2.0, 5.0]
  rng = np.random.default_rng(0)
  a_l, b_l = ref.random_clients(rng, 4, D_IN, D_OUT, R_MAX, ranks)
  out, present = helora_kd.aggregate(ref.to_tree(a_l, b_l), jnp.array(ranks), jnp.array(n),
                                     jnp.array(GROUPS))
  assert present.tolist() == [True, True, False]
  for g, rank in enumerate(GROUPS):
    members = [k for k, r in enumerate(ranks) if r == rank]
    total = sum(n[k] for k in members)
    want_a = sum((n[k] / total * a_l[k] for k in members), np.zeros((D_IN, R_MAX)))
    want_b = sum((n[k] / total * b_l[k] for k in members), np.zeros((R_MAX, D_OUT)))
    np.testing.assert_allclose(out["q"]["a"][g], want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["q"]["b"][g], want_b, rtol=1e-5, atol=1e-6)


def test_distribute_gives_each_client_its_group_model():
  groups = jnp.array(GROUPS)
  lora = helora_kd.init_groups({"q": {"a": jnp.ones((D_IN, R_MAX)), "b": jnp.ones((R_MAX, D_OUT))}}, groups)
  lora = jax.tree.map(lambda x: x * jnp.arange(1.0, 4.0).reshape((3,) + (1,) * (x.ndim - 1)), lora)
  out = helora_kd.distribute(lora, jnp.array([4, 1, 2]), groups)["q"]["a"]
  assert [float(out[k, 0, 0]) for k in range(3)] == [3.0, 1.0, 2.0]
  assert [int(np.count_nonzero(out[k, 0])) for k in range(3)] == [4, 1, 2]


def _setup():
  model = tiny.MLPClassifier(hidden=(8,), num_classes=3)
  base = tiny.init_params(model, jax.random.key(0), D_IN)
  logits_fn = lambda b, l, batch: model.apply({"params": b, "lora": l}, batch["x"])
  lora = lora_lib.init(jax.random.key(1), base, "(hidden_0|head)/kernel$", R_MAX)
  groups = helora_kd.init_groups(lora, jnp.array(GROUPS))
  # Give the groups different (non-zero) b so that they disagree.
  keys = iter(jax.random.split(jax.random.key(2), 8))
  groups = lora_lib.map_modules(
      lambda m: {"a": m["a"], "b": jax.random.normal(next(keys), m["b"].shape)}, groups)
  groups = jax.vmap(lora_lib.mask)(groups, jnp.array(GROUPS))
  rng = np.random.default_rng(0)
  public = {"batch": {"x": jnp.float32(rng.normal(size=(4, 16, D_IN))),
                      "label": jnp.int32(rng.integers(0, 3, size=(4, 16)))},
            "mask": jnp.ones((4, 16)).at[3, 8:].set(0.0)}
  return model, base, logits_fn, groups, public


def test_distillation_loss_falls_and_respects_ranks():
  _, base, logits_fn, groups, public = _setup()
  spec = helora_kd.KDSpec(logits_fn, alpha=4.0, epochs=6, learning_rate=1e-2)
  out, losses = jax.jit(functools.partial(helora_kd.distill, spec))(base, groups, jnp.array(GROUPS), public)
  losses = np.asarray(losses)
  assert losses.shape == (6, 3)
  assert np.all(losses[-1] < 0.5 * losses[0]), losses
  for g, r in enumerate(GROUPS):
    assert not np.any(np.asarray(out["head"]["b"][g, r:]))


def test_first_distillation_loss_matches_numpy():
  model, base, logits_fn, groups, public = _setup()
  spec = helora_kd.KDSpec(logits_fn, alpha=4.0, epochs=1, temperature=2.0)
  _, losses = helora_kd.distill(spec, base, groups, jnp.array(GROUPS),
                                jax.tree.map(lambda x: x[:1], public))
  z = np.stack([np.asarray(logits_fn(base, lora_lib.fold_scale(
      jax.tree.map(lambda x: x[g], groups), jnp.int32(r), lora_lib.scale(r, 4.0, "alpha/r", R_MAX)),
      jax.tree.map(lambda x: x[0], public["batch"])), np.float64) for g, r in enumerate(GROUPS)])
  want = [ref.kd_loss(z[g], z.mean(axis=0), 2.0).mean() for g in range(3)]
  np.testing.assert_allclose(losses[0], want, rtol=1e-4)


def test_round_with_rank_groups():
  model, base, logits_fn, _, public = _setup()
  method = methods.get("helora_kd", group_ranks=GROUPS, logits_fn=logits_fn, alpha=4.0, epochs=2)
  spec = client_lib.LocalSpec(tiny.classification_loss(model), optax.adam(1e-2), alpha=4.0)
  lora = lora_lib.init(jax.random.key(1), base, "(hidden_0|head)/kernel$", R_MAX)
  state = server.init(lora, np.array([1, 2, 4, 4]), method)
  assert state.method_state["head"]["a"].shape == (3, 8, R_MAX)
  rng = np.random.default_rng(1)
  data = {"batch": {"x": jnp.float32(rng.normal(size=(3, 2, 4, D_IN))),
                    "label": jnp.int32(rng.integers(0, 3, size=(3, 2, 4)))},
          "mask": jnp.ones((3, 2, 4))}
  round_fn = server.make_round(spec, method)
  new_state, _ = round_fn(state, base, jnp.array([0, 2, 3]), data, jnp.ones(3), public=public)
  assert new_state.method_state["head"]["a"].shape == (3, 8, R_MAX)
  assert np.all(np.isfinite(np.asarray(new_state.method_state["head"]["b"])))
  with pytest.raises(ValueError, match="group_ranks"):
    server.init(lora, np.array([1, 3]), method)
  with pytest.raises(ValueError, match="public"):
    round_fn(state, base, jnp.array([0, 2, 3]), data, jnp.ones(3))
