"""Batch tokenization to padded numpy arrays over any ``tokenizers.Tokenizer``.

A ``tokenizer.json`` may carry its own padding and truncation (MiniLM's pads
and truncates to 128). :func:`configure` returns a copy with padding off and
truncation set to what the caller asks; :func:`encode` pads the batch itself,
to its longest sequence or to a fixed ``max_len``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tokenizers

from hetlora.models import files

TOKENIZER_FILE = "tokenizer.json"
_PAD_TOKENS = ("[PAD]", "<pad>", "<|padding|>", "<|endoftext|>")


def load_tokenizer(model: str | os.PathLike, max_len: int | None = None) -> tokenizers.Tokenizer:
  """``tokenizer.json`` from a model directory (or known model name, or the file itself).

  The result has built-in padding disabled and truncates at ``max_len``
  (no truncation if ``None``).
  """
  path = files.resolve(model)
  if path.is_dir():
    path = path / TOKENIZER_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: expected a Hugging Face tokenizers file "
                            f"({TOKENIZER_FILE}) in the model directory.")
  return configure(tokenizers.Tokenizer.from_file(str(path)), max_len)


def pad_id_of(tokenizer: tokenizers.Tokenizer) -> int:
  """The padding id: the tokenizer's own padding setting, else a known pad token, else 0."""
  if tokenizer.padding is not None:
    return int(tokenizer.padding["pad_id"])
  for token in _PAD_TOKENS:
    i = tokenizer.token_to_id(token)
    if i is not None:
      return int(i)
  return 0


def configure(tokenizer: tokenizers.Tokenizer, max_len: int | None = None
              ) -> tokenizers.Tokenizer:
  """A copy of ``tokenizer`` without padding, truncating at ``max_len`` (or not at all).

  Truncation through the tokenizer keeps special tokens (e.g. BERT's final
  ``[SEP]``) inside the limit. The input object is not modified; read its
  pad id with :func:`pad_id_of` before configuring if it is not a known pad token.
  """
  out = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  out.no_padding()
  out.no_truncation()
  if max_len is not None:
    if max_len < 1:
      raise ValueError(f"max_len must be >= 1, got {max_len}.")
    out.enable_truncation(max_len)
  return out


def _needs_configure(tokenizer: tokenizers.Tokenizer, max_len: int | None) -> bool:
  trunc = tokenizer.truncation
  have = None if trunc is None else trunc["max_length"]
  return tokenizer.padding is not None or have != max_len


def encode(tokenizer: tokenizers.Tokenizer, texts: Sequence[str], max_len: int | None = None,
           pad_to_max: bool = False, pad_id: int | None = None,
           add_special_tokens: bool = True) -> dict[str, np.ndarray]:
  """Tokenizes ``texts`` into padded arrays.

  Args:
    tokenizer: any ``tokenizers.Tokenizer`` (its own padding is ignored).
    texts: ``B`` strings.
    max_len: truncate each sequence to this many tokens (special tokens included).
    pad_to_max: pad to ``max_len`` instead of the batch's longest sequence.
    pad_id: padding id; default :func:`pad_id_of` the tokenizer.
    add_special_tokens: add ``[CLS]``/``[SEP]`` or the tokenizer's equivalents.

  Returns:
    ``{'input_ids', 'attention_mask', 'token_type_ids'}``, each ``int32[B, L]``
    with ``L = max_len`` if ``pad_to_max`` else the longest sequence (>= 1),
    and ``'truncated': bool[B]``, the texts cut at ``max_len`` (or at the
    tokenizer's own truncation length).

  Example:
    >>> tok = load_tokenizer('all-minilm-l6-v2')        # doctest: +SKIP
    >>> encode(tok, ['hello world'])['input_ids']        # doctest: +SKIP
    array([[ 101, 7592, 2088,  102]], dtype=int32)
  """
  if isinstance(texts, str):
    raise TypeError("encode expects a list of strings, got a single str; wrap it in a list.")
  if pad_to_max and max_len is None:
    raise ValueError("pad_to_max=True needs max_len.")
  if pad_id is None:
    pad_id = pad_id_of(tokenizer)
  if _needs_configure(tokenizer, max_len):
    tokenizer = configure(tokenizer, max_len)
  encs = tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
  longest = max([len(e.ids) for e in encs], default=0)
  length = max_len if pad_to_max else max(longest, 1)
  b = len(encs)
  ids = np.full((b, length), pad_id, np.int32)
  mask = np.zeros((b, length), np.int32)
  types = np.zeros((b, length), np.int32)
  truncated = np.zeros((b,), bool)
  for i, e in enumerate(encs):
    n = len(e.ids)
    ids[i, :n] = e.ids
    mask[i, :n] = 1
    types[i, :n] = e.type_ids
    truncated[i] = bool(e.overflowing)
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "truncated": truncated}


def tokenizer_path(model: str | os.PathLike) -> Path:
  """Where :func:`load_tokenizer` would read ``tokenizer.json`` from."""
  path = files.resolve(model)
  return path / TOKENIZER_FILE if path.is_dir() else path
