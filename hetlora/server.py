"""The federated round: sample, distribute, train all clients, aggregate.

Server state is a pytree (:class:`ServerState`): the global max-rank LoRA,
every client's persistent rank (after self-pruning) and the round counter.
One round::

    cohort = sample_cohort(seed, round, N, K)                 (host, numpy)
    ranks  = client_ranks[cohort]
    client = truncate(global, ranks)                          [K, ..., r_max]
    result = train(base, client, ranks, data)                 (vmap over K)
    global = aggregate(result.lora, result.rank, n_k, s_k)
    client_ranks[cohort] = result.rank

The model enters only through the client's ``loss_fn``; data through
``data: {'batch': [K, steps, B, ...], 'mask': [K, steps, B]}`` packed on the
host. With the ``vmap`` backend the whole round is one jitted program whose
shapes do not depend on ranks, so rank changes never recompile.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hetlora import aggregation
from hetlora import client as client_lib
from hetlora import lora as lora_lib


@flax.struct.dataclass
class ServerState:
  """Global adapter ``a: [d_in, r_max]``, ``client_ranks: int32[N]``, ``round: int32[]``."""
  lora: lora_lib.LoRA
  client_ranks: jax.Array
  round: jax.Array


def init(global_lora: lora_lib.LoRA, client_ranks: Any) -> ServerState:
  """Server state at round 0; ``client_ranks[i]`` is client ``i``'s starting rank."""
  ranks = jnp.asarray(client_ranks, jnp.int32)
  r_max = lora_lib.r_max_of(global_lora)
  if ranks.ndim != 1 or ranks.size == 0:
    raise ValueError(f"client_ranks must be a non-empty 1-D array, got shape {ranks.shape}.")
  lo, hi = int(ranks.min()), int(ranks.max())
  if lo < 1 or hi > r_max:
    raise ValueError(f"client ranks must lie in [1, r_max={r_max}], got [{lo}, {hi}]; "
                     "check lora.r_min / lora.r_max.")
  return ServerState(lora=global_lora, client_ranks=ranks, round=jnp.zeros((), jnp.int32))


def sample_cohort(seed: int, round_index: int, num_clients: int, per_round: int) -> np.ndarray:
  """``int32[K]`` distinct client ids, a pure function of ``(seed, round)``."""
  if not 1 <= per_round <= num_clients:
    raise ValueError(f"server.clients_per_round={per_round} must be in [1, num_clients={num_clients}].")
  if per_round == num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng([seed, round_index])
  return np.sort(rng.choice(num_clients, per_round, replace=False)).astype(np.int32)


def make_round(spec: client_lib.LocalSpec, aggregate: aggregation.Aggregator,
               backend: str | Callable[..., client_lib.ClientResult] = "vmap") -> Callable[..., tuple[ServerState, client_lib.ClientResult]]:
  """Builds ``round_fn(state, base_params, cohort, data, num_examples)``.

  Args:
    spec: the clients' loss, optimizer, scale rule and pruning.
    aggregate: an aggregator with the shared signature (:mod:`hetlora.aggregation`).
    backend: ``'vmap'`` (one jitted program), ``'sequential'`` (Python loop
      over clients, same numbers, names a failing client), or a callable
      ``train(base, lora [K], ranks [K], data [K]) -> ClientResult`` built
      from :func:`hetlora.client.local_train` (then the round is not jitted
      here; the callable jits its own work).

  Returns:
    ``round_fn`` returning the new state and the stacked :class:`ClientResult`.
  """
  train = client_lib.make_backend(backend, spec) if isinstance(backend, str) else backend

  def round_fn(state: ServerState, base_params, cohort, data, num_examples):
    chex.assert_rank(cohort, 1)
    ranks = state.client_ranks[cohort]
    result = train(base_params, lora_lib.truncate(state.lora, ranks), ranks, data)
    r_max = lora_lib.r_max_of(state.lora)
    scales = lora_lib.scale(result.rank, spec.alpha, spec.scale_rule, r_max)
    new_lora = aggregate(result.lora, result.rank, jnp.asarray(num_examples, jnp.float32), scales)
    new_state = state.replace(lora=new_lora,
                              client_ranks=state.client_ranks.at[cohort].set(result.rank),
                              round=state.round + 1)
    return new_state, result

  return jax.jit(round_fn) if backend == "vmap" else round_fn
