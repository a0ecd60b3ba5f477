"""The suite every method passes, parametrised over ``hetlora.methods.names()``.

A new module in ``hetlora/methods/`` is tested here the moment it exists:
masked slots stay exactly zero, aggregation is the identity on a consensus
(equal ranks, equal updates: the homogeneous fixed point), one compilation
across rank changes, vmap == sequential == chunked == sharded (8 simulated
devices, in the subprocess of ``test_eight_devices.py``), determinism, a zero-example client has no weight
and causes no NaN, and invalid ranks are refused. Each method's formulas are
checked against plain numpy in its own ``test_methods_<name>.py``. Every
problem trains its classifier head in full beside the LoRA factors (dense
trainables, :mod:`hetlora.dense`), so the head's FedAvg passes the same
checks for every method.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hetlora import client as client_lib
from hetlora import dense as dense_lib
from hetlora import lora as lora_lib
from hetlora import methods
from hetlora import parallel
from hetlora import server
from hetlora.models import tiny

from conftest import needs_eight_devices, single_device

K, STEPS, B, D_IN, CLASSES, R_MAX = 4, 2, 4, 5, 3, 4
MIXED, EQUAL = np.array([1, 2, 4, 4], np.int32), np.array([2, 2, 2, 2], np.int32)
ALPHA, RULE = 8.0, "alpha/r"
# Server-side distillation moves HeLoRA-KD's group models on purpose; switching it off (epochs 0)
# leaves its aggregation to be checked like every other method's.
CONSENSUS_OPTIONS = {"helora_kd": {"epochs": 0}}
HEAD = r"^head/"   # the dense trainables: the classifier head, trained in full by every client



@dataclasses.dataclass(frozen=True, eq=False)   # hashed by identity: a key of the caches below
class Problem:
  method: methods.Method
  spec: client_lib.LocalSpec
  base: dict
  global_lora: dict
  ranks: np.ndarray
  data: dict
  public: dict


def _model():
  model = tiny.MLPClassifier(hidden=(6, 6), num_classes=CLASSES)
  return model, tiny.init_params(model, jax.random.key(0), D_IN)


def _batch(rng, shape):
  return {"x": rng.normal(size=shape + (D_IN,)).astype(np.float32),
          "label": rng.integers(0, CLASSES, shape).astype(np.int32)}


def _ranks_for(name: str) -> np.ndarray:
  """Mixed ranks where the method takes them, else one shared rank."""
  try:
    methods.build(name, _run(name, MIXED)).check_ranks(MIXED, R_MAX)
    return MIXED
  except ValueError:
    return EQUAL


def _run(name, ranks):
  model, _ = _model()
  logits_fn = lambda base, lora_eff, batch: model.apply({"params": base, "lora": lora_eff}, batch["x"])
  return methods.Run(client_ranks=ranks, clients_per_round=K, r_min=1, r_max=R_MAX, alpha=ALPHA,
                     scale_rule=RULE, logits_fn=logits_fn, has_public=True)


def _problem(name: str, options=None, seed: int = 0) -> Problem:
  """One :class:`Problem` per ``(name, options, seed)``, built once and shared by every test (its
  arrays are never mutated), so the round functions below are traced and compiled once per method."""
  return _built_problem(name, tuple(sorted((options or {}).items())), seed)


@functools.lru_cache(maxsize=None)
def _built_problem(name: str, options: tuple, seed: int) -> Problem:
  options = dict(options) or None
  model, base = _model()
  ranks = _ranks_for(name)
  method = methods.build(name, _run(name, ranks), options)
  spec = client_lib.LocalSpec(tiny.classification_loss(model), optax.sgd(0.3, momentum=0.9), alpha=ALPHA,
                              scale_rule=RULE, local=method.local, dense=HEAD)
  glob = lora_lib.init(jax.random.key(1), base, r"hidden_\d/kernel$", R_MAX)
  glob = lora_lib.map_modules(lambda m: {"a": m["a"], "b": 0.1 * jnp.ones_like(m["b"])}, glob)
  rng = np.random.default_rng(seed)
  mask = np.ones((K, STEPS, B), np.float32)
  mask[1, 1:] = 0.0                     # a client with fewer examples
  data = {"batch": _batch(rng, (K, STEPS, B)), "mask": mask}
  public = {"batch": _batch(rng, (2, B)), "mask": np.ones((2, B), np.float32)}
  return Problem(method, spec, base, glob, ranks, data, public)


def _init(p: Problem) -> server.ServerState:
  return server.init(p.global_lora, p.ranks, p.method, dense=dense_lib.select(p.base, HEAD))


_BACKENDS = {"vmap": lambda p: "vmap", "sequential": lambda p: "sequential",
             "chunked3": lambda p: parallel.chunked_backend(p.spec, 3),
             "sharded": lambda p: parallel.sharded_backend(p.spec, parallel.client_mesh())}


@functools.lru_cache(maxsize=None)
def _round_fn(p: Problem, backend: str = "vmap"):
  """``server.make_round`` once per problem and backend: later calls with the same shapes reuse the
  traced and compiled programs instead of re-tracing a fresh closure."""
  return server.make_round(p.spec, p.method, _BACKENDS[backend](p))


def _round(p: Problem, backend="vmap", state=None, n=None, data=None):
  if state is None and n is None and data is None:
    return _default_round(p, backend)
  state = _init(p) if state is None else state
  n = p.data["mask"].sum((1, 2)) if n is None else n
  return _round_fn(p, backend)(state, p.base, jnp.arange(K, dtype=jnp.int32),
                               p.data if data is None else data, n, key=jax.random.key(7), public=p.public)


@functools.lru_cache(maxsize=None)
def _default_round(p: Problem, backend: str):
  """The round from the initial state on the problem's own data (immutable results, shared)."""
  return _round(p, backend, state=_init(p))


