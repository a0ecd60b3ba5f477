"""The federated round: sample, distribute, train all clients, aggregate.

Server state is a pytree (:class:`ServerState`): the method's own state
(usually the global max-rank LoRA), every client's persistent rank (after
any rank change in local training) and the round counter. One round::

    cohort = sample_cohort(seed, round, N, K)                 (host, numpy)
    ranks  = client_ranks[cohort]
    base   = method.effective_base(state, W0)
    client = method.distribute(state, ranks, s(ranks), key)   [K, ..., r_max]
    result = train(base, client, ranks, data)                 (vmap over K)
    upload, included = screen(client, result)                 (exclude broken, clip)
    agg    = method.aggregate(upload, rank, n_k * included, s_k)   (+ DP noise)
    state  = method.server_update(state, agg, rank, base, public)   (kept if none included)
    client_ranks[cohort] = rank

Everything method-specific comes from a :class:`hetlora.methods.Method`;
this module names no method. Uploads are screened first
(:mod:`hetlora.screening`): a non-finite or out-of-bound update is excluded
(no weight, the client keeps its rank), and with client-level DP
(:mod:`hetlora.privacy`) the average is uniform and noised. The model enters only through the client's
``loss_fn``; data through ``data: {'batch': [K, steps, B, ...], 'mask': [K,
steps, B]}`` packed on the host. With the ``vmap`` backend the whole round is
one jitted program whose shapes do not depend on ranks, so rank changes never
recompile.
"""

from __future__ import annotations

from typing import Any, Callable

import dataclasses

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from hetlora import client as client_lib
from hetlora import lora as lora_lib
from hetlora import methods as methods_lib
from hetlora import privacy as privacy_lib
from hetlora import screening as screening_lib


@flax.struct.dataclass
class ServerState:
  """The server's pytree state.

  Attributes:
    method_state: the method's own state (:attr:`hetlora.methods.Method.init_state`):
      the global adapter ``a: [d_in, r_max]`` for most methods.
    client_ranks: ``int32[N]`` every client's persistent rank.
    round: ``int32[]`` rounds done.
    r_max: the adapter width (static).
  """
  method_state: Any
  client_ranks: jax.Array
  round: jax.Array
  r_max: int = flax.struct.field(pytree_node=False, default=0)


def init(global_lora: lora_lib.LoRA, client_ranks: Any, method: methods_lib.Method) -> ServerState:
  """Server state at round 0; ``client_ranks[i]`` is client ``i``'s starting rank.

  The method's state is ``method.init_state(global_lora, client_ranks)``;
  ranks outside ``[1, r_max]`` and ranks the method cannot run are refused.
  """
  ranks = jnp.asarray(client_ranks, jnp.int32)
  r_max = lora_lib.r_max_of(global_lora)
  if ranks.ndim != 1 or ranks.size == 0:
    raise ValueError(f"client_ranks must be a non-empty 1-D array, got shape {ranks.shape}.")
  lo, hi = int(ranks.min()), int(ranks.max())
  if lo < 1 or hi > r_max:
    raise ValueError(f"client ranks must lie in [1, r_max={r_max}], got [{lo}, {hi}]; "
                     "check lora.r_min / lora.r_max.")
  host_ranks = np.asarray(ranks)
  method.check_ranks(host_ranks, r_max)
  return ServerState(method_state=method.init_state(global_lora, host_ranks), client_ranks=ranks,
                     round=jnp.zeros((), jnp.int32), r_max=r_max)


def eval_models(method: methods_lib.Method, state: ServerState, base_params: Any, alpha: float,
                scale_rule: str) -> tuple[Any, lora_lib.LoRA]:
  """The models the server holds, ready to evaluate: ``(base, adapters)``.

  ``base = method.effective_base(...)`` (the frozen weights, with FLoRA's merged
  updates) and ``adapters = method.global_adapters(...)``: ``G`` adapters folded
  with their LoRA scale (``a: [G, d_in, r]``, ``b: [G, r, d_out]``; ``G = 1``
  unless the method keeps one model per rank group), each what a model's
  ``lora_eff`` argument takes after ``jax.tree.map(lambda x: x[g], adapters)``.

  Example::

    base, adapters = eval_models(exp.method, state, exp.base_params, 16.0, 'alpha/r_max')
    lora_eff = jax.tree.map(lambda x: x[0], adapters)
    logits = model.apply({'params': base, 'lora': lora_eff}, ids, mask)
  """
  return (method.effective_base(state.method_state, base_params),
          method.global_adapters(state.method_state, alpha, scale_rule))


def sample_cohort(seed: int, round_index: int, num_clients: int, per_round: int) -> np.ndarray:
  """``int32[K]`` distinct client ids, a pure function of ``(seed, round)``."""
  if not 1 <= per_round <= num_clients:
    raise ValueError(f"server.clients_per_round={per_round} must be in [1, num_clients={num_clients}].")
  if per_round == num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng([seed, round_index])
  return np.sort(rng.choice(num_clients, per_round, replace=False)).astype(np.int32)


