"""Local training of one client, rank self-pruning, and the round as its vmap.

One client trains its masked-rank LoRA tree for ``steps`` local steps
(``lax.scan``) on ``data = {'batch': [steps, B, ...], 'mask': [steps, B]}``.
The loss of a step is the mean per-example loss over the real examples
(``mask == 1``); a step with no real example is skipped entirely (factors
and optimizer state unchanged), so clients with fewer examples are padded,
never dropped, and padding never moves a momentum.

Rank self-pruning follows HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432,
Sec. 3.2 "local training with rank self-pruning"), as specified in the
project's ALGORITHMS.md: the loss gains::

    lam * sum_modules ||b[t:r, :]||_F * ||a[:, t:r]||_F,   t = floor(gamma * r)

(gradients flow through it), and if that tail score after local training is
below its value at the start of the round, ``r <- max(r_min, floor(gamma r))``
and the pruned slots are zeroed before upload.

A model enters only through ``loss_fn(base_params, lora_eff, batch) ->
float32[B]`` (per-example losses), where ``lora_eff`` is
:func:`hetlora.lora.fold_scale` of the client's tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import optax

from hetlora import aggregation
from hetlora import lora as lora_lib

LossFn = Callable[[Any, lora_lib.LoRA, Mapping[str, jax.Array]], jax.Array]
TRAINABLE = ("ab", "b")


@dataclasses.dataclass(frozen=True)
class Pruning:
  """HetLoRA rank self-pruning options.

  Attributes:
    lam: weight of the tail-norm regulariser (0 disables the term).
    gamma: keep ratio; ``t = floor(gamma * r)`` slots are kept (0.99 drops one
      slot per pruning for ranks below 100).
    r_min: ranks never fall below this.
    enabled: apply the pruning decision (the regulariser applies whenever
      ``lam > 0``).
  """
  lam: float = 0.0
  gamma: float = 0.99
  r_min: int = 1
  enabled: bool = False

  def __post_init__(self):
    if not 0.0 < self.gamma <= 1.0:
      raise ValueError(f"client.pruning.gamma must be in (0, 1], got {self.gamma}.")
    if self.r_min < 1:
      raise ValueError(f"client.pruning.r_min must be >= 1, got {self.r_min}.")
    if self.lam < 0:
      raise ValueError(f"client.pruning.lam must be >= 0, got {self.lam}.")


@dataclasses.dataclass(frozen=True)
class LocalSpec:
  """What every client of a run shares: model loss, optimizer, scale rule.

  ``trainable``: ``'ab'`` trains both factors; ``'b'`` keeps ``a`` fixed at
  its starting value (FFA-LoRA, Sun et al., ICLR 2024): the optimizer's
  update of ``a`` (gradient step and any weight decay) is replaced by zero.
  """
  loss_fn: LossFn
  optimizer: optax.GradientTransformation
  alpha: float
  scale_rule: str = "alpha/r"
  pruning: Pruning = Pruning()
  trainable: str = "ab"

  def __post_init__(self):
    if self.trainable not in TRAINABLE:
      raise ValueError(f"client.trainable must be one of {TRAINABLE}, got {self.trainable!r}.")


@chex.dataclass(frozen=True)
class ClientResult:
  """One client's (or, stacked, a cohort's) upload and metrics.

  Attributes:
    lora: trained factors, slots ``>= rank`` zero.
    rank: ``int32`` rank after self-pruning.
    loss: mean training loss over the real examples of all steps.
    examples: number of real examples seen (with repeats over epochs).
    update_norm: ``||dW||_F`` over all modules (scale included).
  """
  lora: lora_lib.LoRA
  rank: jax.Array
  loss: jax.Array
  examples: jax.Array
  update_norm: jax.Array


def _safe_norm(x: jax.Array) -> jax.Array:
  """Frobenius norm with a zero (not NaN) gradient at zero."""
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def tail_score(lora: lora_lib.LoRA, rank: jax.Array, gamma: float) -> jax.Array:
  """``sum_modules ||b[t:r]||_F ||a[:, t:r]||_F`` with ``t = floor(gamma r)``."""
  r_max = lora_lib.r_max_of(lora)
  t = jnp.floor(gamma * rank.astype(jnp.float32)).astype(jnp.int32)
  slots = jnp.arange(r_max)
  tail = ((slots >= t) & (slots < rank)).astype(jnp.float32)
  scores = [_safe_norm(mod["b"] * tail[:, None]) * _safe_norm(mod["a"] * tail)
            for mod in lora_lib.modules(lora).values()]
  return sum(scores)


def pruned_rank(rank: jax.Array, before: jax.Array, after: jax.Array, pruning: Pruning) -> jax.Array:
  """``max(r_min, floor(gamma r))`` if the tail score fell, else ``rank`` (never larger)."""
  if not pruning.enabled:
    return rank
  smaller = jnp.floor(pruning.gamma * rank.astype(jnp.float32)).astype(jnp.int32)
  smaller = jnp.minimum(rank, jnp.maximum(pruning.r_min, smaller))
  return jnp.where(after < before, smaller, rank).astype(jnp.int32)


def local_train(spec: LocalSpec, base_params: Any, lora: lora_lib.LoRA, rank: jax.Array,
                data: Mapping[str, Any]) -> ClientResult:
  """Trains one client.

  Args:
    spec: shared loss, optimizer, scale rule and pruning options.
    base_params: frozen base weights (never differentiated).
    lora: the client's starting tree ``a: [d_in, r_max]``, masked to ``rank``.
    rank: ``int32[]`` client rank.
    data: ``{'batch': tree of [steps, B, ...], 'mask': float[steps, B]}``.

  Returns:
    A :class:`ClientResult` with the trained tree masked to the new rank.
  """
  chex.assert_rank(rank, 0)
  r_max = lora_lib.r_max_of(lora)
  s = lora_lib.scale(rank, spec.alpha, spec.scale_rule, r_max)
  lam, gamma = spec.pruning.lam, spec.pruning.gamma

  def objective(params, batch, mask):
    losses = spec.loss_fn(base_params, lora_lib.fold_scale(params, rank, s), batch)
    data_loss = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    reg = lam * tail_score(params, rank, gamma) if lam > 0 else 0.0
    return data_loss + reg, data_loss

  def step(carry, xs):
    params, opt_state = carry
    batch, mask = xs
    (_, data_loss), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, mask)
    updates, new_opt_state = spec.optimizer.update(grads, opt_state, params)
    if spec.trainable == "b":
      updates = lora_lib.map_modules(lambda u: {"a": jnp.zeros_like(u["a"]), "b": u["b"]}, updates)
    new_params = lora_lib.mask(optax.apply_updates(params, updates), rank)
    n = jnp.sum(mask)
    keep = lambda new, old: jax.tree.map(lambda x, y: jnp.where(n > 0, x, y), new, old)
    return (keep(new_params, params), keep(new_opt_state, opt_state)), (data_loss * n, n)

  lora = lora_lib.mask(lora, rank)
  score_before = tail_score(lora, rank, gamma)
  (trained, _), (loss_sums, counts) = jax.lax.scan(
      step, (lora, spec.optimizer.init(lora)), (data["batch"], data["mask"]))
  new_rank = pruned_rank(rank, score_before, tail_score(trained, rank, gamma), spec.pruning)
  trained = lora_lib.mask(trained, new_rank)
  examples = jnp.sum(counts)
  new_scale = lora_lib.scale(new_rank, spec.alpha, spec.scale_rule, r_max)
  norms_sq = aggregation.padded_norms_sq(jax.tree.map(lambda x: x[None], trained), new_scale[None])
  return ClientResult(
      lora=trained,
      rank=new_rank,
      loss=jnp.sum(loss_sums) / jnp.maximum(examples, 1.0),
      examples=examples,
      update_norm=jnp.sqrt(sum(jax.tree.leaves(norms_sq)))[0],
  )


def vmap_backend(spec: LocalSpec) -> Callable[..., ClientResult]:
  """All clients of a round in one jitted ``vmap``; base weights shared (``in_axes=None``).

  Returns ``train(base_params, lora [K, ...], ranks int32[K], data [K, steps, B, ...])``.
  """
  return jax.jit(jax.vmap(lambda base, l, r, d: local_train(spec, base, l, r, d),
                          in_axes=(None, 0, 0, 0)))


def sequential_backend(spec: LocalSpec) -> Callable[..., ClientResult]:
  """Clients one after another (same per-client function), for debugging.

  Same signature and numbers as :func:`vmap_backend`; an exception or a
  non-finite loss names the failing client's position in the cohort.
  """
  one = jax.jit(lambda base, l, r, d: local_train(spec, base, l, r, d))

  def train(base_params, lora, ranks, data):
    results = []
    for k in range(ranks.shape[0]):
      take = lambda x, k=k: x[k]
      try:
        res = one(base_params, jax.tree.map(take, lora), ranks[k], jax.tree.map(take, data))
      except Exception as e:  # re-raised with the client named
        raise RuntimeError(f"local training failed for cohort client {k}: {e}") from e
      if not bool(jnp.isfinite(res.loss)):
        raise FloatingPointError(f"cohort client {k} (rank {int(ranks[k])}) has loss {float(res.loss)}.")
      results.append(res)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *results)

  return train


BACKENDS = {"vmap": vmap_backend, "sequential": sequential_backend}


def make_backend(name: str, spec: LocalSpec) -> Callable[..., ClientResult]:
  if name not in BACKENDS:
    raise ValueError(f"client.backend {name!r} is unknown; choose one of {sorted(BACKENDS)}.")
  return BACKENDS[name](spec)
