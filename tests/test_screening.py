"""Screening of uploads (exclusion, clipping) and client-level DP, against numpy and the round."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

from hetlora import client as client_lib
from hetlora import lora as lora_lib
from hetlora import methods
from hetlora import privacy
from hetlora import screening
from hetlora import server
from hetlora.models import tiny

K, STEPS, B, D_IN, R_MAX = 4, 2, 4, 5, 4


def _stacked(rng, k=K):
  return {"m": {"a": rng.normal(size=(k, 6, R_MAX)).astype(np.float32),
                "b": rng.normal(size=(k, R_MAX, 3)).astype(np.float32)}}


@given(st.integers(0, 1000), st.floats(0.1, 10.0))
def test_norms_and_clipping_match_numpy(seed, clip):
  rng = np.random.default_rng(seed)
  start, trained = _stacked(rng), _stacked(rng)
  want = np.sqrt(sum(np.sum((trained["m"][f] - start["m"][f]).reshape(K, -1) ** 2, 1) for f in "ab"))
  uploads, included, norms = screening.screen(screening.Screening(clip_norm=clip), start, trained,
                                              jnp.zeros(K))
  np.testing.assert_allclose(norms, want, rtol=1e-5)
  assert bool(included.all())
  after, _ = screening.update_norms(start, uploads)
  np.testing.assert_allclose(after, np.minimum(want, clip), rtol=1e-4)
  scale = np.minimum(1.0, clip / want)
  for f in "ab":
    np.testing.assert_allclose(uploads["m"][f], start["m"][f] + (trained["m"][f] - start["m"][f])
                               * scale[:, None, None], rtol=1e-5, atol=1e-6)


def test_non_finite_and_large_updates_are_excluded_and_replaced_by_the_start():
  rng = np.random.default_rng(0)
  start, trained = _stacked(rng), _stacked(rng)
  trained["m"]["a"][1, 0, 0] = np.nan
  trained["m"]["b"][2] *= 1e4
  loss = jnp.array([1.0, 1.0, 1.0, jnp.inf])
  uploads, included, norms = screening.screen(screening.Screening(max_norm=100.0), start, trained, loss)
  assert included.tolist() == [True, False, False, False]
  for k in (1, 2, 3):
    np.testing.assert_array_equal(uploads["m"]["a"][k], start["m"]["a"][k])
  np.testing.assert_array_equal(uploads["m"]["b"][0], trained["m"]["b"][0])
  assert np.all(np.isfinite(np.asarray(norms)))
  with pytest.raises(ValueError, match="server.max_update_norm"):
    screening.Screening(max_norm=-1.0)


def _problem(name="zero_pad", **options):
  model = tiny.MLPClassifier(hidden=(6,), num_classes=3)
  base = tiny.init_params(model, jax.random.key(0), D_IN)
  method = methods.get(name, **options)
  spec = client_lib.LocalSpec(tiny.classification_loss(model), optax.sgd(0.5), alpha=8.0)
  glob = lora_lib.init(jax.random.key(1), base, "kernel$", R_MAX)
  glob = lora_lib.map_modules(lambda m: {"a": m["a"], "b": 0.1 * jnp.ones_like(m["b"])}, glob)
  rng = np.random.default_rng(0)
  data = {"batch": {"x": rng.normal(size=(K, STEPS, B, D_IN)).astype(np.float32),
                    "label": rng.integers(0, 3, (K, STEPS, B)).astype(np.int32)},
          "mask": np.ones((K, STEPS, B), np.float32)}
  ranks = np.full(K, 2) if name in ("homlora", "ffa_lora") else np.array([1, 2, 4, 3])
  return method, spec, base, glob, ranks, data


def _run(method, spec, base, glob, ranks, data, **kwargs):
  state = server.init(glob, ranks, method)
  round_fn = server.make_round(spec, method, **kwargs)
  return round_fn(state, base, jnp.arange(K, dtype=jnp.int32), data, data["mask"].sum((1, 2)),
                  key=jax.random.key(5)), state


@pytest.mark.parametrize("name", ["zero_pad", "hetlora"])
def test_a_broken_client_counts_like_a_client_without_examples(name):
  method, spec, base, glob, ranks, data = _problem(name)
  broken = jax.tree.map(np.copy, data)
  broken["batch"]["x"][1] = np.nan
  (state, result), _ = _run(method, spec, base, glob, ranks, broken)
  assert result.included.tolist() == [True, False, True, True]
  assert int(result.rank[1]) == ranks[1]
  empty = jax.tree.map(np.copy, data)
  empty["mask"][1] = 0.0
  (want, _), _ = _run(method, spec, base, glob, ranks, empty)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               state.method_state, want.method_state)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def test_with_every_update_excluded_the_global_adapter_is_kept():
  method, spec, base, glob, ranks, data = _problem()
  (state, result), start = _run(method, spec, base, glob, ranks, data,
                                screening=screening.Screening(max_norm=1e-9))
  assert not bool(result.included.any())
  jax.tree.map(np.testing.assert_array_equal, state.method_state, start.method_state)
  np.testing.assert_array_equal(state.client_ranks, start.client_ranks)
  assert int(state.round) == 1


@pytest.mark.parametrize("name", ["homlora", "zero_pad", "ffa_lora"])
def test_dp_noise_has_the_stated_scale_and_only_on_trained_factors(name):
  method, spec, base, glob, ranks, data = _problem(name)
  clip, z = 0.05, 2.0
  plain = screening.Screening(clip_norm=clip)
  (noisy, _), start = _run(method, spec, base, glob, ranks, data, screening=plain,
                           privacy=privacy.Privacy(z, clip))
  # every client has the same example count here, so DP's uniform mean equals the plain round's
  (clean, _), _ = _run(method, spec, base, glob, ranks, data, screening=plain)
  diffs = {f: np.concatenate([np.ravel(np.asarray(n[f]) - np.asarray(c[f]))
                              for n, c in zip(lora_lib.modules(noisy.method_state).values(),
                                              lora_lib.modules(clean.method_state).values())])
           for f in "ab"}
  std = z * clip / K
  np.testing.assert_allclose(np.std(diffs["b"]), std, rtol=0.15)
  assert abs(np.mean(diffs["b"])) < 4 * std / np.sqrt(diffs["b"].size)
  if name == "ffa_lora":   # a stays the shared initialisation: no noise there
    assert np.all(diffs["a"] == 0)
  else:
    np.testing.assert_allclose(np.std(diffs["a"]), std, rtol=0.15)


def test_dp_is_refused_where_it_is_not_defined_or_unclipped():
  method, spec, *_ = _problem("hetlora")
  with pytest.raises(ValueError, match="dp_linear"):
    server.make_round(spec, method, screening=screening.Screening(clip_norm=1.0),
                      privacy=privacy.Privacy(1.0, 1.0))
  with pytest.raises(ValueError, match="client.clip_norm"):
    privacy.Privacy(1.0, 0.0)


def test_epsilon_grows_with_rounds_and_falls_with_noise():
  eps = [privacy.epsilon(1.0, 0.1, t, 1e-5) for t in (1, 10, 100)]
  assert eps[0] < eps[1] < eps[2]
  assert privacy.epsilon(2.0, 0.1, 100, 1e-5) < eps[2]
  assert privacy.epsilon(1.0, 0.1, 0, 1e-5) == 0.0


def test_trainer_logs_exclusions_and_the_privacy_spent(tmp_path, tiny_model_dirs):
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
  import tweets_hetlora
  from hetlora import trainer
  c = tweets_hetlora.get_config("runlocal,method=zero_pad")
  c.model.name = tiny_model_dirs["bert_classifier"]
  c.data.max_train_examples, c.data.max_test_examples, c.model.max_len = 120, 16, 16
  c.server.rounds, c.client.local_steps = 2, 1
  c.client.clip_norm, c.privacy.noise_multiplier = 0.5, 1.1
  c.server.max_update_norm = 1e-12   # every update out of bounds: excluded, and the privacy still spent
  trainer.run(c, tmp_path / "dp", progress=False)
  rows = [json.loads(line) for line in (tmp_path / "dp" / trainer.METRICS_FILE).read_text().splitlines()]
  eps = [row["dp_epsilon"] for row in rows]
  rate = c.server.clients_per_round / c.data.num_clients
  np.testing.assert_allclose(eps, [privacy.epsilon(1.1, rate, t, 1e-5) for t in (1, 2)], rtol=1e-9)
  assert eps[0] < eps[1]
  assert [row["excluded"] for row in rows] == [3, 3]
  assert rows[0]["excluded_clients"] == rows[0]["client_ids"]
