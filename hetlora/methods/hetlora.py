"""HetLoRA: truncation, rank self-pruning and sparsity-weighted aggregation.

Cho, Liu, Xu, Fahrezi, Joshi. Heterogeneous LoRA for Federated Fine-tuning
of On-Device Foundation Models. EMNLP 2024 (arXiv 2401.06432), Sec. 3 and
Fig. 2. The server keeps one global adapter at ``r_max`` (the state).

1. **Distribution by truncation** (Sec. 3.1): client ``k`` continues from the
   first ``r_k`` slots, ``a[:, :r_k]``, ``b[:r_k, :]``.
2. **Local training with rank self-pruning** (Sec. 3.2): the local loss gains
   the tail regulariser (gradients flow through it)::

       lam * sum_modules ||b[t:r, :]||_F * ||a[:, t:r]||_F,    t = floor(gamma r)

   and if that tail score after local training is below its value at the
   start of the round, ``r <- max(r_min, floor(gamma r))``; the pruned slots
   are zeroed before upload and the client keeps its new rank.
3. **Sparsity-weighted aggregation** (Fig. 2 (a)-(b)) of the zero-padded factors::

       S_k = ||dW_k||_F = s_k ||a_k diag(m_k) b_k||_F,   w_k = S_k / sum_j S_j,
       a = sum_k w_k pad(a_k),   b = sum_k w_k pad(b_k).

Norms come from ``r_max x r_max`` Gram matrices, never the ``d_in x d_out``
product. The norm includes each client's scale ``s_k``: under one shared scale
(``alpha/r_max``) this is the caption's ``||B_k A_k||_F`` up to a constant;
under ``alpha/r_k`` it weighs low-rank clients up by ``r_max / r_k``. A client
with no examples this round gets weight zero (it did not train). The
regulariser and self-pruning belong to HetLoRA alone: every other method
trains on its task loss.

Example:
  >>> import jax.numpy as jnp
  >>> lora = {'q': {'a': jnp.ones((2, 3, 2)), 'b': jnp.ones((2, 2, 1))}}
  >>> out = aggregate(lora, jnp.array([1, 2]), jnp.ones(2), jnp.ones(2))   # norms 3 and 6
  >>> [round(x, 4) for x in out['q']['a'][0].tolist()]
  [1.0, 0.6667]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hetlora import aggregation
from hetlora import lora as lora_lib
from hetlora.methods import base
from hetlora.methods import zero_pad

LoRA = lora_lib.LoRA


@functools.partial(jax.jit, static_argnames=("per_module", "use_num_examples"))
def aggregate(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array,
              per_module: bool = False, use_num_examples: bool = False) -> LoRA:
  """Sparsity-weighted average of the zero-padded factors (step 3).

  Args:
    lora: stacked tree ``a: [K, d_in, r_max]``, ``b: [K, r_max, d_out]``.
    ranks: ``int32[K]``; num_examples: ``float[K]``; scales: ``float[K]``.
    per_module: one weight vector per adapted module (``True``) or one weight
      per client from the norms summed over modules (``False``, the default,
      as the reference PyTorch implementations do).
    use_num_examples: multiply ``S_k`` by ``n_k`` before normalising (off in
      the paper's formula).

  Returns:
    The global tree ``a: [d_in, r_max]``. If every update is zero (e.g.
    before any training), the weights fall back to ``p_k = n_k / sum n``.
  """
  aggregation.check_inputs(lora, ranks, num_examples, scales)
  n = num_examples.astype(jnp.float32)
  p = aggregation.example_weights(n)
  factor = n if use_num_examples else (n > 0).astype(jnp.float32)
  padded = aggregation.masked(lora, ranks)
  norms = jax.tree.map(jnp.sqrt, aggregation.padded_norms_sq(padded, scales))
  if per_module:
    return lora_lib.map_modules(
        lambda mod, s: aggregation.weighted_sum(mod, aggregation.sparsity_weights(s * factor, p)),
        padded, norms)
  total = sum(jax.tree.leaves(norms))
  return aggregation.weighted_sum(padded, aggregation.sparsity_weights(total * factor, p))


def _safe_norm(x: jax.Array) -> jax.Array:
  """Frobenius norm with a zero (not NaN) gradient at zero."""
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def tail_score(lora: LoRA, rank: jax.Array, gamma: float) -> jax.Array:
  """``sum_modules ||b[t:r]||_F ||a[:, t:r]||_F`` with ``t = floor(gamma r)`` (one client)."""
  r_max = lora_lib.r_max_of(lora)
  t = jnp.floor(gamma * rank.astype(jnp.float32)).astype(jnp.int32)
  slots = jnp.arange(r_max)
  tail = ((slots >= t) & (slots < rank)).astype(jnp.float32)
  scores = [_safe_norm(mod["b"] * tail[:, None]) * _safe_norm(mod["a"] * tail)
            for mod in lora_lib.modules(lora).values()]
  return sum(scores)


def pruned_rank(rank: jax.Array, before: jax.Array, after: jax.Array, gamma: float,
                r_min: int) -> jax.Array:
  """``max(r_min, floor(gamma r))`` if the tail score fell, else ``rank`` (never larger)."""
  smaller = jnp.floor(gamma * rank.astype(jnp.float32)).astype(jnp.int32)
  smaller = jnp.minimum(rank, jnp.maximum(r_min, smaller))
  return jnp.where(after < before, smaller, rank).astype(jnp.int32)


def local(lam: float = 0.0, gamma: float = 0.99, prune: bool = False, r_min: int = 1) -> base.Local:
  """HetLoRA's local objective: the tail regulariser (``lam > 0``) and self-pruning (``prune``)."""
  penalty = (lambda lora, rank: lam * tail_score(lora, rank, gamma)) if lam > 0 else None

  def next_rank(rank, start, trained):
    return pruned_rank(rank, tail_score(start, rank, gamma), tail_score(trained, rank, gamma),
                       gamma, r_min)

  return base.Local(penalty=penalty, next_rank=next_rank if prune else None)


def make(lam: float = 1e-3, gamma: float = 0.99, prune: bool = True, r_min: int = 1,
         per_module: bool = False, use_num_examples: bool = False,
         sparsity_weighting: bool = True) -> base.Method:
  """HetLoRA with its options.

  Args:
    lam: weight of the tail-norm regulariser (``0`` drops the term).
    gamma: keep ratio of self-pruning, ``t = floor(gamma r)`` (0.99 drops one
      slot per pruning for ranks below 100, as the authors suggest).
    prune: apply the self-pruning decision.
    r_min: ranks never fall below this (from ``config.lora.r_min``).
    per_module, use_num_examples: see :func:`aggregate`.
    sparsity_weighting: aggregate by :func:`aggregate` (step 3); ``False``
      averages the zero-padded factors by example count instead
      (``p_k = n_k / sum n``, the zero-padding baseline's rule), the
      ablation of step 3 with the local objective kept.
  """
  if not 0.0 < gamma <= 1.0:
    raise ValueError(f"method.kwargs.gamma={gamma} must be in (0, 1], e.g. 0.99.")
  if lam < 0:
    raise ValueError(f"method.kwargs.lam={lam} must be >= 0 (0 turns the regulariser off).")
  if r_min < 1:
    raise ValueError(f"method.kwargs.r_min={r_min} must be >= 1.")
  if sparsity_weighting:
    rule = functools.partial(aggregate, per_module=per_module, use_num_examples=use_num_examples)
  elif per_module or use_num_examples:
    raise ValueError("method.kwargs.per_module and use_num_examples shape the sparsity weights; "
                     "they have no effect with sparsity_weighting=False: drop them or turn it on.")
  else:
    rule = zero_pad.aggregate
  return base.Method(name="hetlora", aggregate=rule, local=local(lam, gamma, prune, r_min))


def run_options(run: base.Run) -> dict:
  """Ranks never fall below the run's ``lora.r_min``."""
  return {"r_min": run.r_min}
