"""FlexLoRA: factored SVD against dense numpy SVDs, distribution, special cases."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hetlora.methods import flexlora
from hetlora.methods import flora
from hetlora import lora as lora_lib
from hetlora import methods
import methods_reference as ref

R_MAX, D_IN, D_OUT = 4, 9, 7


def _product(mod):
  return np.asarray(mod["a"], np.float64) @ np.asarray(mod["b"], np.float64)


@pytest.mark.parametrize("shape", [(8, 3, 6), (5, 12, 4), (3, 7, 9), (30, 6, 20)])
@pytest.mark.parametrize("r", [2, 4])
def test_top_factors_match_dense_svd_up_to_sign(shape, r):
  d_in, width, d_out = shape
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(d_in, width)), rng.normal(size=(width, d_out))
  u, svt = jax.jit(flexlora.top_factors, static_argnums=2)(jnp.float32(a), jnp.float32(b), r)
  u_np, s_np, vt_np = np.linalg.svd(a @ b, full_matrices=False)
  q = min(d_in, d_out, width, r)
  assert u.shape == (d_in, r) and svt.shape == (r, d_out)
  signs = np.sign(np.sum(np.asarray(u[:, :q]) * u_np[:, :q], axis=0))
  assert ref.rel_err(np.asarray(u[:, :q]) * signs, u_np[:, :q]) <= 1e-5
  assert ref.rel_err(np.asarray(svt[:q]) * signs[:, None], s_np[:q, None] * vt_np[:q]) <= 1e-5
  assert not np.any(np.asarray(u[:, q:])) and not np.any(np.asarray(svt[q:]))


def _aggregate(ranks, n, scales, seed=0):
  rng = np.random.default_rng(seed)
  a_l, b_l = ref.random_clients(rng, len(ranks), D_IN, D_OUT, R_MAX, ranks)
  out = flexlora.aggregate(ref.to_tree(a_l, b_l), jnp.array(ranks, jnp.int32),
                          jnp.array(n, jnp.float32), jnp.array(scales, jnp.float32))
  return out, ref.weighted_update(a_l, b_l, ranks, n, scales), (a_l, b_l)


def test_global_is_best_rank_r_max_approximation():
  out, dw, _ = _aggregate([1, 3, 4, 2], [5., 1., 2., 3.], [2., 0.5, 0.25, 1.])
  assert ref.rel_err(_product(out["q"]), ref.best_rank(dw, R_MAX)) <= 1e-5
  assert out["q"]["a"].shape == (D_IN, R_MAX) and out["q"]["b"].shape == (R_MAX, D_OUT)


@hypothesis.given(ranks=st.lists(st.integers(1, R_MAX), min_size=3, max_size=3),
                  alpha=st.sampled_from([1.0, 8.0, 16.0]),
                  rule=st.sampled_from(lora_lib.SCALE_RULES))
def test_distribution_gives_each_client_its_best_rank_approximation(ranks, alpha, rule):
  scales = [float(lora_lib.scale(r, alpha, rule, R_MAX)) for r in ranks]
  out, dw, _ = _aggregate(ranks, [3., 1., 2.], scales, seed=sum(ranks))
  clients = flexlora.distribute(out, jnp.array(ranks), jnp.array(scales))["q"]
  for k, (r, s) in enumerate(zip(ranks, scales)):
    got = s * np.asarray(clients["a"][k], np.float64) @ np.asarray(clients["b"][k], np.float64)
    assert ref.rel_err(got, ref.best_rank(dw, r)) <= 1e-5
    assert not np.any(np.asarray(clients["a"][k][:, r:]))


def test_equal_ranks_give_best_rank_r_of_the_averaged_update():
  ranks, scales = [2, 2, 2], [4., 4., 4.]
  out, dw, _ = _aggregate(ranks, [1., 2., 3.], scales)
  clients = flexlora.distribute(out, jnp.array(ranks), jnp.array(scales))["q"]
  got = 4.0 * np.asarray(clients["a"][0], np.float64) @ np.asarray(clients["b"][0], np.float64)
  assert ref.rel_err(got, ref.best_rank(dw, 2)) <= 1e-5


@hypothesis.given(rank=st.integers(1, R_MAX), s=st.floats(0.1, 10.0))
def test_one_client_is_reproduced_exactly(rank, s):
  out, dw, _ = _aggregate([rank], [7.0], [s], seed=rank)
  client = flexlora.distribute(out, jnp.array([rank]), jnp.array([s]))["q"]
  got = s * np.asarray(client["a"][0], np.float64) @ np.asarray(client["b"][0], np.float64)
  assert ref.rel_err(got, dw) <= 1e-5


def test_narrow_kernels_are_zero_padded_to_r_max():
  rng = np.random.default_rng(3)
  a_l, b_l = ref.random_clients(rng, 2, 3, 2, 6, [6, 5])
  out = flexlora.aggregate(ref.to_tree(a_l, b_l), jnp.array([6, 5]), jnp.ones(2), jnp.ones(2))["q"]
  assert out["a"].shape == (3, 6) and out["b"].shape == (6, 2)
  assert not np.any(np.asarray(out["b"][2:]))
  assert ref.rel_err(_product(out), ref.weighted_update(a_l, b_l, [6, 5], [1, 1], [1, 1])) <= 1e-5


@pytest.mark.parametrize("core_rank", [None, 9, 12, 8, 3, 1])
def test_core_rank_changes_speed_not_result(core_rank):
  # ranks sum to 9 over the clients with examples (the third has none): 9 and 12 take the
  # compact path, 8, 3 and 1 fall back to all K r_max columns
  ranks, n, scales = [2, 4, 3, 3], [5., 1., 0., 3.], [2., 0.5, 1., 1.]
  rng = np.random.default_rng(7)
  a_l, b_l = ref.random_clients(rng, len(ranks), D_IN, D_OUT, R_MAX, ranks)
  out = flexlora.aggregate(ref.to_tree(a_l, b_l), jnp.array(ranks, jnp.int32), jnp.array(n),
                          jnp.array(scales), core_rank=core_rank)["q"]
  dw = ref.weighted_update(a_l, b_l, ranks, n, scales)
  assert out["a"].shape == (D_IN, R_MAX) and out["b"].shape == (R_MAX, D_OUT)
  assert ref.rel_err(_product(out), ref.best_rank(dw, R_MAX)) <= 1e-5


def test_core_rank_must_be_positive():
  with pytest.raises(ValueError, match="core_rank"):
    flexlora.aggregate(ref.to_tree(*ref.random_clients(np.random.default_rng(0), 2, 3, 2, 2, [1, 2])),
                      jnp.array([1, 2]), jnp.ones(2), jnp.ones(2), core_rank=0)


@hypothesis.given(ranks=st.lists(st.integers(0, R_MAX), min_size=1, max_size=5), extra=st.integers(0, 3))
def test_compact_keeps_the_product_and_the_order(ranks, extra):
  rng = np.random.default_rng(len(ranks))
  a_l, b_l = ref.random_clients(rng, len(ranks), D_IN, D_OUT, R_MAX, ranks)
  a = np.concatenate([a_k[:, :r] for a_k, r in zip(a_l, ranks)] + [np.zeros((D_IN, 0))], axis=1)
  b = np.concatenate([b_k[:r] for b_k, r in zip(b_l, ranks)] + [np.zeros((0, D_OUT))], axis=0)
  mod = ref.to_tree(a_l, b_l)["q"]
  a_s, b_s = flora.stacked_factors(mod, jnp.array(ranks), jnp.ones(len(ranks)), jnp.ones(len(ranks)))
  active = lora_lib.rank_mask(jnp.array(ranks), R_MAX).reshape(-1) > 0
  width = min(sum(ranks) + extra, len(ranks) * R_MAX)
  a_c, b_c = flexlora.compact(a_s, b_s, active, width)
  assert a_c.shape == (D_IN, width) and b_c.shape == (width, D_OUT)
  np.testing.assert_allclose(np.asarray(a_c)[:, :sum(ranks)], a, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(b_c)[:sum(ranks)], b, rtol=0, atol=1e-6)
  assert not np.any(np.asarray(a_c)[:, sum(ranks):])


def test_core_rank_bound_is_the_largest_cohort_sum():
  assert flexlora.core_rank_bound([1, 8, 4, 64], cohort_size=2, r_max=32) == 40
  assert flexlora.core_rank_bound([3, 3], cohort_size=5, r_max=8) == 6


def test_method_takes_its_core_rank_from_the_run():
  run = methods.Run(client_ranks=np.array([1, 8, 4, 32]), clients_per_round=2, r_min=1, r_max=32,
                    alpha=64.0, scale_rule="alpha/r_max")
  assert methods.build("flexlora", run).aggregate.keywords["core_rank"] == 40
  assert methods.build("flexlora", run, {"core_rank": 12}).aggregate.keywords["core_rank"] == 12
