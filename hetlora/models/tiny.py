"""Tiny Flax models for tests, examples and benchmarks.

``MLPClassifier``: ``x: [B, d_in] -> logits [B, classes]`` with LoRADense
layers named ``hidden_0 .. hidden_{n-1}`` and ``head``.
``Linear``: ``y = x @ W`` (one LoRADense named ``linear``, no bias), whose
gradients are simple enough for plain-numpy references.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from hetlora.models.layers import LoRADense


class MLPClassifier(nn.Module):
  hidden: Sequence[int] = (64, 64)
  num_classes: int = 4

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.hidden):
      x = nn.gelu(LoRADense(width, name=f"hidden_{i}")(x))
    return LoRADense(self.num_classes, name="head")(x)


class Linear(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return LoRADense(self.features, use_bias=False, name="linear")(x)


def classification_loss(model: nn.Module):
  """``loss_fn(base, lora_eff, {'x': [B, d], 'label': int[B]}) -> float32[B]`` cross-entropy."""
  def loss_fn(base_params, lora_eff, batch):
    logits = model.apply({"params": base_params, "lora": lora_eff}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["label"])
  return loss_fn


def squared_loss(model: nn.Module):
  """``loss_fn(base, lora_eff, {'x': [B, d], 'y': [B, o]}) -> 0.5 ||f(x) - y||^2: float32[B]``."""
  def loss_fn(base_params, lora_eff, batch):
    pred = model.apply({"params": base_params, "lora": lora_eff}, batch["x"])
    return 0.5 * jnp.sum(jnp.square(pred - batch["y"]), axis=-1)
  return loss_fn


def init_params(model: nn.Module, key: jax.Array, d_in: int):
  """Base parameters of ``model`` for inputs of width ``d_in``."""
  return model.init(key, jnp.zeros((1, d_in)))["params"]
