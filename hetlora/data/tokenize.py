"""Tokenize a dataset once into fixed-width numpy columns.

A federated run tokenizes all examples once on the host; partitions and
batches are then index arrays into these columns.

``encode_fn(texts: list[str]) -> dict`` is any tokenizer wrapper that returns
``'input_ids'`` either as a right- or left-padded ``int[n, L']`` array with an
``'attention_mask': int[n, L']`` (1 on real tokens), or as ``n`` ragged
sequences. It may also return ``'truncated': bool[n]``, the examples it cut
itself (a tokenizer with truncation on, as :func:`hetlora.models.tokenizer.encode`
reports). Every other returned key (e.g. ``'token_type_ids'``) is carried
along, cut and padded the same way.

Classification columns (:func:`tokenize_dataset`)::

    input_ids:      int32[N, L]   tokens, then pad_id
    attention_mask: int32[N, L]   1 on real tokens
    label:          int32[N]
    truncated:      bool[N]       the example had more than L tokens (the rest was cut)
    empty:          bool[N]       the text is blank (or encodes to no token)

``truncated`` and ``empty`` (:data:`FLAG_COLUMNS`) are example flags for
reports (:mod:`hetlora.data.stats`), never model inputs: packing leaves them
out of batches. When examples are cut or empty, a warning says how many.

Causal-LM columns (:func:`tokenize_prompts`), sequence ``[bos] prompt target [eos]``::

    input_ids:      int32[N, L]
    attention_mask: int32[N, L]
    loss_mask:      int32[N, L]   1 where input_ids[i] is a target (or eos) token
    task_id:        int32[N]
    truncated:      bool[N]       part of the prompt or of the target was cut
    empty:          bool[N]       the prompt or the target is blank

A sequence too long for ``L`` keeps the whole target (cut at its end only if
the target alone is too long) and cuts the middle of the prompt: the prompt
keeps its first ``prompt_head`` share of the room left (the chat template's
system turn and the start of the question) and its last tokens (the end of the
question and the assistant header, next to the answer).

Generation inputs (:func:`tokenize_prompts_only`): ``[bos] prompt``, cut the
same way, for a decoder to continue.

``loss_mask[n, i] = 1`` marks token ``i`` as a prediction target; a trainer
predicting token ``i`` from position ``i - 1`` weights its loss with
``loss_mask[:, 1:]``.

Example::

    cols = tokenize_dataset(ds, encode_fn, max_len=64)
    cols['input_ids'].shape        # (len(ds), 64)
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import numpy as np

from hetlora.data.sources import PromptDataset, TextDataset

EncodeFn = Callable[[list[str]], Mapping[str, object]]
# Per-example boolean flags in the tokenized columns, for reports only (never batched).
FLAG_COLUMNS = ("truncated", "empty")
TRUNCATED_KEY = "truncated"  # optional bool[n] an encode_fn returns for examples it cut itself


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


def _encode_all(texts: Sequence[str], encode_fn: EncodeFn, chunk_size: int
                ) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
  """``encode_fn`` over ``texts`` in chunks: per-example rows and ``bool[N]``, the
  examples ``encode_fn`` reports it cut itself."""
  out: dict[str, list[np.ndarray]] = {}
  cut = np.zeros((len(texts),), bool)
  for start in range(0, len(texts), chunk_size):
    chunk = list(texts[start:start + chunk_size])
    encoded = dict(encode_fn(chunk))
    if TRUNCATED_KEY in encoded:
      cut[start:start + len(chunk)] = np.asarray(encoded.pop(TRUNCATED_KEY), bool).reshape(-1)
    for key, rows in _rows(encoded, len(chunk)).items():
      out.setdefault(key, []).extend(rows)
  return out, cut


def _blank(texts: Sequence[str]) -> np.ndarray:
  return np.asarray([not str(t).strip() for t in texts], bool).reshape(-1)


def _report(what: str, truncated: np.ndarray, empty: np.ndarray, max_len: int) -> None:
  """One warning when examples were cut or are empty (never silent)."""
  n, t, e = len(truncated), int(truncated.sum()), int(empty.sum())
  if t or e:
    logging.getLogger(__name__).warning(
        "%s: %d of %d examples (%.1f%%) were cut at %d tokens and %d are empty; raise "
        "config.model.max_len to keep more (data_statistics reports them per client).",
        what, t, n, 100.0 * t / max(n, 1), max_len, e)


def _check_max_len(max_len: int) -> None:
  if int(max_len) < 1:
    raise ValueError(f"max_len={max_len} must be >= 1; set config.model.max_len, e.g. 64.")


def tokenize_dataset(ds: TextDataset, encode_fn: EncodeFn, max_len: int, *, pad_id: int = 0,
                     chunk_size: int = 1024) -> dict[str, np.ndarray]:
  """Classification columns for ``ds``: ``input_ids, attention_mask: int32[N, max_len]``,
  any other keys of ``encode_fn`` as ``int32[N, max_len]``, ``label: int32[N]``, and
  the flags ``truncated, empty: bool[N]``.

  Sequences longer than ``max_len`` keep their first ``max_len`` tokens (and are
  flagged ``truncated``); shorter ones are padded with ``pad_id`` (other keys with 0).
  """
  _check_max_len(max_len)
  n = len(ds)
  rows, cut = _encode_all(ds.texts, encode_fn, chunk_size)
  full = [len(r) for r in rows.get("input_ids", [])]
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
  cols["truncated"] = cut | (np.asarray(full, np.int64).reshape(-1) > max_len)
  cols["empty"] = _blank(ds.texts) | (np.asarray(full, np.int64).reshape(-1) == 0)
  _report("tokenize_dataset", cols["truncated"], cols["empty"], max_len)
  return cols


def _cut_prompt(prompt: np.ndarray, room: int, head_share: float) -> np.ndarray:
  """At most ``room`` tokens of ``prompt``: its first ``floor(head_share * room)`` and its last ones."""
  if len(prompt) <= room:
    return prompt
  head = int(np.floor(head_share * room))
  return np.concatenate([prompt[:head], prompt[len(prompt) - (room - head):]])


def tokenize_prompts(ds: PromptDataset, encode_fn: EncodeFn, max_len: int, *, pad_id: int = 0,
                     bos_id: int | None = None, eos_id: int | None = None,
                     chunk_size: int = 1024, prompt_head: float = 0.25) -> dict[str, np.ndarray]:
  """Causal-LM columns ``[bos] prompt target [eos]`` with a ``loss_mask`` on the target.

  ``encode_fn`` should add no special tokens; pass ``bos_id``/``eos_id`` instead.
  When too long, the target stays whole (unless it alone exceeds ``max_len``
  minus the special tokens: then it keeps its first tokens) and the prompt
  loses its middle: it keeps its first ``floor(prompt_head * room)`` tokens
  (the chat template's head: system turn, user header, start of the
  question) and its last ``room - that`` (the end of the question and the
  assistant header), where ``room`` is what the target leaves. Such examples
  are flagged ``truncated``.

  Returns:
    ``input_ids, attention_mask, loss_mask: int32[N, max_len]``, ``task_id: int32[N]``,
    ``truncated, empty: bool[N]``.
  """
  _check_max_len(max_len)
  if not 0.0 <= prompt_head <= 1.0:
    raise ValueError(f"prompt_head={prompt_head} must lie in [0, 1] (the share of a cut prompt's "
                     "tokens kept from its start).")
  specials = (bos_id is not None) + (eos_id is not None)
  budget = max_len - specials
  if budget < 1:
    raise ValueError(f"max_len={max_len} leaves no room for tokens after bos/eos; "
                     "set config.model.max_len larger.")
  n = len(ds)
  prompt_rows, prompt_cut = _encode_all(ds.prompts, encode_fn, chunk_size)
  target_rows, target_cut = _encode_all(ds.targets, encode_fn, chunk_size)
  prompts, targets = prompt_rows.get("input_ids", []), target_rows.get("input_ids", [])
  input_ids = np.full((n, max_len), pad_id, np.int32)
  attention = np.zeros((n, max_len), np.int32)
  loss = np.zeros((n, max_len), np.int32)
  truncated = prompt_cut | target_cut
  for i in range(n):
    t = targets[i][:budget]
    p = _cut_prompt(np.asarray(prompts[i]), budget - len(t), prompt_head)
    truncated[i] |= len(t) < len(targets[i]) or len(p) < len(prompts[i])
    head = ([bos_id] if bos_id is not None else []) + list(p)
    tail = list(t) + ([eos_id] if eos_id is not None else [])
    seq = head + tail
    input_ids[i, :len(seq)] = seq
    attention[i, :len(seq)] = 1
    loss[i, len(head):len(seq)] = 1
  empty = _blank(ds.prompts) | _blank(ds.targets)
  empty |= np.asarray([len(t) == 0 for t in targets], bool).reshape(-1)
  _report("tokenize_prompts", truncated, empty, max_len)
  return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss,
          "task_id": np.asarray(ds.task_ids, np.int32), "truncated": truncated, "empty": empty}


def tokenize_prompts_only(prompts: Sequence[str], encode_fn: EncodeFn, max_len: int, *, pad_id: int = 0,
                          bos_id: int | None = None, chunk_size: int = 1024,
                          prompt_head: float = 0.25) -> dict[str, np.ndarray]:
  """Generation inputs ``[bos] prompt``, right-padded, for a decoder to continue.

  A prompt longer than ``max_len`` (``bos`` included) loses its middle as in
  :func:`tokenize_prompts`: its first ``floor(prompt_head * room)`` tokens and
  its last ones stay (the assistant header next to the answer).

  Returns:
    ``input_ids, attention_mask: int32[N, max_len]`` and ``truncated: bool[N]``.
  """
  _check_max_len(max_len)
  room = max_len - (bos_id is not None)
  if room < 1:
    raise ValueError(f"max_len={max_len} leaves no room for a prompt after bos; set config.model.max_len larger.")
  rows, cut = _encode_all(prompts, encode_fn, chunk_size)
  n = len(prompts)
  input_ids = np.full((n, max_len), pad_id, np.int32)
  attention = np.zeros((n, max_len), np.int32)
  for i, full in enumerate(rows.get("input_ids", [])):
    p = _cut_prompt(np.asarray(full), room, prompt_head)
    cut[i] |= len(p) < len(full)
    seq = ([bos_id] if bos_id is not None else []) + list(p)
    input_ids[i, :len(seq)] = seq
    attention[i, :len(seq)] = 1
  return {"input_ids": input_ids, "attention_mask": attention, "truncated": cut}
