"""Tiny random models written as local Hugging Face directories, for fast tests.

Each text-model writer puts ``config.json``, ``model.safetensors`` (random weights,
HF names, ``[out, in]`` linear weights) and ``tokenizer.json`` (a
character-level tokenizer over printable ASCII plus the family's special
tokens) into a directory, so the model providers load it like a real
checkpoint (``config.model.name = <directory>``) in well under a second.

Example::

    from hetlora.models import provider, testing
    cfg = ml_collections.ConfigDict(dict(name=str(testing.write_tiny_llama(tmp_path / "m")),
                                         max_len=32, dtype="float32"))
    loaded = provider.get("llama_lm").load(cfg, num_labels=None, key=jax.random.key(0))

:mod:`hetlora.models.vit_testing` writes the tiny ViT (an ONNX file).
:func:`write_tiny` picks the writer of a provider kind, for suites
parametrised over every provider. :func:`write_bert` and :func:`write_llama`
write random weights for any Hugging Face config, e.g. a real model's shapes
for GPU benchmarks that cannot carry the real weights (``benchmarks/gpu_suite.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from hetlora.models import bert_loading, gguf_loading
from hetlora.models.bert import BertConfig
from hetlora.models.llama import LlamaConfig
from hetlora.models.vit_testing import write_tiny_vit

CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]   # RoBERTa's ids 0..4
LLAMA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
TINY_SYSTEM = "You are a tiny test model."
# SmolLM2's ChatML template with a shorter default system turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + TINY_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def char_tokenizer(specials: list[str], unk: str, lowercase: bool = False) -> Tokenizer:
  """One token per character of :data:`CHARS`; ``specials`` first (ids ``0..``), matched whole."""
  vocab = {t: i for i, t in enumerate(specials + CHARS)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk, fuse_unk=True))
  if lowercase:
    tok.normalizer = normalizers.Lowercase()
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  return tok


def _random(rng: np.random.Generator, shape, std: float) -> np.ndarray:
  return (std * rng.standard_normal(shape)).astype(np.float32)


def write_tiny_bert(directory: str | os.PathLike, *, hidden: int = 32, layers: int = 2,
                    heads: int = 4, intermediate: int = 64, vocab_size: int = 256,
                    max_positions: int = 64, seed: int = 0) -> Path:
  """A random BERT encoder with a ``[CLS] text [SEP]`` character tokenizer; returns the directory.

  Example:
    >>> d = write_tiny_bert(tmp_path / 'bert')          # doctest: +SKIP
    >>> bert_loading.load_bert(d)[0].hidden_size         # doctest: +SKIP
    32
  """
  tok = char_tokenizer(BERT_SPECIALS, "[UNK]", lowercase=True)
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  if tok.get_vocab_size() > vocab_size:
    raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {tok.get_vocab_size()}.")
  hf = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": intermediate, "max_position_embeddings": max_positions,
        "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0}
  return write_bert(directory, hf, tok, seed=seed)


def write_tiny_roberta(directory: str | os.PathLike, *, hidden: int = 32, layers: int = 2,
                       heads: int = 4, intermediate: int = 64, vocab_size: int = 256,
                       max_positions: int = 66, seed: int = 0) -> Path:
  """A random RoBERTa encoder (``<s> text </s>``, pad id 1, one token type); returns the directory.

  ``max_positions`` counts the two position ids RoBERTa reserves (``pad_token_id + 1``).
  """
  tok = char_tokenizer(ROBERTA_SPECIALS, "<unk>")
  tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
  if tok.get_vocab_size() > vocab_size:
    raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {tok.get_vocab_size()}.")
  hf = {"model_type": "roberta", "architectures": ["RobertaModel"], "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": intermediate, "max_position_embeddings": max_positions,
        "type_vocab_size": 1, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "pad_token_id": 1,
        "bos_token_id": 0, "eos_token_id": 2}
  return write_bert(directory, hf, tok, seed=seed)


def write_bert(directory: str | os.PathLike, hf: dict, tok: Tokenizer, *, std: float = 0.1,
               seed: int = 0) -> Path:
  """A BERT encoder of HF config ``hf`` with random weights (normal, ``std``); returns the directory.

  Any size: with a real model's ``config.json`` and ``tokenizer.json`` this is
  that model in its real shapes (for timing and memory, which do not depend on
  the weights' values).
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  config = BertConfig.from_hf_dict(hf)
  rng = np.random.default_rng(seed)
  tensors = {}
  for path, (name, transpose) in bert_loading._hf_names(config).items():  # pylint: disable=protected-access
    shape = _bert_shape(path, config)
    if path.endswith("/scale"):
      arr = np.ones(shape, np.float32)
    elif path.endswith("/bias"):
      arr = _random(rng, shape, 0.01)
    else:
      arr = _random(rng, shape, std)
    tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
  save_file(tensors, str(directory / bert_loading.WEIGHTS_FILE))
  (directory / bert_loading.CONFIG_FILE).write_text(json.dumps(hf, indent=1))
  tok.save(str(directory / "tokenizer.json"))
  return directory


def _bert_shape(path: str, c: BertConfig) -> tuple[int, ...]:
  """The Flax shape of a BERT parameter path (kernels ``[d_in, d_out]``)."""
  h, i = c.hidden_size, c.intermediate_size
  if path.endswith("/embedding"):
    rows = {"word_embeddings": c.vocab_size, "position_embeddings": c.max_position_embeddings,
            "token_type_embeddings": c.type_vocab_size}[path.split("/")[1]]
    return (rows, h)
  if "norm" in path:
    return (h,)
  d_in, d_out = (h, i) if "mlp/intermediate" in path else (i, h) if "mlp/output" in path else (h, h)
  return (d_in, d_out) if path.endswith("/kernel") else (d_out,)


def write_tiny_llama(directory: str | os.PathLike, *, hidden: int = 32, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, ffn: int = 64, vocab_size: int = 256,
                     tie_embeddings: bool = False, chat_template: bool = True,
                     seed: int = 0) -> Path:
  """A random Llama decoder with a character tokenizer; returns the directory.

  With ``chat_template`` a ``tokenizer_config.json`` carries a ChatML template
  (SmolLM2's, default system turn :data:`TINY_SYSTEM`) and ``eos_token
  <|im_end|>``; without it the tokenizer has no template (plain prompts) and
  ``<|endoftext|>`` ends a sequence.
  """
  tok = char_tokenizer(LLAMA_SPECIALS, "<unk>")
  if tok.get_vocab_size() > vocab_size:
    raise ValueError(f"vocab_size={vocab_size} is below the tokenizer's {tok.get_vocab_size()}.")
  config = LlamaConfig(vocab_size=vocab_size, d_model=hidden, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv_heads, head_dim=hidden // heads, ffn=ffn, rms_eps=1e-5,
                       tie_embeddings=tie_embeddings)
  hf = {**llama_hf_config(config), "max_position_embeddings": 256, "bos_token_id": None,
        "eos_token_id": 2}
  tok_config = {"bos_token": None, "add_bos_token": False,
                "eos_token": "<|im_end|>" if chat_template else "<|endoftext|>",
                "pad_token": "<|endoftext|>"}
  if chat_template:
    tok_config["chat_template"] = CHATML_TEMPLATE
  return write_llama(directory, hf, tok, tok_config, seed=seed)


def llama_hf_config(config: LlamaConfig) -> dict:
  """The Hugging Face ``config.json`` dict of ``config`` (read back by ``gguf_loading.config_from_hf``).

  Example:
    >>> meta, tensors = gguf_loading.read_gguf_tensors(gguf_path)    # doctest: +SKIP
    >>> llama_hf_config(gguf_loading.config_from_gguf(meta, tensors))['hidden_size']  # doctest: +SKIP
    576
  """
  return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
          "vocab_size": config.vocab_size, "hidden_size": config.d_model,
          "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
          "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim,
          "intermediate_size": config.ffn, "rope_theta": config.rope_theta,
          "rms_norm_eps": config.rms_eps, "tie_word_embeddings": config.tie_embeddings,
          "attention_bias": config.qkv_bias}


