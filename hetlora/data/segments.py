"""Sequence packing: several examples per token row, with segment ids.

A step's ``B`` examples are short next to the tokenizer's width ``L`` (BANKING77
averages 16 of 64 tokens), so most of an unpacked ``[B, L]`` batch is padding.
Packing lays every example's real tokens contiguously into ``R`` rows of ``L``
tokens (first-fit decreasing, Johnson et al., "Worst-case performance bounds for
simple one-dimensional packing algorithms", SIAM J. Comput. 1974), in the form
of T5X / seqio and MaxText (``segment_ids``, per-segment ``positions``).

A step packs exactly the examples of its unpacked batch: example slot ``b``
(``0 <= b < B``) becomes segment ``b + 1``, so the per-example columns and the
mask keep their shapes and meaning. For slots ``slots: int[..., B]`` (``-1`` =
padding) the packed batch is::

    <token column>:  [..., R, L]     e.g. input_ids, token_type_ids, loss_mask (0 where no token)
    segment_ids:     int32[..., R, L]  b + 1 on the tokens of slot b, 0 on padding
    positions:       int32[..., R, L]  0, 1, ... within each segment
    segment_length:  int32[..., B]     tokens of slot b (0 for a padding slot)
    <example column>: [..., B]         e.g. label, task_id (zeros where padded)
    mask:            float32[..., B]   1 for a real example

A token column is one of width ``L`` (the ``attention_mask``'s); an example's
tokens are the ``attention_mask`` ones, a prefix (columns are right-padded,
:mod:`hetlora.data.tokenize`); ``attention_mask`` itself is dropped (it is
``segment_ids > 0``). A model reading a packed batch attends only within a
segment (causally, for a decoder) and pools or scores per segment into ``[B]``
(``segment_length`` fixes ``B`` inside a jitted function).

``R`` is fixed for a run so nothing recompiles: :func:`rows_needed` over every
step of the run (``hetlora.experiment`` scans the run's cohorts), or set by hand.

Example::

    slots = cohort_indices(parts, 16, local_steps=10, seed=0, round_idx=3, client_ids=cohort)
    rows = rows_needed(cols, slots)                     # e.g. 6 (of 16 unpacked)
    batch = pack_cohort(cols, parts, 16, local_steps=10, seed=0, round_idx=3, client_ids=cohort,
                        rows=rows)                      # hetlora.data.packing
    batch['input_ids'].shape, batch['label'].shape      # (K, 10, 6, 64), (K, 10, 16)
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from hetlora.data.tokenize import FLAG_COLUMNS

MASK = "attention_mask"


def first_fit_decreasing(lengths: np.ndarray, row_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Places items of ``lengths: int[..., B]`` into rows of ``row_len``, each batch on its own.

  Items are taken longest first (ties in slot order); each goes to the first
  row with room. Zero-length items are not placed. Vectorised over the leading
  axes (``B`` numpy passes).

  Returns:
    ``(row, start)``, both ``int64[..., B]``: the row of each item (``-1`` for a
    zero-length one) and its first column in that row.

  Example:
    >>> row, start = first_fit_decreasing(np.array([3, 5, 0, 2]), row_len=6)
    >>> row.tolist(), start.tolist()
    ([1, 0, -1, 1], [0, 0, 0, 3])
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.min() < 0 or lengths.max() > row_len):
    raise ValueError(f"item lengths must lie in [0, row_len={row_len}]; got "
                     f"[{lengths.min()}, {lengths.max()}].")
  b = lengths.shape[-1]
  flat = lengths.reshape(-1, b)
  n = np.arange(flat.shape[0])
  order = np.argsort(-flat, axis=1, kind="stable")
  free = np.full(flat.shape, row_len, np.int64)          # B rows always suffice
  row = np.full(flat.shape, -1, np.int64)
  start = np.zeros(flat.shape, np.int64)
  for j in range(b):
    item = order[:, j]
    size = flat[n, item]
    target = np.argmax(free >= size[:, None], axis=1)
    real = size > 0
    at, item, target = n[real], item[real], target[real]
    row[at, item] = target
    start[at, item] = row_len - free[at, target]
    free[at, target] -= size[real]
  return row.reshape(lengths.shape), start.reshape(lengths.shape)


def slot_lengths(columns: Mapping[str, np.ndarray], slots: np.ndarray) -> np.ndarray:
  """Real tokens of the example in each slot, ``int64[...]`` (0 where ``slots == -1``)."""
  if MASK not in columns:
    raise KeyError(f"sequence packing needs an {MASK!r} column; the columns are {sorted(columns)}.")
  lengths = np.asarray(columns[MASK]).sum(-1).astype(np.int64)
  return np.where(slots >= 0, lengths[np.where(slots >= 0, slots, 0)], 0)


def rows_needed(columns: Mapping[str, np.ndarray], slots: np.ndarray) -> int:
  """The most rows any batch of ``slots: int[..., B]`` packs into (at least 1)."""
  width = np.asarray(columns[MASK]).shape[-1]
  row, _ = first_fit_decreasing(slot_lengths(columns, slots), width)
  return max(int(row.max(initial=-1)) + 1, 1)


def token_columns(columns: Mapping[str, np.ndarray]) -> list[str]:
  """Names of the token columns (width ``L``, the ``attention_mask``'s), ``attention_mask`` left out."""
  width = np.asarray(columns[MASK]).shape[1:]
  return [k for k, col in columns.items()
          if k != MASK and k not in FLAG_COLUMNS and np.asarray(col).shape[1:] == width]


def pack_tokens(columns: Mapping[str, np.ndarray], slots: np.ndarray, rows: int) -> dict[str, np.ndarray]:
  """The token columns of ``slots: int[..., B]`` packed into ``rows`` rows per batch.

  Args:
    columns: ``{name: [N, L] or [N, ...]}`` tokenized columns with an ``attention_mask``.
    slots: example index of every slot, ``-1`` for padding (:func:`hetlora.data.cohort_indices`).
    rows: ``R``, rows per batch (``>=`` :func:`rows_needed`).

  Returns:
    every token column (:func:`token_columns`) and ``segment_ids``, ``positions`` as
    ``[..., R, L]``, and ``segment_length: int32[..., B]`` (module docstring); the
    example columns are left to :func:`hetlora.data.packing.gather`.

  Raises:
    ValueError: a batch needs more than ``rows`` rows (names ``data.pack_rows``).
  """
  slots = np.asarray(slots, np.int64)
  width = np.asarray(columns[MASK]).shape[-1]
  lengths = slot_lengths(columns, slots)
  row, start = first_fit_decreasing(lengths, width)
  need = int(row.max(initial=-1)) + 1
  if need > rows:
    raise ValueError(f"a step's examples need {need} packed rows but data.pack_rows={rows}; set "
                     f"config.data.pack_rows >= {need} (0 = enough for every step of server.rounds).")
  lead, b = slots.shape[:-1], slots.shape[-1]
  flat = lambda x: x.reshape(-1, b)
  i, j, t = np.nonzero(np.arange(width) < flat(lengths)[..., None])    # token t of slot j of batch i
  dest = (i, flat(row)[i, j], flat(start)[i, j] + t)
  source = (flat(slots)[i, j], t)
  values = {k: np.asarray(columns[k])[source] for k in token_columns(columns)}
  values["segment_ids"] = (j + 1).astype(np.int32)
  values["positions"] = t.astype(np.int32)
  out = {}
  for key, v in values.items():
    packed = np.zeros((flat(slots).shape[0], rows, width), v.dtype)
    packed[dest] = v
    out[key] = packed.reshape(lead + (rows, width))
  out["segment_length"] = lengths.astype(np.int32)
  return out
