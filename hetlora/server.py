"""The federated round: sample, distribute, train all clients, aggregate.

Server state is a pytree (:class:`ServerState`): the method's own state
(usually the global max-rank LoRA), every client's persistent rank (after
any rank change in local training) and the round counter. One round::

    cohort = sample_cohort(seed, round, N, K)                 (host, numpy)
    ranks  = client_ranks[cohort]
    base   = method.effective_base(state, W0 with dense w)
    client = method.distribute(state, ranks, s(ranks), key)   [K, ..., r_max]
    result = train(base, client, ranks, data)                 (vmap over K)
    upload, included = screen((client, w), result)            (exclude broken, clip)
    agg    = method.aggregate(upload, rank, n_k * included, s_k)   (+ DP noise)
    w      = sum_k p_k w_k                                    (+ DP noise)
    state  = method.server_update(state, agg, rank, base, public)   (kept if none included)
    client_ranks[cohort] = rank

Everything method-specific comes from a :class:`hetlora.methods.Method`;
this module names no method. Dense trainables ``w`` (base parameters every
client trains in full, e.g. a classifier head: ``LocalSpec.dense``,
:mod:`hetlora.dense`) are held in :attr:`ServerState.dense` and FedAvg'd the
same way for every method, with the round's weights (one jitted program
still). Uploads are screened first
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
from hetlora import dense as dense_lib
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
    dense: the global dense trainables, a subtree of the base parameters
      (``{}``: none; :mod:`hetlora.dense`).
    r_max: the adapter width (static).
  """
  method_state: Any
  client_ranks: jax.Array
  round: jax.Array
  dense: Any = flax.struct.field(default_factory=dict)
  r_max: int = flax.struct.field(pytree_node=False, default=0)


