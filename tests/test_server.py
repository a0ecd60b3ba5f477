import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hetlora import client, lora as lora_lib, methods, ranks as ranks_lib, server
from hetlora.models import tiny

import numpy_reference as ref
from test_client import R_MAX, _linear, _nonzero_lora, _regression_data


def test_round_matches_numpy_reference():
  """Sampling, truncation, local SGD with pruning, sparsity-weighted aggregation, rank scatter."""
  model, base = _linear()
  glob = _nonzero_lora(base, 7)
  client_ranks = np.array([1, 4, 2, 3, 4, 2])
  method = methods.get("hetlora", lam=1.0, gamma=0.6, prune=True)
  state = server.init(glob, client_ranks, method)
  cohort = server.sample_cohort(seed=3, round_index=0, num_clients=6, per_round=4)
  data = _regression_data(np.random.default_rng(8), 4, 3, 4, counts=[12, 5, 9, 1])
  n = data["mask"].sum((1, 2))
  spec = client.LocalSpec(tiny.squared_loss(model), optax.sgd(0.05), alpha=2.0)
  new_state, res = server.make_round(spec, method)(state, base, cohort, data, n)

  w0 = np.asarray(base["linear"]["kernel"], np.float64)
  a_g, b_g = np.asarray(glob["linear"]["a"]), np.asarray(glob["linear"]["b"])
  outs = []
  for i, cid in enumerate(cohort):
    r = int(client_ranks[cid])
    outs.append(ref.linear_local_sgd(
        w0, a_g, b_g, r, data["batch"]["x"][i], data["batch"]["y"][i], data["mask"][i], lr=0.05,
        s=ref.scale(r, 2.0, "alpha/r", R_MAX), lam=1.0, gamma=0.6, prune=True))
  new_ranks = [o[2] for o in outs]
  norms = np.array([np.linalg.norm(ref.dense_update(o[0], o[1], o[2], ref.scale(o[2], 2.0, "alpha/r", R_MAX)))
                    for o in outs])
  a, b = ref.weighted_average_padded([o[0] for o in outs], [o[1] for o in outs], new_ranks,
                                     norms / norms.sum(), R_MAX)
  np.testing.assert_allclose(np.asarray(new_state.method_state["linear"]["a"]), a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new_state.method_state["linear"]["b"]), b, rtol=1e-5, atol=1e-6)
  want_ranks = client_ranks.copy()
  want_ranks[cohort] = new_ranks
  np.testing.assert_array_equal(np.asarray(new_state.client_ranks), want_ranks)
  assert int(new_state.round) == 1


def _three_rounds(seed):
  model = tiny.MLPClassifier(hidden=(16,), num_classes=3)
  base = tiny.init_params(model, jax.random.key(seed), 8)
  glob = lora_lib.init(jax.random.key(seed + 1), base, "kernel", 8)
  client_ranks = ranks_lib.assign(10, seed, 2, 8)
  method = methods.get("hetlora", lam=5.0, gamma=0.99, r_min=2, prune=True)
  state = server.init(glob, client_ranks, method)
  spec = client.LocalSpec(tiny.classification_loss(model), optax.adam(3e-2), alpha=8.0)
  round_fn = server.make_round(spec, method)
  history = []
  for r in range(3):
    cohort = server.sample_cohort(seed, r, 10, 4)
    rng = np.random.default_rng([seed, r])
    data = {"batch": {"x": rng.normal(size=(4, 3, 5, 8)).astype(np.float32),
                      "label": rng.integers(0, 3, (4, 3, 5)).astype(np.int32)},
            "mask": np.ones((4, 3, 5), np.float32)}
    state, res = round_fn(state, base, cohort, data, np.full(4, 15.0, np.float32))
    history.append((cohort, np.asarray(state.client_ranks), np.asarray(res.loss)))
  return round_fn, state, history


def test_no_recompilation_across_rounds_and_rank_changes():
  round_fn, state, history = _three_rounds(0)
  ranks_seen = {tuple(h[1]) for h in history}
  assert len(ranks_seen) > 1, "self-pruning should have changed some ranks"
  assert {tuple(h[0]) for h in history} != {tuple(history[0][0])}, "cohorts should differ"
  assert round_fn._cache_size() == 1


def test_same_seed_same_numbers():
  _, s1, h1 = _three_rounds(4)
  _, s2, h2 = _three_rounds(4)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), s1, s2)
  for a, b in zip(h1, h2):
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)


def test_sampling_is_deterministic_and_validated():
  a = server.sample_cohort(1, 5, 100, 10)
  assert np.array_equal(a, server.sample_cohort(1, 5, 100, 10))
  assert len(set(a.tolist())) == 10 and a.dtype == np.int32
  assert not np.array_equal(a, server.sample_cohort(1, 6, 100, 10))
  np.testing.assert_array_equal(server.sample_cohort(1, 0, 4, 4), np.arange(4))
  with pytest.raises(ValueError, match="clients_per_round"):
    server.sample_cohort(0, 0, 3, 4)


def test_init_validates_ranks():
  glob = {"m": {"a": jnp.zeros((2, 4)), "b": jnp.zeros((4, 3))}}
  with pytest.raises(ValueError, match="r_max=4"):
    server.init(glob, [1, 5], methods.get("zero_pad"))
  with pytest.raises(ValueError, match="non-empty"):
    server.init(glob, [], methods.get("zero_pad"))


@pytest.mark.parametrize("dist", ranks_lib.DISTRIBUTIONS)
def test_rank_assignment_in_range_and_deterministic(dist):
  r = ranks_lib.assign(200, 0, 1, 32, choices=(1, 2, 4, 8, 16, 32), distribution=dist)
  assert set(r.tolist()) <= {1, 2, 4, 8, 16, 32}
  assert np.array_equal(r, ranks_lib.assign(200, 0, 1, 32, choices=(1, 2, 4, 8, 16, 32), distribution=dist))
  if dist == "heavy_tail":
    assert np.mean(r <= 2) > 0.6
  with pytest.raises(ValueError, match="r_min"):
    ranks_lib.assign(3, 0, 8, 4)
  with pytest.raises(ValueError, match="rank_choices"):
    ranks_lib.assign(3, 0, 1, 4, choices=(2, 8))
