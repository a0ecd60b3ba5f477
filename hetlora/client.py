"""Local training of one client, and the round as its vmap.

One client trains its masked-rank LoRA tree for ``steps`` local steps
(``lax.scan``) on ``data = {'batch': [steps, B, ...], 'mask': [steps, B]}``.
The loss of a step is the mean per-example loss over the real examples
(``mask == 1``) plus the method's local penalty, if any; a step with no real
example is skipped entirely (factors and optimizer state unchanged), so
clients with fewer examples are padded, never dropped, and padding never
moves a momentum.

Packed round data may come as a row stream (:mod:`hetlora.data.row_stream`,
``data['stream']``): the client's non-empty token rows one at a time, each
adding its examples' share of its step's gradient, the row that ends a step
applying the optimizer. It is the same update as the packed step (the
step's loss is a sum over its examples, each in exactly one row; the
penalty's gradient is added once, at the step's last row), without the
empty rows a fixed rows-per-step shape computes.

What a method adds to local training (a regulariser, a rank change after
training, a frozen ``a``) comes in as a
:class:`hetlora.methods.Local`; this module names no method. Base
parameters the run trains in full (``LocalSpec.dense``, e.g. a classifier
head, :mod:`hetlora.dense`) start from their values in ``base_params`` and
train beside the factors, with the same optimizer.

A model enters only through ``loss_fn(base_params, lora_eff, batch) ->
float32[B]`` (per-example losses), where ``lora_eff`` is
:func:`hetlora.lora.fold_scale` of the client's tree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import optax

from hetlora import aggregation
from hetlora import dense as dense_lib
from hetlora import lora as lora_lib
from hetlora.methods import base as method_base
from hetlora.models import segments

LossFn = Callable[[Any, lora_lib.LoRA, Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class LocalSpec:
  """What every client of a run shares: model loss, optimizer, scale rule, the method's local rule.

  ``local``: the method's :class:`hetlora.methods.Local` (penalty, rank
  change, trainable factors); :func:`hetlora.server.make_round` sets it from
  the method for its built-in backends. ``dense``: a regex of the base
  parameters every client trains in full (:func:`hetlora.dense.select`;
  ``''``: none), e.g. ``r'^classifier/(kernel|bias)$'``.
  """
  loss_fn: LossFn
  optimizer: optax.GradientTransformation
  alpha: float
  scale_rule: str = "alpha/r"
  local: method_base.Local = method_base.Local()
  dense: str = ""


@chex.dataclass(frozen=True)
class ClientResult:
  """One client's (or, stacked, a cohort's) upload and metrics.

  Attributes:
    lora: trained factors, slots ``>= rank`` zero.
    rank: ``int32`` rank after local training (a method may lower it).
    loss: mean training loss over the real examples of all steps.
    examples: number of real examples seen (with repeats over epochs).
    update_norm: ``||dW||_F`` over all modules (scale included).
    dense: the trained dense parameters (``LocalSpec.dense``; ``{}`` if none).
    included: ``bool``, the upload counted in the aggregate (set by the
      server's screening, :mod:`hetlora.screening`; ``None`` before).
  """
  lora: lora_lib.LoRA
  rank: jax.Array
  loss: jax.Array
  examples: jax.Array
  update_norm: jax.Array
  dense: Any = None
  included: jax.Array | None = None


def local_train(spec: LocalSpec, base_params: Any, lora: lora_lib.LoRA, rank: jax.Array,
                data: Mapping[str, Any]) -> ClientResult:
  """Trains one client.

  Args:
    spec: shared loss, optimizer, scale rule, the method's local rule and the dense trainables.
    base_params: base weights; only the dense trainables (``spec.dense``) are trained, from
      their values here.
    lora: the client's starting tree ``a: [d_in, r_max]``, masked to ``rank``.
    rank: ``int32[]`` client rank.
    data: ``{'batch': tree of [steps, B, ...], 'mask': float[steps, B]}``, packed alike, or a row
      stream (``'stream'``: :mod:`hetlora.data.row_stream`).

  Returns:
    A :class:`ClientResult` with the trained tree masked to the new rank.
  """
  chex.assert_rank(rank, 0)
  r_max = lora_lib.r_max_of(lora)
  s = lora_lib.scale(rank, spec.alpha, spec.scale_rule, r_max)
  local = spec.local

  def objective(params, batch, weights, count, with_penalty):
    """``sum(weights * losses) / count`` (+ the method's penalty when ``with_penalty``)."""
    factors, dense = params
    losses = spec.loss_fn(dense_lib.overlay(base_params, dense), lora_lib.fold_scale(factors, rank, s), batch)
    data_loss = jnp.sum(losses * weights) / jnp.maximum(count, 1.0)
    penalty = local.penalty(factors, rank) * with_penalty if local.penalty is not None else 0.0
    return data_loss + penalty, data_loss

  def apply(params, opt_state, grads):
    updates, new_opt_state = spec.optimizer.update(grads, opt_state, params)
    if local.trainable == "b":
      updates = (lora_lib.map_modules(lambda u: {"a": jnp.zeros_like(u["a"]), "b": u["b"]}, updates[0]),
                 updates[1])
    factors, dense = optax.apply_updates(params, updates)
    return (lora_lib.mask(factors, rank), dense), new_opt_state

  def keep_if(flag, new, old):
    return jax.tree.map(lambda x, y: jnp.where(flag, x, y), new, old)

  def step(carry, xs):
    params, opt_state = carry
    batch, mask = xs
    n = jnp.sum(mask)
    (_, data_loss), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, mask, n, 1.0)
    new_params, new_opt_state = apply(params, opt_state, grads)
    return (keep_if(n > 0, new_params, params), keep_if(n > 0, new_opt_state, opt_state)), (data_loss * n, n)

  def row(carry, xs):   # one row of the stream: its examples' share of the step's loss
    params, opt_state, acc = carry
    tokens, at, ends = xs
    batch = {**jax.tree.map(lambda x: x[at], data["batch"]), **tokens}
    mask = data["mask"][at]
    n = jnp.sum(mask)
    here = segments.one_hot(tokens[segments.SEGMENT_IDS], mask.shape[-1]).max(axis=(0, 1))   # [B]
    (_, part), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, mask * here, n, ends)
    acc = jax.tree.map(jnp.add, acc, grads)
    new_params, new_opt_state = apply(params, opt_state, acc)
    acc = keep_if(ends, jax.tree.map(jnp.zeros_like, acc), acc)
    return (keep_if(ends, new_params, params), keep_if(ends, new_opt_state, opt_state), acc), (part * n, ends * n)

  lora = lora_lib.mask(lora, rank)
  start = (lora, dense_lib.select(base_params, spec.dense))
  if "stream" in data:
    stream = data["stream"]
    zeros = jax.tree.map(jnp.zeros_like, start)
    ((trained, trained_dense), _, _), (loss_sums, counts) = jax.lax.scan(
        row, (start, spec.optimizer.init(start), zeros), (stream["tokens"], stream["step"], stream["ends"]))
  else:
    ((trained, trained_dense), _), (loss_sums, counts) = jax.lax.scan(
        step, (start, spec.optimizer.init(start)), (data["batch"], data["mask"]))
  new_rank = rank if local.next_rank is None else local.next_rank(rank, lora, trained)
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
      dense=trained_dense,
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
  take = jax.jit(lambda tree, k: jax.tree.map(lambda x: x[k], tree))   # one program for every k
  stack = jax.jit(lambda results: jax.tree.map(lambda *xs: jnp.stack(xs), *results))

  def train(base_params, lora, ranks, data):
    results = []
    for k in range(ranks.shape[0]):
      lora_k, rank_k, data_k = take((lora, ranks, data), k)
      try:
        res = one(base_params, lora_k, rank_k, data_k)
      except Exception as e:  # re-raised with the client named
        raise RuntimeError(f"local training failed for cohort client {k}: {e}") from e
      loss = float(res.loss)
      if not math.isfinite(loss):
        raise FloatingPointError(f"cohort client {k} (rank {int(rank_k)}) has loss {loss}.")
      results.append(res)
    return stack(results)

  return train


BACKENDS = {"vmap": vmap_backend, "sequential": sequential_backend}


def make_backend(name: str, spec: LocalSpec) -> Callable[..., ClientResult]:
  if name not in BACKENDS:
    raise ValueError(f"client.backend {name!r} is unknown; choose one of {sorted(BACKENDS)}.")
  return BACKENDS[name](spec)
