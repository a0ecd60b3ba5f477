"""A client's packed rows as one stream, so local training computes no empty row.

Packing (:mod:`hetlora.data.segments`) gives every local step the same ``R``
rows, the most any step of the run needs; a step whose examples fit in fewer
rows still computes ``R`` (BANKING77 at 64 tokens: 4.7 rows a step on
average, ``R = 7``). The row stream lays a client's non-empty rows of a round
one after another, in step order, ``S`` of them (the most any client of the
run needs, fixed for the run so nothing recompiles), each marked with its step::

    stream['tokens']: <token column>, segment_ids, positions   [..., S, 1, L]
    stream['step']:   int32[..., S]   the local step of each row (0 on padding rows)
    stream['ends']:   bool[..., S]    the row is its step's last

The example columns (``[..., steps, B]``: labels, ``segment_length``) and
``mask`` keep their shapes and meaning. :func:`hetlora.client.local_train`
scans the rows: each adds the gradient of its examples' share of the step's
loss, and the row that ends a step applies the optimizer, which is the update
of the packed step (up to the order of float summation). A step with no real
example has no row, so it makes no update, as before; padding rows (all
``segment_ids = 0``) carry no example and no update.

Example::

    packed = pack_cohort(cols, parts, 16, local_steps=10, rows=7)   # tokens [K, 10, 7, 64]
    length = stream_length(cols, cohort_indices(parts, 16, local_steps=10))
    data = to_stream({"batch": packed_without_mask, "mask": mask}, length)
    data["stream"]["tokens"]["input_ids"].shape                    # (K, length, 1, 64)
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hetlora.data import segments

SEGMENT_IDS = "segment_ids"


def rows_per_step(columns: Mapping[str, np.ndarray], slots: np.ndarray) -> np.ndarray:
  """Rows each batch of ``slots: int[..., B]`` packs into, ``int64[...]`` (0 for an empty batch)."""
  width = np.asarray(columns[segments.MASK]).shape[-1]
  row, _ = segments.first_fit_decreasing(segments.slot_lengths(columns, slots), width)
  return row.max(axis=-1, initial=-1) + 1


def stream_length(columns: Mapping[str, np.ndarray], slots: np.ndarray) -> int:
  """``S``: the most non-empty rows any client's steps hold, ``slots: int[..., steps, B]`` (>= 1)."""
  return max(int(rows_per_step(columns, slots).sum(axis=-1).max(initial=0)), 1)


def _token_keys(batch: Mapping[str, np.ndarray]) -> list[str]:
  """The packed token columns: those shaped like ``segment_ids`` (``[..., steps, R, L]``)."""
  shape = np.shape(batch[SEGMENT_IDS])
  return [k for k, v in batch.items() if np.shape(v) == shape]


def to_stream(data: Mapping[str, Any], length: int) -> dict[str, Any]:
  """The row stream of packed round data ``{'batch': packed columns, 'mask'}`` (module docstring).

  Args:
    data: ``batch`` from :func:`hetlora.data.pack_cohort` with ``rows=R`` (token
      columns ``[K, steps, R, L]``, example columns ``[K, steps, B]``) and ``mask``.
    length: ``S``, rows in each client's stream (:func:`stream_length` over the run).

  Returns:
    ``{'batch': the example columns, 'mask', 'stream': {'tokens', 'step', 'ends'}}``.

  Raises:
    ValueError: a client holds more than ``length`` non-empty rows.
  """
  batch = data["batch"]
  if SEGMENT_IDS not in batch:
    raise ValueError("the row stream needs packed batches (segment_ids); set config.data.packing=True.")
  keys = _token_keys(batch)
  seg = np.asarray(batch[SEGMENT_IDS])
  lead, (steps, rows, width) = seg.shape[:-3], seg.shape[-3:]
  used = (seg > 0).any(axis=-1).reshape(-1, steps * rows)          # [N, steps * R], step-major
  most = int(used.sum(axis=1).max(initial=0))
  if most > length:
    raise ValueError(f"a client's steps hold {most} packed rows but the row stream has {length}; "
                     "compute its length with stream_length over every round of the run.")
  tokens = {k: np.zeros((used.shape[0], length, 1, width), np.asarray(batch[k]).dtype) for k in keys}
  step = np.zeros((used.shape[0], length), np.int32)
  ends = np.zeros((used.shape[0], length), bool)
  for n, flags in enumerate(used):
    rows_at = np.flatnonzero(flags)
    for k in keys:
      tokens[k][n, :len(rows_at), 0] = np.asarray(batch[k]).reshape(-1, steps * rows, width)[n, rows_at]
    step[n, :len(rows_at)] = rows_at // rows
    ends[n, :len(rows_at)] = np.append(rows_at[1:] // rows != rows_at[:-1] // rows, True)[:len(rows_at)]
  stream = {"tokens": {k: v.reshape(lead + (length, 1, width)) for k, v in tokens.items()},
            "step": step.reshape(lead + (length,)), "ends": ends.reshape(lead + (length,))}
  return {"batch": {k: v for k, v in batch.items() if k not in keys}, "mask": data["mask"], "stream": stream}