def _close(got, want, tol=1e-5):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def _dense_models(p: Problem, state_lora_pairs):
  """``W0 + base change + s_k a_k diag(m_k) b_k`` per module for each ``(base, lora, rank)``."""
  out = []
  for base, lora, rank in state_lora_pairs:
    s = lora_lib.scale(rank, ALPHA, RULE, R_MAX)
    merged = lora_lib.merge(base, lora, jnp.int32(rank), s)
    out.append(jax.tree.map(np.asarray, merged))
  return out


NAMES = methods.names()


@single_device
@pytest.mark.parametrize("name", NAMES)
def test_masked_slots_stay_zero(name):
  p = _problem(name)
  state = server.init(p.global_lora, p.ranks, p.method)
  start = p.method.distribute(state.method_state, jnp.asarray(p.ranks),
                              lora_lib.scale(jnp.asarray(p.ranks), ALPHA, RULE, R_MAX), jax.random.key(3))
  _, result = _round(p)
  result = dataclasses.replace(result, rank=jnp.asarray(p.ranks))   # the upload, at the cohort's ranks
  for tree, ranks in ((start, p.ranks), (result.lora, np.asarray(result.rank))):
    for mod in lora_lib.modules(tree).values():
      for k, r in enumerate(ranks):
        assert not np.any(np.asarray(mod["a"][k][:, r:])) and not np.any(np.asarray(mod["b"][k][r:]))
  # Garbage in an upload's masked slots never reaches the aggregate.
  n, scales = jnp.asarray([3.0, 1.0, 2.0, 5.0]), lora_lib.scale(jnp.asarray(p.ranks), ALPHA, RULE, R_MAX)
  off = 1e3 * (1.0 - lora_lib.rank_mask(jnp.asarray(p.ranks), R_MAX))              # [K, r_max]
  noisy = lora_lib.map_modules(lambda m: {"a": m["a"] + off[:, None, :], "b": m["b"] + off[:, :, None]},
                               result.lora)
  _close(p.method.aggregate(noisy, jnp.asarray(p.ranks), n, scales),
         p.method.aggregate(result.lora, jnp.asarray(p.ranks), n, scales), tol=0)


