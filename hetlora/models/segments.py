"""What a model needs to read a packed batch (:mod:`hetlora.data.segments`).

A packed batch holds several examples per token row: ``segment_ids: int[R, L]``
(``b + 1`` on the tokens of example slot ``b``, 0 on padding) and
``positions: int[R, L]`` (restarting at 0 per segment), beside per-example
columns of ``B`` slots (``segment_length: int[B]`` always). A token attends to
the tokens of its own segment only (and, in a decoder, not to later ones), so
every example sees exactly what it sees alone in an unpadded row; per-example
outputs are sums over a segment's tokens::

    visible[r, q, k] = (s[r, q] == s[r, k]) & (s[r, k] > 0) [& (k <= q)]
    segment_sum(x)[b] = sum_{r, t: s[r, t] = b + 1} x[r, t]

Example:
  >>> s = jnp.array([[1, 1, 2, 0]])
  >>> segment_sum(jnp.ones((1, 4)), s, 2).tolist()
  [2.0, 1.0]
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

SEGMENT_IDS, POSITIONS, SEGMENT_LENGTH = "segment_ids", "positions", "segment_length"


def is_packed(batch: Mapping[str, jax.Array]) -> bool:
  """Whether ``batch`` is packed (has ``segment_ids``); static under ``jit``."""
  return SEGMENT_IDS in batch


def num_slots(batch: Mapping[str, jax.Array]) -> int:
  """``B``, the example slots of a packed batch (static: the width of ``segment_length``)."""
  return batch[SEGMENT_LENGTH].shape[-1]


def visibility(segment_ids: jax.Array, causal: bool = False) -> jax.Array:
  """``bool[R, L, L]``: query ``q`` sees key ``k`` of the same, non-padding segment (and ``k <= q``)."""
  same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
  if causal:
    l = segment_ids.shape[-1]
    same = same & (jnp.arange(l)[None, :, None] >= jnp.arange(l)[None, None, :])
  return same


def one_hot(segment_ids: jax.Array, num: int, dtype=jnp.float32) -> jax.Array:
  """``[..., num]``: ``1`` where ``segment_ids == b + 1`` (padding, 0, matches no slot)."""
  return (segment_ids[..., None] == jnp.arange(1, num + 1)).astype(dtype)


def segment_sum(x: jax.Array, segment_ids: jax.Array, num: int) -> jax.Array:
  """``float32[num, ...]``: the sum of ``x: [R, L, ...]`` over each segment's tokens.

  A dense one-hot contraction (``R L num`` products per feature), cheap next to
  the model and without scatters.
  """
  return jnp.einsum("rl...,rls->s...", x.astype(jnp.float32), one_hot(segment_ids, num))
