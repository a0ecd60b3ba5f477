"""HomLoRA: FedAvg of the LoRA factors, every client at the same rank.

The homogeneous baseline (FedIT: Zhang et al., Towards Building the Federated
GPT: Federated Instruction Tuning, ICASSP 2024, arXiv 2305.05644)::

    a = sum_k p_k a_k,   b = sum_k p_k b_k,   p_k = n_k / sum_j n_j.

Clients start each round from the global ``(a, b)``. Averaging factors is not
averaging updates (``sum p_k a_k b_k != (sum p_k a_k)(sum p_k b_k)``); that gap
is what FlexLoRA and FLoRA address. Defined for one shared rank: mixed ranks
are refused (that is ``zero_pad``). Scale: any rule.

Example:
  >>> import jax.numpy as jnp
  >>> lora = {'q': {'a': jnp.ones((2, 3, 2)), 'b': jnp.ones((2, 2, 1)) * jnp.array([1., 3.])[:, None, None]}}
  >>> aggregate(lora, jnp.array([2, 2]), jnp.array([1., 1.]), jnp.ones(2))['q']['b'][:, 0].tolist()
  [2.0, 2.0]
"""

from __future__ import annotations

import jax

from hetlora import aggregation
from hetlora.methods import base

aggregate = jax.jit(aggregation.example_average)


def make() -> base.Method:
  """HomLoRA FedAvg (no options); every client must have the same rank."""
  return base.Method(name="homlora", aggregate=aggregate, check_ranks=base.equal_ranks("homlora"),
                     dp_linear=True)
