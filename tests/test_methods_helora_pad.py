"""HeLoRA-Pad against a slot-by-slot numpy reference."""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

from hetlora import aggregation
from hetlora import methods
from hetlora.methods import helora_pad
import methods_reference as ref

R_MAX, D_IN, D_OUT = 4, 5, 3


def _run(ranks, n, padding, weighting, seed=0):
  rng = np.random.default_rng(seed)
  a_l, b_l = ref.random_clients(rng, len(ranks), D_IN, D_OUT, R_MAX, ranks)
  out = helora_pad.aggregate(ref.to_tree(a_l, b_l), jnp.array(ranks, jnp.int32),
                              jnp.array(n, jnp.float32), jnp.ones(len(ranks)),
                              padding=padding, weighting=weighting)
  want = ref.helora_pad(a_l, b_l, ranks, n, padding, weighting, R_MAX)
  return out["q"], want, (a_l, b_l)


@pytest.mark.parametrize("padding", helora_pad.PADDINGS)
@pytest.mark.parametrize("weighting", helora_pad.WEIGHTINGS)
def test_matches_reference(padding, weighting):
  out, (a_want, b_want), _ = _run([1, 3, 4, 2], [10., 3., 7., 1.], padding, weighting)
  assert ref.rel_err(out["a"], a_want) <= 1e-5
  assert ref.rel_err(out["b"], b_want) <= 1e-5


@hypothesis.given(
    ranks=st.lists(st.integers(1, R_MAX), min_size=3, max_size=3),
    data=st.data(),
    padding=st.sampled_from(helora_pad.PADDINGS),
)
def test_property_matches_reference(ranks, data, padding):
  n = data.draw(st.lists(st.floats(0.5, 50.0), min_size=len(ranks), max_size=len(ranks)))
  out, (a_want, b_want), _ = _run(ranks, n, padding, "examples_x_rank", seed=len(ranks))
  assert ref.rel_err(out["a"], a_want) <= 1e-5
  assert ref.rel_err(out["b"], b_want) <= 1e-5


@hypothesis.given(ranks=st.lists(st.integers(1, R_MAX), min_size=3, max_size=3),
                  padding=st.sampled_from(helora_pad.PADDINGS))
def test_padding_keeps_trained_slots(ranks, padding):
  rng = np.random.default_rng(1)
  a_l, b_l = ref.random_clients(rng, len(ranks), D_IN, D_OUT, R_MAX, ranks)
  padded = helora_pad.pad(ref.to_tree(a_l, b_l), jnp.array(ranks), padding)["q"]
  for k, r in enumerate(ranks):
    np.testing.assert_array_equal(np.asarray(padded["a"][k, :, :r]), np.float32(a_l[k][:, :r]))
    np.testing.assert_array_equal(np.asarray(padded["b"][k, :r]), np.float32(b_l[k][:r]))


def test_equal_full_ranks_with_example_weights_is_fedavg():
  ranks, n = [R_MAX] * 3, [4., 1., 2.]
  out, _, (a_l, b_l) = _run(ranks, n, "linear", "examples")
  avg = aggregation.example_average(ref.to_tree(a_l, b_l), jnp.array(ranks), jnp.array(n), jnp.ones(3))["q"]
  np.testing.assert_allclose(out["a"], avg["a"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out["b"], avg["b"], rtol=1e-6, atol=1e-7)


def test_equal_ranks_below_r_max_agree_with_fedavg_on_the_client_slots():
  ranks, n = [2, 2, 2], [4., 1., 2.]
  out, _, (a_l, b_l) = _run(ranks, n, "linear", "examples")
  avg = aggregation.example_average(ref.to_tree(a_l, b_l), jnp.array(ranks), jnp.array(n), jnp.ones(3))["q"]
  np.testing.assert_allclose(out["a"][:, :2], avg["a"][:, :2], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(out["b"][:2], avg["b"][:2], rtol=1e-6, atol=1e-7)


def test_zero_padding_with_example_weights_is_zero_pad():
  ranks, n = [1, 4, 2], [3., 2., 5.]
  out, _, (a_l, b_l) = _run(ranks, n, "zero", "examples")
  want = aggregation.example_average(ref.to_tree(a_l, b_l), jnp.array(ranks), jnp.array(n), jnp.ones(3))["q"]
  np.testing.assert_allclose(out["a"], want["a"], rtol=1e-6, atol=1e-7)


def test_registered_and_validated():
  agg = methods.get("helora_pad", padding="mean", weighting="rank").aggregate
  lora = ref.to_tree(*ref.random_clients(np.random.default_rng(0), 2, D_IN, D_OUT, R_MAX, [1, 2]))
  assert agg(lora, jnp.array([1, 2]), jnp.ones(2), jnp.ones(2))["q"]["a"].shape == (D_IN, R_MAX)
  with pytest.raises(ValueError, match="padding"):
    helora_pad.aggregate(lora, jnp.array([1, 2]), jnp.ones(2), jnp.ones(2), padding="cubic")
  with pytest.raises(ValueError, match="weighting"):
    helora_pad.aggregate(lora, jnp.array([1, 2]), jnp.ones(2), jnp.ones(2), weighting="norm")
  with pytest.raises(ValueError, match=r"method\.kwargs\.padding"):
    methods.get("helora_pad", padding="cubic")


@pytest.mark.parametrize("padding", ["linear", "mean", "adjacent"])
@pytest.mark.parametrize("rank", [1, 2, R_MAX - 1])
def test_copying_agreeing_slots_multiplies_the_product_by_r_max_over_r(padding, rank):
  # The scale assumption in the module docstring: a client whose trained slots agree has a padded
  # product r_max / r_k times its trained one, i.e. its own update read at r_max under alpha/r.
  rng = np.random.default_rng(rank)
  u, v = rng.normal(size=(D_IN, 1)), rng.normal(size=(1, D_OUT))
  if padding == "mean":        # the scalar fill agrees with the slots only for constant factors
    u, v = np.full((D_IN, 1), 0.3), np.full((1, D_OUT), -1.2)
  a = np.zeros((1, D_IN, R_MAX), np.float32)
  b = np.zeros((1, R_MAX, D_OUT), np.float32)
  a[0, :, :rank], b[0, :rank] = u, v
  padded = helora_pad.pad({"q": {"a": jnp.asarray(a), "b": jnp.asarray(b)}}, jnp.array([rank]), padding)["q"]
  product = np.asarray(padded["a"][0] @ padded["b"][0], np.float64)
  trained = rank * (u @ v)
  np.testing.assert_allclose(product, R_MAX / rank * trained, rtol=1e-5, atol=1e-6)
  alpha = 16.0      # under alpha/r: read at r_max, the padded adapter is the client's own update
  np.testing.assert_allclose(alpha / R_MAX * product, alpha / rank * trained, rtol=1e-5, atol=1e-6)
