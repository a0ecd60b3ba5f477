import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from hetlora import aggregation
from hetlora import methods
from hetlora.methods import hetlora, homlora, zero_pad

import numpy_reference as ref

R_MAX = 5
DIMS = {"q": (6, 4), "v": (3, 7)}
CORE = ("homlora", "zero_pad", "hetlora")  # the other methods test themselves


def _clients(seed, ranks, dims=DIMS, r_max=R_MAX):
  """Random stacked factors; slots beyond a rank hold garbage the aggregators must ignore."""
  rng = np.random.default_rng(seed)
  k = len(ranks)
  return {name: {"a": rng.normal(size=(k, d_in, r_max)).astype(np.float32),
                 "b": rng.normal(size=(k, r_max, d_out)).astype(np.float32)}
          for name, (d_in, d_out) in dims.items()}


def _reference_hetlora(tree, ranks, scales, per_module):
  """Dense ||dW_k||_F weights, explicit zero-padding and loops."""
  names = sorted(tree)
  norms = {n: np.array([np.linalg.norm(ref.dense_update(tree[n]["a"][k], tree[n]["b"][k], r, s))
                        for k, (r, s) in enumerate(zip(ranks, scales))]) for n in names}
  out = {}
  for n in names:
    w = norms[n] if per_module else sum(norms[m] for m in names)
    w = w / w.sum()
    a, b = ref.weighted_average_padded(tree[n]["a"], tree[n]["b"], ranks, w, R_MAX)
    out[n] = {"a": a, "b": b}
  return out


def _reference_example_average(tree, ranks, n):
  """Explicit zero-padding, factors averaged with ``p_k = n_k / sum n``."""
  p = np.array(n) / np.sum(n)
  return {name: dict(zip("ab", ref.weighted_average_padded(tree[name]["a"], tree[name]["b"], ranks, p, R_MAX)))
          for name in tree}


def _assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
  for n in want:
    for f in ("a", "b"):
      np.testing.assert_allclose(np.asarray(got[n][f]), want[n][f], rtol=rtol, atol=atol)


def _args(ranks, n, scales):
  return (jnp.asarray(ranks, jnp.int32), jnp.asarray(n, jnp.float32), jnp.asarray(scales, jnp.float32))


@pytest.mark.parametrize("per_module", [False, True])
def test_hetlora_matches_dense_reference(per_module):
  ranks, n = [1, 3, 5, 2], [10, 1, 4, 7]
  scales = [ref.scale(r, 8.0, "alpha/r", R_MAX) for r in ranks]
  tree = _clients(0, ranks)
  got = hetlora.aggregate(tree, *_args(ranks, n, scales), per_module=per_module)
  _assert_tree_close(got, _reference_hetlora(tree, ranks, scales, per_module))


def test_zero_pad_and_fedavg_match_reference():
  ranks, n = [1, 3, 5, 2], [10, 1, 4, 7]
  tree = _clients(1, ranks)
  want = _reference_example_average(tree, ranks, n)
  for fn in (zero_pad.aggregate, homlora.aggregate, aggregation.example_average):
    _assert_tree_close(fn(tree, *_args(ranks, n, np.ones(4))), want)


def test_hetlora_without_sparsity_weighting_averages_by_examples_and_keeps_its_local_rule():
  """The step-3 ablation: p_k = n_k / sum n over the zero-padded factors; regulariser and pruning stay."""
  ranks, n = [1, 3, 5, 2], [10, 1, 4, 7]
  scales = [ref.scale(r, 8.0, "alpha/r", R_MAX) for r in ranks]
  tree = _clients(6, ranks)
  want = _reference_example_average(tree, ranks, n)
  ablated = hetlora.make(sparsity_weighting=False)
  _assert_tree_close(ablated.aggregate(tree, *_args(ranks, n, scales)), want)
  weighted = hetlora.make().aggregate(tree, *_args(ranks, n, scales))
  assert not np.allclose(np.asarray(weighted["q"]["a"]), want["q"]["a"], atol=1e-3)
  assert ablated.local.penalty is not None and ablated.local.next_rank is not None
  with pytest.raises(ValueError, match="per_module.*sparsity_weighting=False"):
    hetlora.make(sparsity_weighting=False, per_module=True)