def init(global_lora: lora_lib.LoRA, client_ranks: Any, method: methods_lib.Method,
         dense: Any = None) -> ServerState:
  """Server state at round 0; ``client_ranks[i]`` is client ``i``'s starting rank.

  The method's state is ``method.init_state(global_lora, client_ranks)``;
  ranks outside ``[1, r_max]`` and ranks the method cannot run are refused.
  ``dense`` holds the starting dense trainables
  (``hetlora.dense.select(base_params, spec.dense)``), none of them a kernel the
  LoRA tree adapts.
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
  dense = dict(dense or {})
  adapted = sorted(set(dense_lib.paths(dense)) & {p + "/kernel" for p in lora_lib.modules(global_lora)})
  if adapted:
    raise ValueError(f"dense trainables {adapted} are adapted by LoRA too; train each parameter one way "
                     "(set lora.pattern to leave it out, or drop it from the dense trainables).")
  return ServerState(method_state=method.init_state(global_lora, host_ranks), client_ranks=ranks,
                     round=jnp.zeros((), jnp.int32), dense=dense, r_max=r_max)


def checkpoint_tree(state: ServerState) -> dict[str, Any]:
  """What a checkpoint holds: the state's arrays by field, ``dense`` only when the run has dense
  trainables (a run without them keeps the layout checkpoints had before them, so it resumes).

  Example::

    manager.save(step, args=ocp.args.StandardSave(checkpoint_tree(state)))
    state = state.replace(**manager.restore(step, args=ocp.args.StandardRestore(checkpoint_tree(state))))
  """
  tree = {"method_state": state.method_state, "client_ranks": state.client_ranks, "round": state.round}
  return {**tree, "dense": state.dense} if state.dense else tree


def eval_models(method: methods_lib.Method, state: ServerState, base_params: Any, alpha: float,
                scale_rule: str) -> tuple[Any, lora_lib.LoRA]:
  """The models the server holds, ready to evaluate: ``(base, adapters)``.

  ``base = method.effective_base(...)`` (the frozen weights with the global
  dense trainables, and FLoRA's merged updates) and ``adapters =
  method.global_adapters(...)``: ``G`` adapters folded with their LoRA scale
  (``a: [G, d_in, r]``, ``b: [G, r, d_out]``; ``G = 1`` unless the method keeps
  one model per rank group), each what a model's ``lora_eff`` argument takes
  after ``jax.tree.map(lambda x: x[g], adapters)``.

  Example::

    base, adapters = eval_models(exp.method, state, exp.base_params, 16.0, 'alpha/r_max')
    lora_eff = jax.tree.map(lambda x: x[0], adapters)
    logits = model.apply({'params': base, 'lora': lora_eff}, ids, mask)
  """
  return (method.effective_base(state.method_state, dense_lib.overlay(base_params, state.dense)),
          method.global_adapters(state.method_state, alpha, scale_rule))


def sample_cohort(seed: int, round_index: int, num_clients: int, per_round: int) -> np.ndarray:
  """``int32[K]`` distinct client ids, a pure function of ``(seed, round)``."""
  if not 1 <= per_round <= num_clients:
    raise ValueError(f"server.clients_per_round={per_round} must be in [1, num_clients={num_clients}].")
  if per_round == num_clients:
    return np.arange(num_clients, dtype=np.int32)
  rng = np.random.default_rng([seed, round_index])
  return np.sort(rng.choice(num_clients, per_round, replace=False)).astype(np.int32)


def make_steps(spec: client_lib.LocalSpec, method: methods_lib.Method,
               screening: screening_lib.Screening = screening_lib.Screening(),
               privacy: privacy_lib.Privacy | None = None) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """The server's two steps around its clients' training, unjitted: ``(prepare, finish)``.

  ``prepare(state, base_params, cohort, key) -> (ranks: int32[K], base, start)``: the cohort's
  ranks, the base its clients train on and the adapters they start from (``a: [K, d_in, r_max]``).
  ``finish(state, base, cohort, ranks, start, result, num_examples, key, public) -> (state,
  result)``: screens the stacked uploads (:class:`hetlora.client.ClientResult`), aggregates them
  and updates the state. :func:`make_round` runs them around a backend; a driver whose clients
  train elsewhere (other processes or machines, :mod:`hetlora.flower`) calls them itself and gets
  the same numbers. Arguments as in :func:`make_round`.
  """
  if privacy is not None:
    if not method.dp_linear:
      raise ValueError(f"privacy.noise_multiplier > 0: client-level DP is defined for methods whose "
                       f"aggregate is a plain average of the clients' factors (Method.dp_linear), not "
                       f"{method.name!r}; set privacy.noise_multiplier=0 or choose such a method.name.")
    if screening.clip_norm != privacy.clip_norm:
      raise ValueError(f"client.clip_norm={screening.clip_norm} must be the DP clip norm "
                       f"{privacy.clip_norm}: both bound the same updates.")

  def prepare(state, base_params, cohort, key):
    """The cohort's ranks, the base its clients train on, and the adapters they start from."""
    ranks = state.client_ranks[cohort]
    base = method.effective_base(state.method_state, dense_lib.overlay(base_params, state.dense))
    start = method.distribute(state.method_state, ranks,
                              lora_lib.scale(ranks, spec.alpha, spec.scale_rule, state.r_max), key)
    return ranks, base, start

  def finish(state, base, cohort, ranks, start, result, num_examples, key, public):
    """Screens the uploads, aggregates them and updates the server state."""
    (uploads, dense_uploads), included, _ = screening_lib.screen(
        screening, (start, dense_lib.broadcast(state.dense, ranks.shape[0])), (result.lora, result.dense),
        result.loss)
    rank = jnp.where(included, result.rank, ranks)
    weights = included.astype(jnp.float32)
    if privacy is None:
      weights = weights * jnp.asarray(num_examples, jnp.float32)
    scales = lora_lib.scale(rank, spec.alpha, spec.scale_rule, state.r_max)
    aggregated = method.aggregate(uploads, rank, weights, scales)
    dense = dense_lib.average(dense_uploads, weights, state.dense)
    if privacy is not None:
      aggregated, dense = privacy_lib.add_noise(privacy, aggregated, dense, jnp.sum(included),
                                                method.local.trainable, jax.random.fold_in(key, 1))
    updated = method.server_update(state.method_state, aggregated, rank, dense_lib.overlay(base, dense), public)
    any_included = jnp.any(included)
    keep_if_none = lambda new, old: jax.tree.map(lambda x, y: jnp.where(any_included, x, y), new, old)
    new_state = state.replace(
        method_state=keep_if_none(updated, state.method_state),
        dense=keep_if_none(dense, state.dense),
        client_ranks=state.client_ranks.at[cohort].set(rank),
        round=state.round + 1)
    return new_state, result.replace(lora=uploads, dense=dense_uploads, rank=rank, included=included)

  return prepare, finish


def make_round(spec: client_lib.LocalSpec, method: methods_lib.Method,
               backend: str | Callable[..., client_lib.ClientResult] = "vmap",
               screening: screening_lib.Screening = screening_lib.Screening(),
               privacy: privacy_lib.Privacy | None = None,
               ) -> Callable[..., tuple[ServerState, client_lib.ClientResult]]:
  """Builds ``round_fn(state, base_params, cohort, data, num_examples, key=None, public=None)``.

  Args:
    spec: the clients' loss, optimizer, scale rule and dense trainables. For
      string backends its ``local`` is replaced by ``method.local`` (the
      method's objective).
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
    (``lora`` and ``dense`` the screened uploads, ``rank`` the clients' new
    ranks, ``included`` which uploads counted). ``state.dense`` must hold the
    parameters ``spec.dense`` selects (:func:`init`).
    ``key`` (a PRNG key) is required when ``method.needs_key`` (fresh client
    adapters); ``public`` (``{'batch': [steps, B, ...], 'mask': [steps,
    B]}``) when ``method.needs_public`` (server-side distillation).
  """
  prepare, finish = make_steps(spec, method, screening, privacy)
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
    if privacy is not None and key is None:
      raise ValueError("client-level DP draws noise: pass round_fn(..., key=...).")
    _check_dense(spec.dense, base_params, state.dense)
    ranks, base, start = prepare(state, base_params, cohort, key)
    result = train(base, start, ranks, data)
    _check_dense(spec.dense, base_params, result.dense, "the backend's spec.dense trains other parameters "
                 "than the round's: build the backend with the round's spec")
    return finish(state, base, cohort, ranks, start, result, num_examples, key, public)

  if backend == "vmap":   # one program
    return jax.jit(round_fn)
  # Other backends run their clients their own way; the server's work around them is two programs.
  prepare, finish = jax.jit(prepare), jax.jit(finish)
  return round_fn


def _check_dense(pattern: str, base_params: Any, dense: Any, fix: str = "build the state with "
                 "hetlora.server.init(..., dense=hetlora.dense.select(base_params, spec.dense))") -> None:
  """Raises ``ValueError`` unless ``dense`` holds exactly the parameters ``pattern`` selects."""
  want, got = dense_lib.paths(dense_lib.select(base_params, pattern)), dense_lib.paths(dense or {})
  if want != got:
    raise ValueError(f"the dense trainables are {got}, but spec.dense={pattern!r} selects {want}; {fix}.")
