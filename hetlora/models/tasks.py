"""Task heads as pure functions of ``(base_params, lora_eff, batch)``.

The federated client code trains only the LoRA tree: it calls
``loss_fn(base_params, lora_eff, batch) -> float32[B]`` (per-example, so the
caller can mask padded examples) with ``lora_eff = hetlora.lora.fold_scale(...)``.
Classification uses the softmax cross-entropy
``l_i = -log softmax(f(x_i))[y_i]``. A packed batch (:mod:`hetlora.models.segments`:
token columns ``[R, L]`` with ``segment_ids`` and ``positions``, example
columns ``[B]``) gives the same ``[B]`` outputs as its unpacked form.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hetlora.models import segments
from hetlora.models.provider import example_mask

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Any, Batch], jax.Array]


def _logits(model: nn.Module, base_params, lora_eff, batch: Batch) -> jax.Array:
  variables = {"params": base_params, "lora": lora_eff if lora_eff is not None else {}}
  packed = {}
  if segments.is_packed(batch):
    packed = dict(segment_ids=batch[segments.SEGMENT_IDS], positions=batch[segments.POSITIONS],
                  num_segments=segments.num_slots(batch))
  return model.apply(variables, batch["input_ids"], batch.get("attention_mask"),
                     batch.get("token_type_ids"), deterministic=True, **packed).astype(jnp.float32)


def classification_predict(model: nn.Module) -> LossFn:
  """``predict(base_params, lora_eff, batch) -> float32[B, num_labels]`` logits.

  ``batch``: ``{'input_ids': int32[B, L], 'attention_mask': int32[B, L]}``
  (``token_type_ids`` optional), or packed (module docstring).
  """
  def predict(base_params, lora_eff, batch: Batch) -> jax.Array:
    return _logits(model, base_params, lora_eff, batch)
  return predict


def classification_loss(model: nn.Module) -> LossFn:
  """``loss_fn(base_params, lora_eff, batch) -> float32[B]`` per-example cross-entropy.

  ``batch``: ``{'input_ids': int32[B, L], 'attention_mask': int32[B, L],
  'label': int32[B]}``, or packed (module docstring). Dropout is off (the
  signature carries no RNG).

  Example:
    >>> loss_fn = classification_loss(BertClassifier(cfg, num_labels=4))  # doctest: +SKIP
    >>> loss_fn(params, lora_eff, batch).shape                            # doctest: +SKIP
    (B,)
  """
  def loss_fn(base_params, lora_eff, batch: Batch) -> jax.Array:
    logits = _logits(model, base_params, lora_eff, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  return loss_fn


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example correctness ``float32[B]`` of ``argmax(logits) == labels``."""
  return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def classification_eval_sums(logits_fn: LossFn):
  """``eval_sums(base, lora_eff, batch)``: masked sums of correctness and cross-entropy of ``logits_fn``."""
  def eval_sums(base, lora_eff, batch):
    logits = logits_fn(base, lora_eff, batch)
    m = example_mask(batch)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = accuracy(logits, batch["label"])
    return {"accuracy": (jnp.sum(correct * m), jnp.sum(m)), "loss": (jnp.sum(nll * m), jnp.sum(m))}
  return eval_sums