def write_llama(directory: str | os.PathLike, hf: dict, tok: Tokenizer, tok_config: dict, *,
                std: float = 0.1, seed: int = 0) -> Path:
  """A Llama decoder of HF config ``hf`` with random weights (normal, ``std``); returns the directory.

  Writes ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
  ``tokenizer_config.json`` (``tok_config``). Any size, like :func:`write_bert`.
  No q/k/v biases (``attention_bias`` must be false).
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  c = gguf_loading.config_from_hf(hf, str(directory))
  q, kv, d = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.d_model
  shapes = {"embed_tokens": (c.vocab_size, d), "norm": (d,), "lm_head": (c.vocab_size, d),
            "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (c.ffn, d), "up_proj": (c.ffn, d), "down_proj": (d, c.ffn),
            "attn_norm": (d,), "mlp_norm": (d,)}
  rng = np.random.default_rng(seed)
  tensors = {}
  for role, stem in gguf_loading.HF_NAMES.items():
    if role == "lm_head" and c.tie_embeddings:
      continue
    for i in range(c.n_layers) if "{i}" in stem else [None]:
      shape = shapes[role]
      arr = np.ones(shape, np.float32) if len(shape) == 1 else _random(rng, shape, std)
      tensors[f"{stem.format(i=i)}.weight"] = arr
  save_file(tensors, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(hf, indent=1))
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
  return directory


WRITERS = {"bert_classifier": write_tiny_bert, "llama_lm": write_tiny_llama, "vit_classifier": write_tiny_vit}


def write_tiny(kind: str, directory: str | os.PathLike, **kwargs) -> Path:
  """The tiny model of provider ``kind`` (``config.model.kind``) in ``directory``."""
  if kind not in WRITERS:
    raise ValueError(f"no tiny model for model.kind={kind!r}; add a writer to "
                     f"hetlora.models.testing.WRITERS (have {sorted(WRITERS)}).")
  return WRITERS[kind](directory, **kwargs)
