"""The federated round: sample, distribute, train all clients, aggregate.

Server state is a pytree (:class:`ServerState`): the global max-rank LoRA,
every client's persistent rank (after self-pruning), the round counter and,
for methods that merge into the base (FLoRA), the merged updates. One round::

    cohort = sample_cohort(seed, round, N, K)                 (host, numpy)
    ranks  = client_ranks[cohort]
    base   = W0 + base_delta                                  (if merging)
    client = distribute(global, ranks, s(ranks), key)         [K, ..., r_max]
    result = train(base, client, ranks, data)                 (vmap over K)
    agg    = aggregate(result.lora, result.rank, n_k, s_k)
    global = server_update(global, agg, result.rank, base, public)
    base_delta += agg.a @ agg.b                               (if merging)
    client_ranks[cohort] = result.rank

``distribute``, ``aggregate`` and ``server_update`` come from a
:class:`hetlora.methods.Method`; without one, distribution is truncation
and the aggregate is the new global adapter (HetLoRA and its baselines).

The model enters only through the client's ``loss_fn``; data through
``data: {'batch': [K, steps, B, ...], 'mask': [K, steps, B]}`` packed on the
host. With the ``vmap`` backend the whole round is one jitted program whose
shapes do not depend on ranks, so rank changes never recompile.
"""

from __future__ import annotations

from typing import Any, Callable

import dataclasses

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hetlora import aggregation
from hetlora import client as client_lib
from hetlora import lora as lora_lib
from hetlora import methods as methods_lib


@flax.struct.dataclass
class ServerState:
  """The server's pytree state.

  Attributes:
    lora: the method's global adapter, ``a: [d_in, r_max]`` (``[G, d_in, r_max]``
      rank groups for HeLoRA-KD; scale 1 for FlexLoRA; zeros for FLoRA).
    client_ranks: ``int32[N]`` every client's persistent rank.
    round: ``int32[]`` rounds done.
    base_delta: ``None``, or (methods that merge into the base, FLoRA) the
      running sum of merged dense updates, ``[d_in, d_out]`` per adapted
      kernel at the LoRA tree's module paths. The server does not hold the
      base weights: it holds ``W0``'s offset, and the model clients train and
      evaluate is ``W0 + base_delta`` (:func:`effective_base`).
  """
  lora: lora_lib.LoRA
  client_ranks: jax.Array
  round: jax.Array
  base_delta: Any = None


def effective_base(state: ServerState, base_params: Any) -> Any:
  """``base_params`` with ``state.base_delta`` added to every adapted kernel.

  ``base_params`` is the original ``W0`` tree; without a ``base_delta`` it is
  returned as it is.
  """
  if state.base_delta is None:
    return base_params
  return lora_lib.add_to_kernels(base_params, state.base_delta)


def init(global_lora: lora_lib.LoRA, client_ranks: Any,
         method: methods_lib.Method | None = None) -> ServerState:
  """Server state at round 0; ``client_ranks[i]`` is client ``i``'s starting rank.

  With a ``method``, the stored adapter is ``method.init_global(global_lora,
  client_ranks)`` and a merging method starts from ``base_delta = 0``.
  """
  ranks = jnp.asarray(client_ranks, jnp.int32)
  r_max = lora_lib.r_max_of(global_lora)
  if ranks.ndim != 1 or ranks.size == 0:
    raise ValueError(f"client_ranks must be a non-empty 1-D array, got shape {ranks.shape}.")
  lo, hi = int(ranks.min()), int(ranks.max())
  if lo < 1 or hi > r_max:
    raise ValueError(f"client ranks must lie in [1, r_max={r_max}], got [{lo}, {hi}]; "
                     "check lora.r_min / lora.r_max.")
  if method is None:
    return ServerState(lora=global_lora, client_ranks=ranks, round=jnp.zeros((), jnp.int32))
  base_delta = None
  if method.merges_into_base:
    base_delta = lora_lib.map_modules(
        lambda mod: jnp.zeros((mod["a"].shape[0], mod["b"].shape[1]), mod["a"].dtype), global_lora)
  return ServerState(lora=method.init_global(global_lora, np.asarray(ranks)), client_ranks=ranks,
                     round=jnp.zeros((), jnp.int32), base_delta=base_delta)


