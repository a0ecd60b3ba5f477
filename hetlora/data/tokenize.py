"""Tokenize a dataset once into fixed-width numpy columns.

A federated run tokenizes all examples once on the host; partitions and
batches are then index arrays into these columns.

``encode_fn(texts: list[str]) -> dict`` is any tokenizer wrapper that returns
``'input_ids'`` either as a right- or left-padded ``int[n, L']`` array with an
``'attention_mask': int[n, L']`` (1 on real tokens), or as ``n`` ragged
sequences. Every other returned key (e.g. ``'token_type_ids'``) is carried
along, cut and padded the same way.

Classification columns (:func:`tokenize_dataset`)::

    input_ids:      int32[N, L]   tokens, then pad_id
    attention_mask: int32[N, L]   1 on real tokens
    label:          int32[N]

Causal-LM columns (:func:`tokenize_prompts`), sequence ``[bos] prompt target [eos]``::

    input_ids:      int32[N, L]
    attention_mask: int32[N, L]
    loss_mask:      int32[N, L]   1 where input_ids[i] is a target (or eos) token
    task_id:        int32[N]

``loss_mask[n, i] = 1`` marks token ``i`` as a prediction target; a trainer
predicting token ``i`` from position ``i - 1`` weights its loss with
``loss_mask[:, 1:]``.

Example::

    cols = tokenize_dataset(ds, encode_fn, max_len=64)
    cols['input_ids'].shape        # (len(ds), 64)
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from hetlora.data.sources import PromptDataset, TextDataset

EncodeFn = Callable[[list[str]], Mapping[str, object]]


def _rows(encoded: Mapping[str, object], n: int) -> dict[str, list[np.ndarray]]:
  """Per-example 1-D token arrays for every key of ``encoded`` (padding removed)."""
  if "input_ids" not in encoded:
    raise KeyError(f"encode_fn must return 'input_ids'; it returned keys {sorted(encoded)}.")
  ids = encoded["input_ids"]
  if len(ids) != n:
    raise ValueError(f"encode_fn returned {len(ids)} sequences for {n} texts.")
  mask = encoded.get("attention_mask")
  out: dict[str, list[np.ndarray]] = {}
  for key, value in encoded.items():
    if key == "attention_mask":
      continue
    rows = []
    for i in range(n):
      row = np.asarray(value[i]).reshape(-1)
      if mask is not None:
        row = row[np.asarray(mask[i]).reshape(-1).astype(bool)]
      rows.append(row)
    out[key] = rows
  return out


def _encode_all(texts: Sequence[str], encode_fn: EncodeFn, chunk_size: int) -> dict[str, list[np.ndarray]]:
  """``encode_fn`` over ``texts`` in chunks, as per-example rows."""
  out: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(texts), chunk_size):
    chunk = list(texts[start:start + chunk_size])
    for key, rows in _rows(encode_fn(chunk), len(chunk)).items():
      out.setdefault(key, []).extend(rows)
  return out


def _check_max_len(max_len: int) -> None:
  if int(max_len) < 1:
    raise ValueError(f"max_len={max_len} must be >= 1; set config.model.max_len, e.g. 64.")


def tokenize_dataset(ds: TextDataset, encode_fn: EncodeFn, max_len: int, *, pad_id: int = 0,
                     chunk_size: int = 1024) -> dict[str, np.ndarray]:
  """Classification columns for ``ds``: ``input_ids, attention_mask: int32[N, max_len]``,
  any other keys of ``encode_fn`` as ``int32[N, max_len]``, ``label: int32[N]``.

  Sequences longer than ``max_len`` keep their first ``max_len`` tokens; shorter
  ones are padded with ``pad_id`` (other keys with 0).
  """
  _check_max_len(max_len)
  n = len(ds)
  rows = _encode_all(ds.texts, encode_fn, chunk_size)
  cols: dict[str, np.ndarray] = {}
  lengths = np.asarray([min(len(r), max_len) for r in rows.get("input_ids", [])], dtype=np.int64)
  for key, key_rows in rows.items():
    arr = np.full((n, max_len), pad_id if key == "input_ids" else 0, dtype=np.int32)
    for i, r in enumerate(key_rows):
      arr[i, :lengths[i]] = r[:lengths[i]]
    cols[key] = arr
  if not rows:  # Empty dataset.
    cols["input_ids"] = np.full((0, max_len), pad_id, np.int32)
    lengths = np.zeros((0,), np.int64)
  cols["attention_mask"] = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.int32)
  cols["label"] = np.asarray(ds.labels, dtype=np.int32)
  return cols


def tokenize_prompts(ds: PromptDataset, encode_fn: EncodeFn, max_len: int, *, pad_id: int = 0,
                     bos_id: int | None = None, eos_id: int | None = None,
                     chunk_size: int = 1024) -> dict[str, np.ndarray]:
  """Causal-LM columns ``[bos] prompt target [eos]`` with a ``loss_mask`` on the target.

  ``encode_fn`` should add no special tokens; pass ``bos_id``/``eos_id`` instead.
  When too long, the target keeps its first tokens (at most ``max_len`` minus
  the special tokens) and the prompt keeps its last tokens (the ones next to
  the target).

  Returns:
    ``input_ids, attention_mask, loss_mask: int32[N, max_len]``, ``task_id: int32[N]``.
  """
  _check_max_len(max_len)
  specials = (bos_id is not None) + (eos_id is not None)
  budget = max_len - specials
  if budget < 1:
    raise ValueError(f"max_len={max_len} leaves no room for tokens after bos/eos; "
                     "set config.model.max_len larger.")
  n = len(ds)
  prompts = _encode_all(ds.prompts, encode_fn, chunk_size).get("input_ids", [])
  targets = _encode_all(ds.targets, encode_fn, chunk_size).get("input_ids", [])
  input_ids = np.full((n, max_len), pad_id, np.int32)
  attention = np.zeros((n, max_len), np.int32)
  loss = np.zeros((n, max_len), np.int32)
  for i in range(n):
    t = targets[i][:budget]
    p = prompts[i][len(prompts[i]) - (budget - len(t)):] if budget > len(t) else prompts[i][:0]
    head = ([bos_id] if bos_id is not None else []) + list(p)
    tail = list(t) + ([eos_id] if eos_id is not None else [])
    seq = head + tail
    input_ids[i, :len(seq)] = seq
    attention[i, :len(seq)] = 1
    loss[i, len(head):len(seq)] = 1
  return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss,
          "task_id": np.asarray(ds.task_ids, np.int32)}
