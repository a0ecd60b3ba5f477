"""The primitives every aggregator shares, over stacked client factors.

Every method's aggregator (``hetlora.methods.<name>.aggregate``) has one signature::

    aggregate(lora, ranks, num_examples, scales) -> global_lora

with ``lora`` a stacked tree (``a: [K, d_in, r_max]``, ``b: [K, r_max, d_out]``),
``ranks: int32[K]``, ``num_examples: float[K]`` (``n_k``) and ``scales: float[K]``
(each client's LoRA scale ``s_k``, see :func:`hetlora.lora.scale`). This module
holds the pieces they share: input checks, example weights, rank masking,
update norms from Gram matrices and weighted sums. Inputs are masked to their
ranks first, so slots ``>= r_k`` never leak into the global adapter.

Only ``jax`` (and the LoRA tree helpers) is needed: import it from any JAX code.

Example:
  >>> import jax.numpy as jnp
  >>> example_weights(jnp.array([1., 3., 0.])).tolist()
  [0.25, 0.75, 0.0]
  >>> lora = {'q': {'a': jnp.ones((2, 3, 2)), 'b': jnp.ones((2, 2, 1))}}
  >>> update_norms_sq(lora, jnp.array([1, 2]), jnp.ones(2))['q'].tolist()   # ||a diag(m) b||_F^2
  [3.0, 12.0]
"""

from __future__ import annotations

from typing import Protocol

import chex
import jax
import jax.numpy as jnp

from hetlora import lora as lora_lib

LoRA = lora_lib.LoRA


class Aggregator(Protocol):

  def __call__(self, lora: LoRA, ranks: jax.Array, num_examples: jax.Array,
               scales: jax.Array) -> LoRA:
    ...


def check_inputs(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array) -> None:
  """Validates the shared aggregator inputs: ``[K]`` vectors and stacked ``[K, ...]`` factors."""
  k = ranks.shape[0]
  chex.assert_shape([ranks, num_examples, scales], (k,))
  for path, mod in lora_lib.modules(lora).items():
    if mod["a"].ndim != 3 or mod["a"].shape[0] != k or mod["b"].shape[0] != k:
      raise ValueError(
          f"aggregate expects stacked factors a: [K={k}, d_in, r_max], b: [K, r_max, d_out]; "
          f"module {path!r} has a {mod['a'].shape}, b {mod['b'].shape}.")


def example_weights(num_examples: jax.Array) -> jax.Array:
  """``p_k = n_k / sum_j n_j``: ``float32[K]``, non-negative, summing to one (all zero if ``sum n = 0``)."""
  n = jnp.asarray(num_examples, jnp.float32)
  total = jnp.sum(n)
  return n / jnp.where(total > 0, total, 1.0)


def weighted_sum(lora: LoRA, weights: jax.Array) -> LoRA:
  """``sum_k w_k x_k`` for every factor of a stacked tree (``weights: [K]``)."""
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), lora)


def masked(lora: LoRA, ranks: jax.Array) -> LoRA:
  """Zero-pads every client to its rank: slots ``>= ranks[k]`` set to zero."""
  return jax.vmap(lora_lib.mask)(lora, ranks)


def update_norms_sq(lora: LoRA, ranks: jax.Array, scales: jax.Array) -> LoRA:
  """``||dW_k||_F^2`` per module and client, ``float32[K]`` per module.

  With ``A = a diag(m)`` and ``B = diag(m) b``,
  ``||s A B||_F^2 = s^2 * sum_ij (A^T A)_ij (B B^T)_ij``: two ``[r_max, r_max]``
  Gram matrices, never the ``[d_in, d_out]`` product.
  """
  return padded_norms_sq(masked(lora, ranks), scales)


def padded_norms_sq(padded: LoRA, scales: jax.Array) -> LoRA:
  """:func:`update_norms_sq` of factors already zero-padded to their ranks."""
  def one(mod):
    a = mod["a"].astype(jnp.float32)
    b = mod["b"].astype(jnp.float32)
    gram_a = jnp.einsum("kdi,kdj->kij", a, a)
    gram_b = jnp.einsum("kio,kjo->kij", b, b)
    return jnp.square(scales) * jnp.maximum(jnp.sum(gram_a * gram_b, axis=(1, 2)), 0.0)

  return lora_lib.map_modules(one, padded)


def sparsity_weights(norms: jax.Array, fallback: jax.Array) -> jax.Array:
  """``w_k = ||dW_k|| / sum_j ||dW_j||`` (HetLoRA Fig. 2b); ``fallback`` if all are zero."""
  total = jnp.sum(norms)
  return jnp.where(total > 0, norms / jnp.where(total > 0, total, 1.0), fallback)


def example_average(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array) -> LoRA:
  """``sum_k p_k pad(x_k)`` for every factor: FedAvg of the zero-padded factors."""
  check_inputs(lora, ranks, num_examples, scales)
  return weighted_sum(masked(lora, ranks), example_weights(num_examples))