def test_norms_come_from_gram_matrices():
  ranks = [2, 5]
  scales = [0.5, 3.0]
  tree = _clients(2, ranks)
  got = aggregation.update_norms_sq(tree, *_args(ranks, [1, 1], scales)[::2])
  for name in tree:
    for k in range(2):
      dense = ref.dense_update(tree[name]["a"][k], tree[name]["b"][k], ranks[k], scales[k])
      np.testing.assert_allclose(float(got[name][k]), np.sum(dense ** 2), rtol=1e-5)


@jax.jit
def _aggregates_and_weights(tree, ranks, n, scales):
  """Every core aggregate, the sparsity weights and the example weights in one program: compiled
  once per cohort size K (at most 6) instead of op by op for every example."""
  outs = {name: methods.module(name).aggregate(tree, ranks, n, scales) for name in CORE}
  norms = aggregation.update_norms_sq(tree, ranks, scales)
  total = jnp.sqrt(sum(jax.tree.leaves(norms)))
  w = aggregation.sparsity_weights(total, aggregation.example_weights(n))
  return outs, w, aggregation.example_weights(n)


@given(st.lists(st.integers(1, R_MAX), min_size=1, max_size=6), st.integers(0, 10_000),
       st.booleans())
def test_properties_masked_slots_zero_and_weights_convex(ranks, seed, per_module):
  rng = np.random.default_rng(seed)
  n = rng.integers(1, 50, len(ranks))
  tree = _clients(seed, ranks)
  args = _args(ranks, n, rng.uniform(0.1, 4, len(ranks)))
  top = max(ranks)
  outs, w, example_w = jax.device_get(_aggregates_and_weights(tree, *args))
  for name in CORE:
    for mod in outs[name].values():  # no client has slots >= top: they stay exactly zero
      assert float(np.abs(mod["a"][:, top:]).max(initial=0.0)) == 0.0
      assert float(np.abs(mod["b"][top:, :]).max(initial=0.0)) == 0.0
  assert float(w.min()) >= 0.0
  np.testing.assert_allclose(float(w.sum()), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(example_w.sum()), 1.0, rtol=1e-6)


def test_homogeneous_case_all_methods_agree_and_recover_identical_clients():
  ranks = [4, 4, 4]
  tree = _clients(3, ranks)
  # equal update norms: give every client the same factors up to a rank-slot sign flip
  signs = np.array([1, -1, 1], np.float32)[:, None, None]
  tree = {n: {"a": m["a"][:1] * signs, "b": m["b"][:1] * signs} for n, m in tree.items()}
  args = _args(ranks, [5, 5, 5], [2.0] * 3)
  outs = [methods.module(n).aggregate(tree, *args) for n in CORE]
  for other in outs[1:]:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6), outs[0], other)
  same = {n: {"a": np.repeat(m["a"][:1], 3, 0), "b": np.repeat(m["b"][:1], 3, 0)} for n, m in tree.items()}
  want = {n: dict(zip("ab", ref.pad_to(m["a"][0], m["b"][0], 4, R_MAX))) for n, m in same.items()}
  for name in CORE:
    rec = methods.module(name).aggregate(same, *args)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5, atol=1e-6), rec, want)


def test_all_zero_updates_fall_back_to_example_weights():
  ranks = [2, 3]
  tree = _clients(4, ranks)
  tree = {n: {"a": m["a"], "b": np.zeros_like(m["b"])} for n, m in tree.items()}
  args = _args(ranks, [1, 3], [1.0, 1.0])
  got = hetlora.aggregate(tree, *args)
  _assert_tree_close(got, jax.tree.map(np.asarray, zero_pad.aggregate(tree, *args)))


def test_unknown_method_and_shape_errors():
  with pytest.raises(ValueError, match="method.name='fedprox' is unknown"):
    methods.module("fedprox")
  tree = _clients(5, [1, 2])
  with pytest.raises(ValueError, match="stacked"):
    homlora.aggregate(jax.tree.map(lambda x: x[0], tree), *_args([1], [1], [1]))
