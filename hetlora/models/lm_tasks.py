"""Causal language-modelling losses in the per-example form the federated client uses.

For a sequence ``x_0..x_{L-1}`` and weights ``w_t`` (``loss_mask * attention_mask``
at target position ``t``), the per-example loss is the mean token negative
log-likelihood of next-token prediction (Bengio et al., JMLR 2003)::

    loss = - sum_{t>=1} w_t log p(x_t | x_<t) / max(sum_{t>=1} w_t, 1)

Position 0 is never a target (nothing predicts it).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

Batch = Mapping[str, jax.Array]


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


def causal_lm_loss(model: nn.Module) -> Callable[[Any, Any, Batch], jax.Array]:
  """Builds ``loss_fn(base_params, lora_eff, batch) -> float32[B]``.

  ``batch`` holds ``'input_ids': int32[B, L]``, ``'attention_mask': int32[B, L]``
  and ``'loss_mask': float32[B, L]``, where ``loss_mask[b, t] = 1`` makes token
  ``t`` (predicted from positions ``< t``) count; ``loss_mask[:, 0]`` is ignored.
  ``lora_eff`` is the folded tree of :func:`hetlora.lora.fold_scale` (or None).
  The model is applied as ``model.apply({'params': base_params, 'lora': lora_eff},
  input_ids, attention_mask)`` and must return ``[B, L, V]`` logits.

  Example:
    >>> loss_fn = causal_lm_loss(model)
    >>> per_example = loss_fn(params, lora_eff, batch)      # float32[B]
    >>> grads = jax.grad(lambda l: loss_fn(params, l, batch).mean())(lora_eff)
  """
  def loss_fn(base_params, lora_eff, batch: Batch) -> jax.Array:
    variables = {"params": base_params}
    if lora_eff:
      variables["lora"] = lora_eff
    logits = model.apply(variables, batch["input_ids"], batch["attention_mask"])
    lp = token_logprobs(logits, batch["input_ids"])
    w = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)
    return -(lp * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
  return loss_fn