def sample_cohort(seed: int, round_index: int, num_clients: int, per_round: int) -> np.ndarray:
  """``int32[K]`` distinct client ids, a pure function of ``(seed, round)``."""
  if not 1 <= per_round <= num_clients:
    raise ValueError(f"server.clients_per_round={per_round} must be in [1, num_clients={num_clients}].")
  if per_round == num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng([seed, round_index])
  return np.sort(rng.choice(num_clients, per_round, replace=False)).astype(np.int32)


def make_round(spec: client_lib.LocalSpec, aggregate: aggregation.Aggregator | None,
               backend: str | Callable[..., client_lib.ClientResult] = "vmap",
               method: methods_lib.Method | None = None) -> Callable[..., tuple[ServerState, client_lib.ClientResult]]:
  """Builds ``round_fn(state, base_params, cohort, data, num_examples, key=None, public=None)``.

  Args:
    spec: the clients' loss, optimizer, scale rule and pruning.
    aggregate: an aggregator with the shared signature (:mod:`hetlora.aggregation`),
      or ``None`` to use ``method.aggregate``.
    backend: ``'vmap'`` (one jitted program), ``'sequential'`` (Python loop
      over clients, same numbers, names a failing client), or a callable
      ``train(base, lora [K], ranks [K], data [K]) -> ClientResult`` built
      from :func:`hetlora.client.local_train` (then the round is not jitted
      here; the callable jits its own work, and its spec's ``trainable``
      must be the method's).
    method: a :class:`hetlora.methods.Method` (build the state with
      ``init(..., method=method)``); ``None`` means truncation, ``aggregate``
      as the new global adapter, both factors trained. Its ``trainable``
      overrides ``spec.trainable`` for string backends.

  Returns:
    ``round_fn`` returning the new state and the stacked :class:`ClientResult`.
    ``key`` (a PRNG key) is required by methods that reset clients (FLoRA);
    ``public`` (``{'batch': [steps, B, ...], 'mask': [steps, B]}``) by HeLoRA-KD.
  """
  if method is None:
    if aggregate is None:
      raise ValueError("make_round needs an aggregate or a method.")
    method = methods_lib.Method("custom", aggregate)
  aggregate = method.aggregate if aggregate is None else aggregate
  if isinstance(backend, str):
    train = client_lib.make_backend(backend, dataclasses.replace(spec, trainable=method.trainable))
  elif spec.trainable != method.trainable:
    raise ValueError(f"method {method.name!r} trains {method.trainable!r} but the backend's spec "
                     f"has trainable={spec.trainable!r}; build the backend with trainable={method.trainable!r}.")
  else:
    train = backend

  def round_fn(state: ServerState, base_params, cohort, data, num_examples, key=None, public=None):
    chex.assert_rank(cohort, 1)
    if method.resets_clients and key is None:
      raise ValueError(f"method {method.name!r} draws fresh client adapters: pass round_fn(..., key=...).")
    ranks = state.client_ranks[cohort]
    r_max = lora_lib.r_max_of(state.lora)
    base = effective_base(state, base_params)
    start = method.distribute(state.lora, ranks, lora_lib.scale(ranks, spec.alpha, spec.scale_rule, r_max), key)
    result = train(base, start, ranks, data)
    scales = lora_lib.scale(result.rank, spec.alpha, spec.scale_rule, r_max)
    aggregated = aggregate(result.lora, result.rank, jnp.asarray(num_examples, jnp.float32), scales)
    new_state = state.replace(lora=method.server_update(state.lora, aggregated, result.rank, base, public),
                              client_ranks=state.client_ranks.at[cohort].set(result.rank),
                              round=state.round + 1)
    if method.merges_into_base:
      width = lora_lib.r_max_of(aggregated)
      merged = lora_lib.delta(aggregated, jnp.int32(width), 1.0)
      new_state = new_state.replace(base_delta=jax.tree.map(jnp.add, state.base_delta, merged))
    return new_state, result

  return jax.jit(round_fn) if backend == "vmap" else round_fn
