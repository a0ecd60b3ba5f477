"""Jitted aggregators that reduce stacked client factors to the global LoRA.

Every aggregator has one signature::

    aggregate(lora, ranks, num_examples, scales) -> global_lora

with ``lora`` a stacked tree (``a: [K, d_in, r_max]``, ``b: [K, r_max, d_out]``),
``ranks: int32[K]``, ``num_examples: float[K]`` (``n_k``) and ``scales: float[K]``
(each client's LoRA scale ``s_k``, see :func:`hetlora.lora.scale`). The result is
one tree ``a: [d_in, r_max]``, ``b: [r_max, d_out]``. Inputs are masked to their
ranks first, so slots ``>= r_k`` never leak into the global adapter.

Only ``jax`` is needed: import this module from any JAX code.

Example:
  >>> import jax.numpy as jnp
  >>> lora = {'q': {'a': jnp.ones((2, 3, 4)), 'b': jnp.ones((2, 4, 5))}}
  >>> out = get('zero_pad')(lora, jnp.array([2, 4]), jnp.array([1., 3.]), jnp.ones(2))
  >>> out['q']['a'][0].tolist()      # slots 2, 3 only come from client 1 (p = 3/4)
  [1.0, 1.0, 0.75, 0.75]
"""

from __future__ import annotations

import functools
from typing import Callable, Protocol

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
  """``p_k = n_k / sum_j n_j``: ``float32[K]``, non-negative, summing to one."""
  n = jnp.asarray(num_examples, jnp.float32)
  return n / jnp.sum(n)


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


def _example_average(lora, ranks, num_examples, scales):
  check_inputs(lora, ranks, num_examples, scales)
  return weighted_sum(masked(lora, ranks), example_weights(num_examples))


@jax.jit
def fedavg(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array) -> LoRA:
  """FedAvg of the factors (HomLoRA / FedIT): ``a = sum_k p_k a_k``, ``b = sum_k p_k b_k``.

  ``p_k = n_k / sum_j n_j``. Meant for equal ranks (then it is exactly FedAvg);
  with unequal ranks it equals :func:`zero_pad`. Scale: any rule, the factors
  are averaged as they are.
  """
  return _example_average(lora, ranks, num_examples, scales)


@jax.jit
def zero_pad(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array) -> LoRA:
  """Zero-padding baseline: pad every client to ``r_max`` with zeros, then FedAvg.

  HetLoRA without self-pruning and sparsity weighting (Cho et al. 2024,
  Fig. 2a): slots a client does not have count as zeros in the
  example-weighted average. Scale: any rule.
  """
  return _example_average(lora, ranks, num_examples, scales)


@functools.partial(jax.jit, static_argnames=("per_module", "use_num_examples"))
def hetlora(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array,
            per_module: bool = False, use_num_examples: bool = False) -> LoRA:
  """HetLoRA sparsity-weighted aggregation of zero-padded factors.

  Cho, Liu, Xu, Fahrezi, Joshi. Heterogeneous LoRA for Federated Fine-tuning
  of On-Device Foundation Models. EMNLP 2024 (arXiv 2401.06432), Sec. 3 and
  Fig. 2 (a)-(b)::

      S_k = ||dW_k||_F = s_k ||a_k diag(m_k) b_k||_F,   w_k = S_k / sum_j S_j,
      a = sum_k w_k pad(a_k),   b = sum_k w_k pad(b_k).

  Args:
    lora, ranks, num_examples, scales: see the module docstring.
    per_module: one weight vector per adapted module (``True``) or one weight
      per client from the norms summed over modules (``False``, the default,
      as the reference PyTorch implementations do).
    use_num_examples: multiply ``S_k`` by ``n_k`` before normalising (off in
      the paper's formula).

  Returns:
    The global tree. If every update is zero (e.g. before any training), the
    weights fall back to ``p_k = n_k / sum n``.
  """
  check_inputs(lora, ranks, num_examples, scales)
  p = example_weights(num_examples)
  factor = num_examples.astype(jnp.float32) if use_num_examples else 1.0
  padded = masked(lora, ranks)
  norms = jax.tree.map(jnp.sqrt, padded_norms_sq(padded, scales))
  if per_module:
    return lora_lib.map_modules(
        lambda mod, n: weighted_sum(mod, sparsity_weights(n * factor, p)), padded, norms)
  total = sum(jax.tree.leaves(norms))
  return weighted_sum(padded, sparsity_weights(total * factor, p))


_REGISTRY: dict[str, Callable[..., LoRA]] = {
    "fedavg": fedavg,
    "zero_pad": zero_pad,
    "hetlora": hetlora,
}


def register(name: str, fn: Callable[..., LoRA]) -> None:
  """Adds an aggregator with the shared signature under ``name``."""
  if name in _REGISTRY:
    raise ValueError(f"aggregator {name!r} is already registered.")
  _REGISTRY[name] = fn


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str, **kwargs) -> Aggregator:
  """The aggregator ``name`` with its keyword options bound.

  >>> agg = get('hetlora', per_module=True)
  """
  if name not in _REGISTRY:
    raise ValueError(f"method.aggregator {name!r} is unknown; choose one of {names()}.")
  fn = _REGISTRY[name]
  return functools.partial(fn, **kwargs) if kwargs else fn
