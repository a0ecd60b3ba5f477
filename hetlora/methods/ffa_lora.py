"""FFA-LoRA: ``a`` frozen at the shared random initialisation, only ``b`` trained and averaged.

Sun, Li, Li, Ding. Improving LoRA in Privacy-preserving Federated Learning.
ICLR 2024 (arXiv 2403.12313), Sec. 4. Every client shares one rank and the
server's ``a`` (drawn once, never changed); clients train and upload ``b``::

    b = sum_k p_k b_k,   a unchanged,   so   s a b = sum_k p_k s a b_k   (exactly).

Exact aggregation at half the communication. Defined for one shared rank:
mixed ranks are refused. Scale: any rule (one rank, one scale).

Example:
  >>> import jax.numpy as jnp
  >>> lora = {'q': {'a': jnp.ones((2, 3, 2)), 'b': jnp.ones((2, 2, 1)) * jnp.array([1., 3.])[:, None, None]}}
  >>> aggregate(lora, jnp.array([2, 2]), jnp.array([3., 1.]), jnp.ones(2))['q']['b'][:, 0].tolist()
  [1.5, 1.5]
"""

from __future__ import annotations

import jax

from hetlora import aggregation
from hetlora import lora as lora_lib
from hetlora.methods import base

LoRA = lora_lib.LoRA


@jax.jit
def aggregate(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array) -> LoRA:
  """``b = sum_k p_k b_k`` (and the same average of ``a``, which every client left unchanged)."""
  return aggregation.example_average(lora, ranks, num_examples, scales)


def keep_a(state: LoRA, aggregated: LoRA, ranks, base_params, public) -> LoRA:
  """The server's ``a`` never changes; ``b`` is the clients' average."""
  del ranks, base_params, public
  return lora_lib.map_modules(lambda old, new: {"a": old["a"], "b": new["b"]}, state, aggregated)


def make() -> base.Method:
  """FFA-LoRA (no options); every client must have the same rank."""
  return base.Method(name="ffa_lora", aggregate=aggregate, server_update=keep_a,
                     check_ranks=base.equal_ranks("ffa_lora"), local=base.Local(trainable="b"),
                     dp_linear=True)
