"""A ``tokenizers.Tokenizer`` rebuilt from the vocabulary stored in a GGUF file.

GGUF ``gpt2``-type tokenizers are byte-level BPE (Radford et al., 2019;
Sennrich et al., ACL 2016): ``tokenizer.ggml.tokens`` gives the id of each
token string, ``tokenizer.ggml.merges`` the ranked ``"left right"`` merges,
and ``tokenizer.ggml.token_type == 3`` marks control tokens (``<|im_start|>``,
``<|im_end|>``, ...), matched whole as special tokens. No BOS is added. The
pre-tokenizer is GPT-2's byte-level regex split without a separate digit
split, as Hugging Face transformers builds it from a GGUF.

Chat prompts use ChatML; :func:`chat_prompt` inserts the default system turn
when the first message is not a system message, as SmolLM2's template does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

CONTROL = 3
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def tokenizer_from_gguf(path: str | os.PathLike, reader=None) -> Tokenizer:
  """Byte-level BPE tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata.

  ``reader``: a ``gguf.GGUFReader`` of ``path`` to reuse (optional; parsing
  one takes seconds).

  Example:
    >>> tok = tokenizer_from_gguf(resolve('smollm2-135m-instruct'))
    >>> tok.encode('The quick', add_special_tokens=False).ids
    [504, 2365]
  """
  import gguf
  path = Path(path)
  if reader is None:
    if not path.is_file():
      raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    reader = gguf.GGUFReader(path)

  def field(name):
    if name not in reader.fields:
      raise ValueError(f"GGUF {str(path)!r} has no {name!r}; it carries no BPE tokenizer.")
    return reader.fields[name].contents()

  kind = field("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"GGUF {str(path)!r}: tokenizer model {kind!r} is not supported; only 'gpt2' (byte-level BPE).")
  tokens = field("tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
  types = reader.fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in reader.fields else []
  vocab = {tok: i for i, tok in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  special = [AddedToken(tokens[i], special=True, normalized=False)
             for i, ty in enumerate(types) if ty == CONTROL]
  tok.add_special_tokens(special)
  return tok


def chat_prompt(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                default_system: str | None = DEFAULT_SYSTEM) -> str:
  """ChatML text of ``messages`` (``[{'role': ..., 'content': ...}, ...]``).

  Each turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; a default
  system turn comes first unless the first message is a system message (or
  ``default_system`` is None); ``add_generation_prompt`` appends
  ``<|im_start|>assistant\\n``.

  Example:
    >>> chat_prompt([{'role': 'user', 'content': 'Hi'}]).endswith('<|im_start|>assistant\\n')
    True
  """
  parts = []
  if default_system is not None and (not messages or messages[0]["role"] != "system"):
    parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
  for m in messages:
    parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
  if add_generation_prompt:
    parts.append("<|im_start|>assistant\n")
  return "".join(parts)
