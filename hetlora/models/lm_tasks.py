"""Causal language-modelling losses in the per-example form the federated client uses.

For a sequence ``x_0..x_{L-1}`` and weights ``w_t`` (``loss_mask * attention_mask``
at target position ``t``), the per-example loss is the mean token negative
log-likelihood of next-token prediction (Bengio et al., JMLR 2003)::

    loss = - sum_{t>=1} w_t log p(x_t | x_<t) / max(sum_{t>=1} w_t, 1)

Position 0 is never a target (nothing predicts it).

Memory. Full logits ``[B, L, V]`` (and, in the backward pass, their softmax
and cotangent: several buffers of ``4 V`` bytes per token, ~0.2 MB each for
SmolLM2's ``V = 49152``) are a large share of a small decoder's training
memory, once per client under the round's ``vmap``, and all of it in an
evaluation batch. :func:`causal_lm_loss` with ``chunk = C > 0`` (the
default) therefore stops the model at its final hidden states ``h: [B, L, D]``
and scans over the ``B (L - 1)`` target tokens, ``C`` at a time
(:func:`chunked_logprobs`; batch and positions flattened, so ``C`` bounds the
logits whatever ``B``)::

    log p(x_{t+1} | x_<=t) = z_t[x_{t+1}] - logsumexp_v z_t[v],   z_t = head(h_t)

each chunk under ``jax.checkpoint``, so forward and backward hold the logits
of one chunk, ``[C, V]``, never ``[B, L, V]``. Same numbers as ``chunk =
0`` (full logits) up to float rounding, LoRA on the head included.

Packed batches (:mod:`hetlora.models.segments`: several examples per row,
``segment_ids`` and ``positions``) give the same per-example losses: the model
attends causally within each segment, a target counts only when it and the
token predicting it share a segment, and the sums above run per segment into
the ``B`` example slots. Evaluation (``eval_sums``) reads unpacked batches.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from hetlora.models import llama, segments

Batch = Mapping[str, jax.Array]
DEFAULT_CHUNK = 128


def token_logprobs(logits: jax.Array, input_ids: jax.Array) -> jax.Array:
  """``log p(x_t | x_<t)`` for ``t = 1..L-1``.

  Args:
    logits: ``float[B, L, V]``, position ``t`` predicting token ``t + 1``.
    input_ids: ``int32[B, L]``.

  Returns:
    ``float32[B, L-1]``; entry ``t-1`` scores token ``t``.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]


