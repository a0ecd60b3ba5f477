"""Flax layers that read a LoRA tree from the ``'lora'`` variable collection.

A model built from :class:`LoRADense` is applied as
``model.apply({'params': base, 'lora': lora_eff}, ...)`` where ``lora_eff``
is :func:`hetlora.lora.fold_scale` of a LoRA tree whose module paths mirror
the model's. Modules without an entry in ``'lora'`` run the plain kernel.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp


class LoRADense(nn.Module):
  """``y = x @ W0 + b0 + (x @ a) @ b`` with ``W0: [d_in, features]``.

  ``a: [d_in, r_max]`` and ``b: [r_max, features]`` come, already scaled and
  masked, from the ``'lora'`` collection at this module's path. Compute runs
  in ``dtype`` (default: the input's), so bf16 base weights work.
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    if self.has_variable("lora", "a"):
      a = self.get_variable("lora", "a").astype(dtype)
      b = self.get_variable("lora", "b").astype(dtype)
      y = y + jnp.dot(jnp.dot(x.astype(dtype), a), b)
    return y