@single_device
@pytest.mark.parametrize("name", NAMES)
def test_consensus_is_a_fixed_point(name):
  """Equal ranks and one update from every client: the next round starts from that update."""
  p = _problem(name, CONSENSUS_OPTIONS.get(name))
  state = _init(p)
  _, result = _round(p, state=state)
  rank = int(result.rank[0])
  ranks = jnp.full((K,), rank, jnp.int32)
  upload = jax.tree.map(lambda x: jnp.repeat(x[:1], K, axis=0), result.lora)
  scales = lora_lib.scale(ranks, ALPHA, RULE, R_MAX)
  base0 = p.method.effective_base(state.method_state, p.base)
  aggregated = p.method.aggregate(upload, ranks, jnp.asarray([3.0, 1.0, 2.0, 5.0]), scales)
  new = p.method.server_update(state.method_state, aggregated, ranks, base0, p.public)
  start = p.method.distribute(new, ranks, scales, jax.random.key(9))
  got, want = _dense_models(p, [
      (p.method.effective_base(new, p.base), jax.tree.map(lambda x: x[0], start), rank),
      (base0, jax.tree.map(lambda x: x[0], upload), rank)])
  _close(got, want)


@single_device
@pytest.mark.parametrize("name", NAMES)
def test_one_compilation_across_rank_changes_and_deterministic(name):
  p = _problem(name)
  round_fn = _round_fn(p)   # shared with the other tests: their calls (same shapes) compiled nothing new
  compiled_before = round_fn._cache_size()
  assert compiled_before <= 1
  n = p.data["mask"].sum((1, 2))
  runs = []
  for _ in range(2):
    state = _init(p)
    for r in range(2):
      state, result = round_fn(state, p.base, jnp.arange(K, dtype=jnp.int32), p.data, n,
                               key=jax.random.key(r), public=p.public)
      state = state.replace(client_ranks=jnp.roll(state.client_ranks, 1))   # ranks move between clients
    runs.append((state, result))
  assert round_fn._cache_size() == 1   # rank changes, keys and reruns: no recompilation
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), *runs)
  assert np.all(np.isfinite(np.asarray(runs[0][1].loss)))


@single_device
@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_sequential_and_chunked(name):
  p = _problem(name)
  want = _round(p, "vmap")
  _close(_round(p, "sequential"), want, tol=1e-6)
  _close(_round(p, "chunked3"), want, tol=1e-6)


@single_device
@pytest.mark.parametrize("name", NAMES)
def test_zero_example_client_has_no_weight_and_no_nan(name):
  p = _problem(name)
  data = jax.tree.map(np.copy, p.data)
  data["mask"][2] = 0.0
  n = data["mask"].sum((1, 2))
  state, result = _round(p, data=data, n=n)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))
  assert float(result.examples[2]) == 0.0
  rng = np.random.default_rng(1)
  spoil = lambda tree: jax.tree.map(
      lambda x: x.at[2].set(jnp.asarray(rng.normal(size=x.shape[1:]) * 50, x.dtype)), tree)
  ranks = result.rank
  scales = lora_lib.scale(ranks, ALPHA, RULE, R_MAX)
  _close(p.method.aggregate(spoil(result.lora), ranks, jnp.asarray(n), scales),
         p.method.aggregate(result.lora, ranks, jnp.asarray(n), scales), tol=1e-6)
  _close(dense_lib.average(spoil(result.dense), jnp.asarray(n), state.dense),
         dense_lib.average(result.dense, jnp.asarray(n), state.dense), tol=1e-6)


@single_device
@pytest.mark.parametrize("name", NAMES)
def test_invalid_ranks_are_refused(name):
  p = _problem(name)
  for bad in ([0, 1, 1, 1], [1, 1, 1, R_MAX + 1]):
    with pytest.raises(ValueError, match="r_max"):
      server.init(p.global_lora, np.array(bad), p.method)


@needs_eight_devices
@pytest.mark.parametrize("name", NAMES)
def test_sharded_equals_vmap(name):
  assert jax.device_count() == 8
  p = _problem(name)
  _close(_round(p, "sharded"), _round(p, "vmap"), tol=1e-6)