def chunked_logprobs(head: Callable[[Any, jax.Array], jax.Array], head_params: Any,
                     hidden: jax.Array, targets: jax.Array, chunk: int,
                     with_argmax: bool = False):
  """``log softmax(head(h_i))[y_i]`` for every token ``i``, at most ``chunk`` tokens at a time.

  The ``N`` tokens (all leading axes of ``targets`` flattened, e.g. ``N = B T``)
  are split into ``n = ceil(N / chunk)`` chunks of ``C = ceil(N / n) <= chunk``
  (``n C - N < n`` zero-padded rows at the end). A ``lax.scan`` over the chunks
  computes ``z = head(head_params, h_c): float32[C, V]`` and ``z[y] -
  logsumexp(z)`` under ``jax.checkpoint``, so neither pass holds more than one
  chunk's ``[C, V]`` logits, whatever the batch size. Gradients flow to
  ``hidden`` and ``head_params``.

  Args:
    head: ``head(head_params, h: [C, D]) -> float32[C, V]``.
    head_params: pytree the head reads (e.g. ``(params, lora)``).
    hidden: ``[..., D]`` states, ``hidden[i]`` predicting ``targets[i]``.
    targets: ``int32[...]``.
    chunk: at most this many tokens per chunk (``>= 1``; need not divide ``N``).
    with_argmax: also return ``argmax_v z_i: int32[...]`` (no gradient).

  Returns:
    ``float32[...]`` log-probabilities (the shape of ``targets``), and the argmax if asked.

  Example:
    >>> head = lambda p, h: h @ p                                   # [C, D] @ [D, V]
    >>> lp = chunked_logprobs(head, jnp.ones((4, 7)), jnp.ones((2, 5, 4)), jnp.zeros((2, 5), jnp.int32), 3)
    >>> lp.shape, bool(jnp.allclose(lp, -jnp.log(7.0)))
    ((2, 5), True)
  """
  if chunk < 1:
    raise ValueError(f"chunk={chunk} must be >= 1 tokens.")
  shape, d = targets.shape, hidden.shape[-1]
  total = targets.size
  n = -(-total // chunk)
  c = -(-total // n)                       # balanced: N = 254, chunk 128 -> 2 x 127, not 128 + 126
  pad = n * c - total
  h = jnp.pad(hidden.reshape(total, d), ((0, pad), (0, 0))).reshape(n, c, d)
  y = jnp.pad(targets.reshape(total), (0, pad)).reshape(n, c)

  @jax.checkpoint
  def one(params, h_c, y_c):
    z = head(params, h_c)                                                        # [C, V]
    lp = jnp.take_along_axis(z, y_c[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(z, axis=-1)
    if with_argmax:
      return lp, jnp.argmax(z, axis=-1).astype(jnp.int32)
    return lp, None

  _, (lp, top) = jax.lax.scan(lambda _, xs: (None, one(head_params, *xs)), None, (h, y))
  unchunk = lambda x: x.reshape(n * c)[:total].reshape(shape)
  if with_argmax:
    return unchunk(lp), unchunk(top)
  return unchunk(lp)


def answer_weights(batch: Batch) -> jax.Array:
  """``w_t = loss_mask_t * attention_mask_t`` for ``t = 1..L-1``: ``float32[B, L-1]``.

  Packed rows: ``w_t = loss_mask_t * [s_t = s_{t-1} > 0]`` (a target predicted
  from its own segment), ``float32[R, L-1]``.
  """
  if segments.is_packed(batch):
    s = batch[segments.SEGMENT_IDS]
    own = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] > 0)
    return batch["loss_mask"][:, 1:].astype(jnp.float32) * own
  return (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)


def _apply_kwargs(batch: Batch) -> dict:
  """The model's packing arguments (``segment_ids``, ``positions``) of a packed batch, else none."""
  if segments.is_packed(batch):
    return {"segment_ids": batch[segments.SEGMENT_IDS], "positions": batch[segments.POSITIONS]}
  return {}


def model_logprobs(model: nn.Module, base_params, lora_eff, batch: Batch, chunk: int,
                   with_argmax: bool = False):
  """``log p(x_t | x_<t): float32[B, L-1]`` of a :class:`hetlora.models.llama.Llama` (and argmax).

  ``batch``: unpacked (``attention_mask``) or packed (``segment_ids``, ``positions``:
  then ``[R, L-1]``). ``chunk = 0`` applies the model for full ``[B, L, V]`` logits; ``chunk > 0``
  applies it with ``return_hidden=True`` and the head by :func:`chunked_logprobs`.
  """
  variables = llama.variables(base_params, lora_eff)
  ids, mask, packed = batch["input_ids"], batch.get("attention_mask"), _apply_kwargs(batch)
  if chunk == 0:
    logits = model.apply(variables, ids, mask, **packed)
    lp = token_logprobs(logits, ids)
    if with_argmax:
      return lp, jnp.argmax(logits[:, :-1], axis=-1).astype(jnp.int32)
    return lp
  h = model.apply(variables, ids, mask, return_hidden=True, **packed)[:, :-1]     # [B, L-1, D]
  head = lambda p, h_c: llama.head_logits(model, p[0], p[1], h_c)
  return chunked_logprobs(head, (base_params, lora_eff), h, ids[:, 1:], chunk, with_argmax)


def causal_lm_loss(model: nn.Module, chunk: int = DEFAULT_CHUNK) -> Callable[[Any, Any, Batch], jax.Array]:
  """Builds ``loss_fn(base_params, lora_eff, batch) -> float32[B]``.

  ``batch`` holds ``'input_ids': int32[B, L]``, ``'attention_mask': int32[B, L]``
  and ``'loss_mask': float32[B, L]``, where ``loss_mask[b, t] = 1`` makes token
  ``t`` (predicted from positions ``< t``) count; ``loss_mask[:, 0]`` is ignored.
  Or packed: ``input_ids``, ``loss_mask``, ``segment_ids``, ``positions: [R, L]``
  and ``segment_length: int32[B]`` (module docstring), same ``float32[B]``.
  ``lora_eff`` is the folded tree of :func:`hetlora.lora.fold_scale` (or None).

  ``chunk = 0``: the model is applied as ``model.apply({'params': base_params,
  'lora': lora_eff}, input_ids, attention_mask)`` and must return ``[B, L, V]``
  logits (any such model). ``chunk = C > 0`` (default 128, a
  :class:`hetlora.models.llama.Llama`): the head is applied to ``C`` tokens at
  a time (module docstring); same loss and gradients, peak memory of one
  ``[C, V]`` chunk of logits instead of ``[B, L, V]``.

  Example:
    >>> loss_fn = causal_lm_loss(model)                     # doctest: +SKIP
    >>> per_example = loss_fn(params, lora_eff, batch)      # float32[B]  # doctest: +SKIP
    >>> grads = jax.grad(lambda l: loss_fn(params, l, batch).mean())(lora_eff)  # doctest: +SKIP
  """
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ValueError(f"chunk={chunk!r} must be an int >= 0 (0 = full logits).")

  def loss_fn(base_params, lora_eff, batch: Batch) -> jax.Array:
    lp = model_logprobs(model, base_params, lora_eff, batch, chunk)
    w = answer_weights(batch)
    if segments.is_packed(batch):
      s, b = batch[segments.SEGMENT_IDS][:, 1:], segments.num_slots(batch)
      return -segments.segment_sum(lp * w, s, b) / jnp.maximum(segments.segment_sum(w, s, b), 1.0)
    return -(lp * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
  return loss_fn
