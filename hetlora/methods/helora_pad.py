"""HeLoRA-Pad: context-based padding and rank-based adaptive aggregation.

Fan, Su, Tarkoma, Hui. HeLoRA: LoRA-heterogeneous Federated Fine-tuning for
Foundation Models. ACM Transactions on Internet Technology 25(2), 2025
(doi 10.1145/3723877); padding variants as in the authors' public code
(boyufan/HeLoRA, ``strategy.py``: ``_zero_padding``, ``_mean_padding``,
``_linear_padding``).

Client ``k`` uploads ``a_k: [d_in, r_max]``, ``b_k: [r_max, d_out]`` whose
first ``r_k`` slots are trained. Its missing slots ``j >= r_k`` are filled
from its *own* trained slots (``T_k = {i < r_k}``)::

    'linear'  : a_k[:, j] = mean_{i in T_k} a_k[:, i],   b_k[j, :] = mean_{i in T_k} b_k[i, :]
    'mean'    : a_k[:, j] = mean over all entries of a_k[:, T_k]   (one scalar; b alike)
    'adjacent': a_k[:, j] = a_k[:, r_k - 1],             b_k[j, :] = b_k[r_k - 1, :]
    'zero'    : a_k[:, j] = 0,                           b_k[j, :] = 0

(``'linear'`` is the code's default: in PEFT layout it is the mean over the
rank rows of ``lora_A`` and the rank columns of ``lora_B``.) Then

    a = sum_k p_k pad(a_k),   b = sum_k p_k pad(b_k),   p_k ∝ w_k,

with ``w_k = n_k * r_k`` (``'examples_x_rank'``, default), ``r_k`` (``'rank'``)
or ``n_k`` (``'examples'``). The authors' code weights by example count only
(FedAvg); the paper's "rank-based adaptive aggregation" gives higher-rank
clients more weight, which we implement as ``w_k = n_k r_k`` (an
interpretation: the paper's exact formula could not be checked here), and
offer the other two for ablations. Distribution is by truncation, as in
HetLoRA (:func:`hetlora.lora.truncate`).

Scale and rank spread. The factors are padded and averaged as they are, and
the global adapter at rank ``r`` is read with the scale of rank ``r``. Padding
that copies trained slots assumes the scale falls with rank: a client whose
``r_k`` trained slots agree has a padded product ``pad(a_k) pad(b_k)`` equal to
``r_max / r_k`` times its trained product, which is its own update read at
``r_max`` under ``alpha/r`` (the authors' PEFT setting: ``lora_alpha = 32``,
``r`` per client) and ``r_max / r_k`` times its update under one scale for all
ranks (``alpha/r_max``). The authors' runs span ranks 6 to 8 of ``r_max = 8``,
so padding fills at most 2 of 8 slots. Over ranks 1 to 32 a rank-1 client
fills 31 of 32, and the global adapter's upper slots fill with copies of the
low-rank clients' slot means: on BANKING77 (``configs/banking77.py:cpu15``,
``benchmarks/results/banking77_cpu15/helora_pad_padding/``) ``'linear'``
peaks at 0.24 test accuracy after 8 rounds and falls to 0.07 by round 12
(0.01 with ``'examples'`` weighting, 0.20 under ``alpha/r``), while
``'zero'`` padding with the same weighting reaches 0.35. Prefer ``'zero'``
when ranks span more than a factor of a few.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hetlora import aggregation
from hetlora import lora as lora_lib
from hetlora.methods import base

LoRA = lora_lib.LoRA

PADDINGS = ("linear", "mean", "adjacent", "zero")
WEIGHTINGS = ("examples_x_rank", "rank", "examples")


def _fill(x: jax.Array, m: jax.Array, r: jax.Array, padding: str, axis: int) -> jax.Array:
  """The pad value of one factor of one client, broadcastable against ``x``.

  Args:
    x: ``[d, r_max]`` (``axis=1``, an ``a``) or ``[r_max, d]`` (``axis=0``, a
      ``b``), masked to the client's rank.
    m: ``float32[r_max]`` rank mask; ``r``: ``float32[]`` rank (>= 1).
    padding: one of :data:`PADDINGS`.
    axis: the rank axis of ``x``.
  """
  if padding == "zero":
    return jnp.zeros((), x.dtype)
  if padding == "linear":
    return jnp.sum(x, axis=axis, keepdims=True) / r
  if padding == "mean":
    return jnp.sum(x) / (r * x.shape[1 - axis])
  last = jnp.clip(r.astype(jnp.int32) - 1, 0, m.shape[0] - 1)
  return jax.lax.dynamic_index_in_dim(x, last, axis=axis, keepdims=True)


def pad(lora: LoRA, ranks: jax.Array, padding: str = "linear") -> LoRA:
  """Fills each client's slots ``>= ranks[k]`` from its own trained slots.

  Args:
    lora: stacked tree ``a: [K, d_in, r_max]``, ``b: [K, r_max, d_out]``.
    ranks: ``int32[K]``.
    padding: one of :data:`PADDINGS` (see the module docstring).

  Returns:
    Stacked tree of the same shapes; slots ``< ranks[k]`` are the inputs'.

  Example:
    >>> lora = {'q': {'a': jnp.array([[[1., 3., 9.]]]), 'b': jnp.ones((1, 3, 2))}}
    >>> pad(lora, jnp.array([2]))['q']['a'].tolist()
    [[[1.0, 3.0, 2.0]]]
  """
  if padding not in PADDINGS:
    raise ValueError(f"method.kwargs.padding={padding!r} must be one of {PADDINGS}.")
  r_max = lora_lib.r_max_of(lora)

  def one(mod, rank):      # mod: one client's module, already masked to ``rank``
    m = lora_lib.rank_mask(rank, r_max)
    r = jnp.maximum(rank, 1).astype(jnp.float32)
    a, b = mod["a"], mod["b"]
    fill_a = _fill(a, m, r, padding, axis=1)
    fill_b = _fill(b, m, r, padding, axis=0)
    return {"a": a + (1 - m) * fill_a, "b": b + (1 - m)[:, None] * fill_b}

  return jax.vmap(lambda l, r: lora_lib.map_modules(lambda mod: one(mod, r), l))(
      aggregation.masked(lora, ranks), ranks)


def rank_weights(ranks: jax.Array, num_examples: jax.Array, weighting: str) -> jax.Array:
  """``p_k ∝ n_k r_k`` / ``r_k`` / ``n_k``: ``float32[K]`` summing to one."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"method.kwargs.weighting={weighting!r} must be one of {WEIGHTINGS}.")
  n = jnp.asarray(num_examples, jnp.float32)
  r = jnp.asarray(ranks, jnp.float32)
  w = {"examples_x_rank": n * r, "rank": r, "examples": n}[weighting]
  return aggregation.example_weights(w)


