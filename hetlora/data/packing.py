"""Host-side packing of a round's cohort into equal-shaped arrays.

Every client of a round gets the same shapes so one jitted ``vmap`` trains
them all. For a cohort of ``K`` clients and a column ``x: [N, ...]``::

    x:            [K, steps, batch, ...]   examples (zeros where padded)
    mask:         float32[K, steps, batch] 1 for a real example, 0 for padding
    num_examples: float32[K]               n_k, the client's distinct examples

Client ``k`` walks a stream of its own indices, shuffled anew each pass by a
``numpy`` Generator seeded with ``(seed, round, client_id)``:

- ``local_epochs=E``: the stream has ``ceil(n_k * E)`` examples (E passes,
  the last one partial when ``E`` is fractional) and
  ``steps = max_k ceil(ceil(n_k * E) / batch)``; shorter clients are padded
  with ``mask = 0`` (never dropped), so a client's mask sums to ``ceil(n_k * E)``.
- ``local_steps=S``: the stream cycles the client's data for ``S * batch``
  examples; every slot is real.

A trainer should weight losses with ``mask`` and skip updates of batches
whose mask is all zero. The example flags of tokenization (``truncated``,
``empty``: :data:`hetlora.data.tokenize.FLAG_COLUMNS`) are reports, not model
inputs: they are left out of every batch. Pass ``pad_steps_to`` (see :func:`epoch_steps`) to
keep the step axis fixed across rounds and avoid recompiles.

``rows=R`` packs each step's examples (the same ones) several to a row
(:mod:`hetlora.data.segments`): the token columns become ``[K, steps, R, L]``
with ``segment_ids`` and ``positions``; the example columns, ``mask`` and
``num_examples`` are unchanged.

Example::

    round_data = pack_cohort(cols, [parts[i] for i in cohort], batch_size=16,
                             local_epochs=1, seed=0, round_idx=3, client_ids=cohort)
    round_data['input_ids'].shape  # (len(cohort), steps, 16, L)
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping, Sequence

import numpy as np

from hetlora.data import segments
from hetlora.data.tokenize import FLAG_COLUMNS


def _stream(indices: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
  """``length`` indices: fresh permutations of ``indices`` back to back, cut to ``length``."""
  n = len(indices)
  if n == 0 or length == 0:
    return np.zeros((0,), np.int64)
  passes = -(-length // n)
  return np.concatenate([rng.permutation(indices) for _ in range(passes)])[:length]


def _epoch_len(n: int, local_epochs: float) -> int:
  """``ceil(n * E)``, robust to float round-off (``10 * 0.3`` gives 3, not 4)."""
  return math.ceil(round(n * local_epochs, 9))


def epoch_steps(sizes: Sequence[int] | np.ndarray, batch_size: int, local_epochs: float) -> int:
  """Local steps for ``local_epochs`` epochs of the largest client: ``max_k ceil(ceil(n_k E) / B)``.

  Call it once with every client's size to fix ``pad_steps_to`` for a whole run.
  """
  sizes = np.asarray(sizes, np.int64)
  if sizes.size == 0:
    return 0
  return max(-(-_epoch_len(int(s), local_epochs) // batch_size) for s in sizes)


def _check(client_indices: Sequence[np.ndarray], batch_size: int, local_epochs: float | None,
           local_steps: int | None) -> None:
  if batch_size < 1:
    raise ValueError(f"client.batch_size={batch_size} must be >= 1; set config.client.batch_size.")
  if (local_epochs is None) == (local_steps is None):
    raise ValueError("set exactly one of config.client.local_epochs and config.client.local_steps; "
                     f"got local_epochs={local_epochs}, local_steps={local_steps}.")
  if local_epochs is not None and not local_epochs > 0:
    raise ValueError(f"client.local_epochs={local_epochs} must be > 0; set config.client.local_epochs.")
  if local_steps is not None and local_steps < 1:
    raise ValueError(f"client.local_steps={local_steps} must be >= 1; set config.client.local_steps.")
  empty = [k for k, idx in enumerate(client_indices) if len(idx) == 0]
  if empty:
    raise ValueError(f"cohort clients at positions {empty} have no examples; fix the partition: set a "
                     "smaller config.data.num_clients or a larger config.data.min_client_size.")


def cohort_indices(client_indices: Sequence[np.ndarray], batch_size: int, *,
                   local_epochs: float | None = None, local_steps: int | None = None,
                   seed: int = 0, round_idx: int = 0, client_ids: Sequence[int] | None = None,
                   pad_steps_to: int | None = None) -> np.ndarray:
  """The example index of every slot, ``int64[K, steps, batch]``, ``-1`` where padded.

  Arguments as in :func:`pack_cohort`.
  """
  _check(client_indices, batch_size, local_epochs, local_steps)
  k = len(client_indices)
  ids = np.arange(k) if client_ids is None else np.asarray(client_ids, np.int64)
  if ids.shape != (k,):
    raise ValueError(f"client_ids has shape {ids.shape}; expected ({k},), one id per cohort client.")
  if local_steps is not None:
    lengths = [local_steps * batch_size] * k
    steps = local_steps
  else:
    lengths = [_epoch_len(len(idx), local_epochs) for idx in client_indices]
    steps = epoch_steps([len(idx) for idx in client_indices], batch_size, local_epochs)
  if pad_steps_to is not None:
    if pad_steps_to < steps:
      raise ValueError(f"pad_steps_to={pad_steps_to} is below the {steps} steps this cohort needs; "
                       "compute it with epoch_steps over all clients' sizes.")
    steps = pad_steps_to
  out = np.full((k, steps * batch_size), -1, np.int64)
  for j, idx in enumerate(client_indices):
    rng = np.random.default_rng([int(seed), int(round_idx), int(ids[j])])
    s = _stream(np.asarray(idx, np.int64), lengths[j], rng)
    out[j, :len(s)] = s
  return out.reshape(k, steps, batch_size)


def gather(columns: Mapping[str, np.ndarray], slots: np.ndarray, rows: int | None = None
           ) -> dict[str, np.ndarray]:
  """Columns at ``slots: int[...]`` (``-1`` = padding, filled with zeros) plus
  ``mask: float32[...]``; the example flags (``FLAG_COLUMNS``) are left out.

  ``rows``: the token columns are packed instead, ``rows`` rows per batch of
  ``slots: int[..., B]`` (:func:`hetlora.data.segments.pack_tokens`).
  """
  if rows is not None:
    tokens = set(segments.token_columns(columns)) | {segments.MASK}
    out = gather({k: v for k, v in columns.items() if k not in tokens}, slots)
    return {**out, **segments.pack_tokens(columns, slots, rows)}
  real = slots >= 0
  safe = np.where(real, slots, 0)
  out = {}
  for key, col in columns.items():
    if key in FLAG_COLUMNS:
      continue
    x = np.asarray(col)[safe]
    x[~real] = 0
    out[key] = x
  out["mask"] = real.astype(np.float32)
  return out


def pack_cohort(columns: Mapping[str, np.ndarray], client_indices: Sequence[np.ndarray], batch_size: int,
                *, local_epochs: float | None = None, local_steps: int | None = None, seed: int = 0,
                round_idx: int = 0, client_ids: Sequence[int] | None = None,
                pad_steps_to: int | None = None, rows: int | None = None) -> dict[str, np.ndarray]:
  """Pack a cohort's data into ``[K, steps, batch, ...]`` arrays (see module docstring).

  Args:
    columns: ``{name: [N, ...]}`` tokenized columns (e.g. from ``tokenize_dataset``).
    client_indices: ``K`` index arrays into the columns, one per cohort client.
    batch_size: examples per local step.
    local_epochs: passes over each client's data (exclusive with ``local_steps``).
    local_steps: fixed steps per client, cycling its data.
    seed, round_idx: seed the per-client shuffles together with ``client_ids``.
    client_ids: global ids of the cohort clients (default ``0..K-1``), so a
      client shuffles the same way whichever cohort position it takes.
    pad_steps_to: pad the step axis to this length (``>=`` the steps needed).
    rows: pack each step's examples into this many rows of tokens
      (:func:`hetlora.data.segments.pack_tokens`); ``None``: one example per row.

  Returns:
    every column as ``[K, steps, batch, ...]``, ``mask: float32[K, steps, batch]``
    and ``num_examples: float32[K]``; with ``rows``, the token columns, ``segment_ids``
    and ``positions`` as ``[K, steps, rows, L]`` and ``segment_length: int32[K, steps, batch]``.
  """
  slots = cohort_indices(client_indices, batch_size, local_epochs=local_epochs, local_steps=local_steps,
                         seed=seed, round_idx=round_idx, client_ids=client_ids, pad_steps_to=pad_steps_to)
  out = gather(columns, slots, rows)
  out["num_examples"] = np.asarray([len(idx) for idx in client_indices], np.float32)
  return out


def batches(columns: Mapping[str, np.ndarray], batch_size: int,
            indices: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Evaluation batches in order: every column as ``[batch, ...]`` plus ``mask: float32[batch]``.

  The last batch is padded with zeros and ``mask = 0`` so every batch has the
  same shape. ``indices`` restricts to a subset (e.g. one client's data).
  """
  if batch_size < 1:
    raise ValueError(f"eval.batch_size={batch_size} must be >= 1; set config.eval.batch_size.")
  if indices is None:
    n = len(next(iter(columns.values()))) if columns else 0
    indices = np.arange(n)
  indices = np.asarray(indices, np.int64)
  for start in range(0, len(indices), batch_size):
    slots = np.full((batch_size,), -1, np.int64)
    chunk = indices[start:start + batch_size]
    slots[:len(chunk)] = chunk
    yield gather(columns, slots)
