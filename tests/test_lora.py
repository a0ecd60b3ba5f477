import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hetlora import lora as lora_lib
from hetlora.models import tiny

import numpy_reference as ref


def _base():
  model = tiny.MLPClassifier(hidden=(6, 5), num_classes=3)
  return model, tiny.init_params(model, jax.random.key(0), 4)


def test_init_selects_kernels_by_regex_and_starts_at_zero_update():
  model, base = _base()
  lora = lora_lib.init(jax.random.key(1), base, r"hidden_\d/kernel", r_max=3)
  assert set(lora) == {"hidden_0", "hidden_1"}
  assert lora["hidden_0"]["a"].shape == (4, 3)
  assert lora["hidden_1"]["b"].shape == (3, 5)
  assert float(jnp.abs(lora["hidden_1"]["b"]).max()) == 0.0
  bound = 1 / np.sqrt(4)
  assert float(jnp.abs(lora["hidden_0"]["a"]).max()) <= bound
  x = jax.random.normal(jax.random.key(2), (7, 4))
  plain = model.apply({"params": base}, x)
  eff = lora_lib.fold_scale(lora, jnp.int32(2), lora_lib.scale(2, 8.0, "alpha/r", 3))
  adapted = model.apply({"params": base, "lora": eff}, x)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(adapted))


def test_init_errors_name_the_field():
  _, base = _base()
  with pytest.raises(ValueError, match="lora.pattern"):
    lora_lib.init(jax.random.key(0), base, "nothing_matches", 4)
  with pytest.raises(ValueError, match="r_max"):
    lora_lib.init(jax.random.key(0), base, "head", 0)
  with pytest.raises(ValueError, match="scale_rule"):
    lora_lib.scale(2, 1.0, "alpha/2r", 4)


@pytest.mark.parametrize("rule", lora_lib.SCALE_RULES)
def test_scale_rules_match_reference(rule):
  ranks = np.array([0, 1, 3, 8])
  got = lora_lib.scale(jnp.asarray(ranks), 16.0, rule, 8)
  want = [ref.scale(int(r), 16.0, rule, 8) for r in ranks]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 1000))
def test_mask_truncate_delta_match_reference(r_max, rank, seed):
  rank = min(rank, r_max)
  rng = np.random.default_rng(seed)
  a, b = rng.normal(size=(5, r_max)), rng.normal(size=(r_max, 3))
  tree = {"m": {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}}
  masked = lora_lib.mask(tree, jnp.int32(rank))
  pa, pb = ref.pad_to(a, b, rank, r_max)
  np.testing.assert_allclose(np.asarray(masked["m"]["a"]), pa, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(masked["m"]["b"]), pb, rtol=1e-6)
  s = ref.scale(rank, 4.0, "alpha/r", r_max)
  dw = lora_lib.delta(tree, jnp.int32(rank), jnp.float32(s))["m"]
  np.testing.assert_allclose(np.asarray(dw), ref.dense_update(a, b, rank, s), rtol=1e-5, atol=1e-6)
  stacked = lora_lib.truncate(tree, jnp.array([rank, r_max], jnp.int32))
  np.testing.assert_allclose(np.asarray(stacked["m"]["a"][0]), pa, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stacked["m"]["a"][1]), a, rtol=1e-6)


def test_fold_scale_forward_equals_merged_kernel():
  model, base = _base()
  lora = lora_lib.init(jax.random.key(1), base, "kernel", r_max=4)
  lora = jax.tree.map(lambda x: x + 0.1, lora)
  rank, s = jnp.int32(3), jnp.float32(2.5)
  x = jax.random.normal(jax.random.key(2), (7, 4))
  adapted = model.apply({"params": base, "lora": lora_lib.fold_scale(lora, rank, s)}, x)
  merged = model.apply({"params": lora_lib.merge(base, lora, rank, s)}, x)
  np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), rtol=1e-5, atol=1e-5)


def test_resize_pads_and_slices():
  tree = {"m": {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 4))}}
  big = lora_lib.resize(tree, 5)
  assert big["m"]["a"].shape == (2, 5) and big["m"]["b"].shape == (5, 4)
  assert float(big["m"]["a"][:, 3:].sum()) == 0.0
  small = lora_lib.resize(big, 2)
  assert small["m"]["b"].shape == (2, 4)


def test_num_params_counts_rank_times_dims():
  _, base = _base()
  lora = lora_lib.init(jax.random.key(1), base, "kernel", r_max=4)
  assert int(lora_lib.num_params(lora, 2)) == 2 * ((4 + 6) + (6 + 5) + (5 + 3))