@functools.partial(jax.jit, static_argnames=("padding", "weighting"))
def aggregate(lora: LoRA, ranks: jax.Array, num_examples: jax.Array, scales: jax.Array,
               padding: str = "linear", weighting: str = "examples_x_rank") -> LoRA:
  """HeLoRA-Pad aggregation: ``a = sum_k p_k pad(a_k)``, ``b = sum_k p_k pad(b_k)``.

  Args:
    lora: stacked tree ``a: [K, d_in, r_max]``, ``b: [K, r_max, d_out]``.
    ranks: ``int32[K]``; num_examples: ``float[K]``; scales: ``float[K]``
      (unused: factors are averaged as they are, any scale rule).
    padding: ``'linear'`` (default, the authors' code), ``'mean'``,
      ``'adjacent'`` or ``'zero'``.
    weighting: ``'examples_x_rank'`` (default, ``p_k ∝ n_k r_k``), ``'rank'``
      or ``'examples'`` (with ``'zero'`` padding this is :func:`zero_pad`).

  Returns:
    The global tree ``a: [d_in, r_max]``, ``b: [r_max, d_out]``.
  """
  aggregation.check_inputs(lora, ranks, num_examples, scales)
  return aggregation.weighted_sum(pad(lora, ranks, padding),
                                  rank_weights(ranks, num_examples, weighting))


def make(padding: str = "linear", weighting: str = "examples_x_rank") -> base.Method:
  """HeLoRA-Pad with its padding and weighting (see :func:`aggregate`)."""
  if padding not in PADDINGS:
    raise ValueError(f"method.kwargs.padding={padding!r} must be one of {PADDINGS}.")
  if weighting not in WEIGHTINGS:
    raise ValueError(f"method.kwargs.weighting={weighting!r} must be one of {WEIGHTINGS}.")
  return base.Method(name="helora_pad",
                     aggregate=functools.partial(aggregate, padding=padding, weighting=weighting))
