"""FLoRA: exact stacking, fresh client adapters, merging into the server's base."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hetlora import client as client_lib
from hetlora.methods import flora
from hetlora import lora as lora_lib
from hetlora import methods
from hetlora import server
from hetlora.models import tiny
import methods_reference as ref

R_MAX, D_IN, D_OUT = 3, 6, 4


@hypothesis.given(ranks=st.lists(st.integers(1, R_MAX), min_size=3, max_size=3),
                  n=st.lists(st.floats(0.5, 20.0), min_size=3, max_size=3),
                  scales=st.lists(st.floats(0.1, 4.0), min_size=3, max_size=3))
def test_stacked_product_is_the_weighted_sum_of_updates(ranks, n, scales):
  rng = np.random.default_rng(sum(ranks))
  a_l, b_l = ref.random_clients(rng, 3, D_IN, D_OUT, R_MAX, ranks)
  out = flora.stack(ref.to_tree(a_l, b_l), jnp.array(ranks), jnp.array(n), jnp.array(scales))["q"]
  assert out["a"].shape == (D_IN, 3 * R_MAX) and out["b"].shape == (3 * R_MAX, D_OUT)
  got = np.asarray(out["a"], np.float64) @ np.asarray(out["b"], np.float64)
  assert ref.rel_err(got, ref.weighted_update(a_l, b_l, ranks, n, scales)) <= 1e-5


def test_slots_beyond_a_rank_never_leak():
  rng = np.random.default_rng(0)
  a_l, b_l = ref.random_clients(rng, 2, D_IN, D_OUT, R_MAX, [R_MAX, R_MAX])
  out = flora.stack(ref.to_tree(a_l, b_l), jnp.array([1, 2]), jnp.ones(2), jnp.ones(2))["q"]
  got = np.asarray(out["a"], np.float64) @ np.asarray(out["b"], np.float64)
  assert ref.rel_err(got, ref.weighted_update(a_l, b_l, [1, 2], [1, 1], [1, 1])) <= 1e-5


def test_fresh_adapters_are_random_masked_and_start_at_zero():
  like = {"x": {"q": {"a": jnp.zeros((D_IN, R_MAX)), "b": jnp.zeros((R_MAX, D_OUT))}}}
  out = flora.fresh(jax.random.key(0), like, jnp.array([1, 3]))["x"]["q"]
  a = np.asarray(out["a"])
  assert a.shape == (2, D_IN, R_MAX) and not np.any(np.asarray(out["b"]))
  assert not np.any(a[0, :, 1:]) and np.all(a[1] != 0)
  assert np.all(np.abs(a) <= 1 / np.sqrt(D_IN))
  assert not np.allclose(a[0, :, 0], a[1, :, 0])


def test_round_merges_the_stacked_update_into_base_delta():
  model = tiny.Linear(D_OUT)
  base = tiny.init_params(model, jax.random.key(1), D_IN)
  spec = client_lib.LocalSpec(tiny.squared_loss(model), optax.sgd(0.1), alpha=2.0, scale_rule="alpha/r")
  method = methods.get("flora")
  ranks = np.array([1, 3], np.int32)
  state = server.init(lora_lib.init(jax.random.key(2), base, "linear/kernel$", R_MAX), ranks, method)
  rng = np.random.default_rng(0)
  data = {"batch": {"x": jnp.float32(rng.normal(size=(2, 2, 5, D_IN))),
                    "y": jnp.float32(rng.normal(size=(2, 2, 5, D_OUT)))},
          "mask": jnp.ones((2, 2, 5))}
  round_fn = server.make_round(spec, method)
  cohort, n = jnp.arange(2), jnp.array([3.0, 1.0])

  new_state, result = round_fn(state, base, cohort, data, n, key=jax.random.key(3))
  trained = result.lora["linear"]
  want = ref.weighted_update(np.asarray(trained["a"], np.float64), np.asarray(trained["b"], np.float64),
                             ranks, [3, 1], [2.0, 2.0 / 3])
  assert ref.rel_err(new_state.method_state["base_delta"]["linear"], want) <= 1e-5
  assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(new_state.method_state["lora"]))
  merged = method.effective_base(new_state.method_state, base)["linear"]["kernel"]
  np.testing.assert_allclose(merged, base["linear"]["kernel"] + new_state.method_state["base_delta"]["linear"], rtol=1e-6)

  # The next round trains fresh adapters on W0 + base_delta, not on W0.
  _, result2 = round_fn(new_state, base, cohort, data, n, key=jax.random.key(4))
  start = flora.fresh(jax.random.key(4), new_state.method_state["lora"], jnp.asarray(ranks))
  train = client_lib.vmap_backend(spec)
  on_merged = train(method.effective_base(new_state.method_state, base), start, jnp.asarray(ranks), data)
  on_w0 = train(base, start, jnp.asarray(ranks), data)
  np.testing.assert_allclose(result2.loss, on_merged.loss, rtol=1e-6)
  assert not np.allclose(result2.loss, on_w0.loss, rtol=1e-3)