def make_round(spec: client_lib.LocalSpec, method: methods_lib.Method,
               backend: str | Callable[..., client_lib.ClientResult] = "vmap",
               screening: screening_lib.Screening = screening_lib.Screening(),
               privacy: privacy_lib.Privacy | None = None,
               ) -> Callable[..., tuple[ServerState, client_lib.ClientResult]]:
  """Builds ``round_fn(state, base_params, cohort, data, num_examples, key=None, public=None)``.

  Args:
    spec: the clients' loss, optimizer and scale rule. For string backends
      its ``local`` is replaced by ``method.local`` (the method's objective).
    method: a :class:`hetlora.methods.Method` (build the state with
      ``init(..., method)``).
    backend: ``'vmap'`` (one jitted program), ``'sequential'`` (Python loop
      over clients, same numbers, names a failing client), or a callable
      ``train(base, lora [K], ranks [K], data [K]) -> ClientResult`` built
      from :func:`hetlora.client.local_train` (then the round is not jitted
      here; the callable jits its own work, and its spec's ``local`` must be
      ``method.local``).
    screening: the bounds uploads are screened with (non-finite uploads are
      always excluded).
    privacy: client-level DP (uniform average, clipped updates, Gaussian noise;
      needs ``method.dp_linear``, a ``key`` and ``screening.clip_norm``), or ``None``.

  Returns:
    ``round_fn`` returning the new state and the stacked :class:`ClientResult`
    (``lora`` the screened uploads, ``rank`` the clients' new ranks,
    ``included`` which uploads counted).
    ``key`` (a PRNG key) is required when ``method.needs_key`` (fresh client
    adapters); ``public`` (``{'batch': [steps, B, ...], 'mask': [steps,
    B]}``) when ``method.needs_public`` (server-side distillation).
  """
  if privacy is not None:
    if not method.dp_linear:
      raise ValueError(f"privacy.noise_multiplier > 0: client-level DP is defined for methods whose "
                       f"aggregate is a plain average of the clients' factors (Method.dp_linear), not "
                       f"{method.name!r}; set privacy.noise_multiplier=0 or choose such a method.name.")
    if screening.clip_norm != privacy.clip_norm:
      raise ValueError(f"client.clip_norm={screening.clip_norm} must be the DP clip norm "
                       f"{privacy.clip_norm}: both bound the same updates.")
  if isinstance(backend, str):
    train = client_lib.make_backend(backend, dataclasses.replace(spec, local=method.local))
  elif spec.local != method.local:
    raise ValueError(f"method {method.name!r} has its own local objective, but the backend's spec "
                     "has another: build the backend with dataclasses.replace(spec, local=method.local).")
  else:
    train = backend

  def round_fn(state: ServerState, base_params, cohort, data, num_examples, key=None, public=None):
    chex.assert_rank(cohort, 1)
    if method.needs_key and key is None:
      raise ValueError(f"method {method.name!r} draws fresh client adapters: pass round_fn(..., key=...).")
    if method.needs_public and public is None:
      raise ValueError(f"method {method.name!r} trains on public data: pass round_fn(..., public=...).")
    ranks = state.client_ranks[cohort]
    r_max = state.r_max
    base = method.effective_base(state.method_state, base_params)
    start = method.distribute(state.method_state, ranks,
                              lora_lib.scale(ranks, spec.alpha, spec.scale_rule, r_max), key)
    result = train(base, start, ranks, data)
    uploads, included, _ = screening_lib.screen(screening, start, result.lora, result.loss)
    rank = jnp.where(included, result.rank, ranks)
    weights = included.astype(jnp.float32)
    if privacy is None:
      weights = weights * jnp.asarray(num_examples, jnp.float32)
    scales = lora_lib.scale(rank, spec.alpha, spec.scale_rule, r_max)
    aggregated = method.aggregate(uploads, rank, weights, scales)
    if privacy is not None:
      if key is None:
        raise ValueError("client-level DP draws noise: pass round_fn(..., key=...).")
      aggregated = privacy_lib.add_noise(privacy, aggregated, jnp.sum(included), method.local.trainable,
                                         jax.random.fold_in(key, 1))
    updated = method.server_update(state.method_state, aggregated, rank, base, public)
    any_included = jnp.any(included)
    new_state = state.replace(
        method_state=jax.tree.map(lambda new, old: jnp.where(any_included, new, old),
                                  updated, state.method_state),
        client_ranks=state.client_ranks.at[cohort].set(rank),
        round=state.round + 1)
    return new_state, result.replace(lora=uploads, rank=rank, included=included)

  return jax.jit(round_fn) if backend == "vmap" else round_fn
