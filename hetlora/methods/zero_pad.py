"""Zero-padding: HetLoRA without self-pruning and without sparsity weighting.

Cho, Liu, Xu, Fahrezi, Joshi. EMNLP 2024 (arXiv 2401.06432), Fig. 2a, the
baseline HetLoRA is compared with. Distribution by truncation; every client
is padded to ``r_max`` with zeros and the factors are averaged by example count::

    a = sum_k p_k pad(a_k),   b = sum_k p_k pad(b_k),   p_k = n_k / sum_j n_j.

Slots a client does not have count as zeros. The local objective is the task
loss alone. Scale: any rule (factors are averaged as they are).

Example:
  >>> import jax.numpy as jnp
  >>> lora = {'q': {'a': jnp.ones((2, 3, 4)), 'b': jnp.ones((2, 4, 5))}}
  >>> out = aggregate(lora, jnp.array([2, 4]), jnp.array([1., 3.]), jnp.ones(2))
  >>> out['q']['a'][0].tolist()      # slots 2, 3 only come from client 1 (p = 3/4)
  [1.0, 1.0, 0.75, 0.75]
"""

from __future__ import annotations

import jax

from hetlora import aggregation
from hetlora.methods import base

aggregate = jax.jit(aggregation.example_average)


def make() -> base.Method:
  """Zero-padding (no options)."""
  return base.Method(name="zero_pad", aggregate=aggregate, dp_linear=True)
