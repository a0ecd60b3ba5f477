"""Loading Llama-family weights offline: GGUF files and Hugging Face safetensors dirs.

GGUF (llama.cpp's format) stores each tensor with its dims listed innermost
first and, for quantised types, in blocks (e.g. ``Q4_1``: 32 weights as
``w = d * q + m`` with 4-bit ``q`` and fp16 ``d, m``; ``Q8_0``: ``w = d * q``
with 8-bit ``q``). Every tensor is dequantised once, at load, with
``gguf.quants.dequantize``. llama.cpp's converter reorders the rows of each
Llama Q/K head so rotary pairs are adjacent: Hugging Face row ``h*hd + j*hd/2 + i``
is stored at GGUF row ``h*hd + 2i + j``; :func:`unpermute_qk` undoes it so the
model's half-rotation RoPE applies.

Both loaders return ``(LlamaConfig, params)`` with params matching
:class:`hetlora.models.llama.Llama` (2-D kernels ``[d_in, d_out]``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from hetlora.models.llama import LlamaConfig

GGUF_ARCHS = ("llama", "qwen2")
HF_ARCHS = ("llama", "qwen2", "mistral")


def _supported_types():
  import gguf
  t = gguf.GGMLQuantizationType
  return {t.F32, t.F16, t.BF16, t.Q8_0, t.Q4_0, t.Q4_1, t.Q5_0, t.Q5_1}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row order.

  Args:
    w: ``[n_heads * head_dim, d_in]`` (GGUF row order, PyTorch ``[out, in]``).
    n_heads: query heads for Q, key/value heads for K.

  Returns:
    ``[n_heads * head_dim, d_in]`` in Hugging Face row order.
  """
  rows = w.shape[0]
  hd = rows // n_heads
  rest = w.shape[1:]
  return w.reshape(n_heads, hd // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's Q/K row order, the inverse of :func:`unpermute_qk` (as its converter writes).

  Args:
    w: ``[n_heads * head_dim, ...]`` in Hugging Face row order (e.g. a kernel
      ``[out, in]`` or a LoRA ``lora_b: [out, r]``).
    n_heads: query heads for Q, key/value heads for K.

  Returns:
    ``[n_heads * head_dim, ...]`` in GGUF row order.
  """
  rows = w.shape[0]
  hd = rows // n_heads
  rest = w.shape[1:]
  return w.reshape(n_heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def open_gguf(path: str | os.PathLike):
  """A ``gguf.GGUFReader`` of ``path`` (parsing one takes seconds: share it between readers).

  Raises:
    FileNotFoundError: no such file.
  """
  import gguf
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist.")
  return gguf.GGUFReader(path)


def read_gguf_tensors(path: str | os.PathLike, reader=None
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Metadata and float32 tensors of a GGUF file (read with ``reader`` if given).

  Returns:
    ``(metadata, tensors)``: ``metadata`` maps each key to its Python value
    (arrays of strings/ints are lists); ``tensors`` maps each name to a
    float32 array in numpy order (the reverse of GGUF's listed dims).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a tensor's type is not supported (names tensor, file and type).
  """
  import gguf
  path = Path(path)
  if reader is None:
    reader = open_gguf(path)
  meta = {}
  for name, field in reader.fields.items():
    if name.startswith("GGUF."):
      continue
    meta[name] = field.contents()
  supported = _supported_types()
  tensors = {}
  for t in reader.tensors:
    if t.tensor_type not in supported:
      raise ValueError(
          f"tensor {t.name!r} in {str(path)!r} has type {t.tensor_type.name}, which this loader "
          f"does not support; supported: {sorted(s.name for s in supported)}. "
          f"Re-export the model with one of those types.")
    w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32, copy=False)
    expected = tuple(int(d) for d in reversed(t.shape))
    tensors[t.name] = w.reshape(expected)
  return meta, tensors


def config_from_gguf(meta: dict[str, Any], tensors: dict[str, np.ndarray], path: str = "") -> LlamaConfig:
  """A :class:`LlamaConfig` from GGUF ``<arch>.*`` metadata."""
  arch = meta.get("general.architecture")
  if arch not in GGUF_ARCHS:
    raise ValueError(f"GGUF {path!r}: architecture {arch!r} is not supported; supported: {GGUF_ARCHS}.")

  def get(key, default=None):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"GGUF {path!r} lacks metadata key {arch}.{key!s}.")
    return value

  d_model = int(get("embedding_length"))
  n_heads = int(get("attention.head_count"))
  vocab = tensors["token_embd.weight"].shape[0]
  return LlamaConfig(
      vocab_size=int(vocab),
      d_model=d_model,
      n_layers=int(get("block_count")),
      n_heads=n_heads,
      n_kv_heads=int(get("attention.head_count_kv", n_heads)),
      head_dim=int(get("attention.key_length", d_model // n_heads)),
      ffn=int(get("feed_forward_length")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      rms_eps=float(np.float32(get("attention.layer_norm_rms_epsilon"))),
      tie_embeddings="output.weight" not in tensors,
      qkv_bias="blk.0.attn_q.bias" in tensors,
  )


def _kernel(w: np.ndarray) -> np.ndarray:
  """PyTorch ``[out, in]`` -> Flax ``[in, out]``."""
  return np.ascontiguousarray(w.T)


# Source tensor stem (before ".weight"/".bias") of each parameter role; "{i}" is the layer.
GGUF_NAMES = {
    "embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
    "q_proj": "blk.{i}.attn_q", "k_proj": "blk.{i}.attn_k", "v_proj": "blk.{i}.attn_v",
    "o_proj": "blk.{i}.attn_output", "gate_proj": "blk.{i}.ffn_gate", "up_proj": "blk.{i}.ffn_up",
    "down_proj": "blk.{i}.ffn_down", "attn_norm": "blk.{i}.attn_norm", "mlp_norm": "blk.{i}.ffn_norm",
}
_MODULE_PATH = re.compile(r"layers_(\d+)/(?:attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))")


def gguf_weight_name(module_path: str) -> str:
  """The GGUF weight that a Flax module path of :class:`Llama` adapts (:data:`GGUF_NAMES` read backwards).

  Example:
    >>> gguf_weight_name('layers_3/attn/q_proj'), gguf_weight_name('lm_head')
    ('blk.3.attn_q.weight', 'output.weight')

  Raises:
    KeyError: ``module_path`` is no 2-D projection of the decoder.
  """
  if module_path == "lm_head":
    return GGUF_NAMES["lm_head"] + ".weight"
  m = _MODULE_PATH.fullmatch(module_path)
  if m is None:
    raise KeyError(f"module path {module_path!r} is no Llama projection; expected 'lm_head' or "
                   "'layers_<i>/attn/{q,k,v,o}_proj' or 'layers_<i>/mlp/{gate,up,down}_proj'.")
  return GGUF_NAMES[m.group(2) or m.group(3)].format(i=int(m.group(1))) + ".weight"


HF_NAMES = {
    "embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
    **{name: "model.layers.{i}.self_attn." + name for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{name: "model.layers.{i}.mlp." + name for name in ("gate_proj", "up_proj", "down_proj")},
    "attn_norm": "model.layers.{i}.input_layernorm", "mlp_norm": "model.layers.{i}.post_attention_layernorm",
}

# Our module path of each linear role (the tree :func:`_assemble` builds); with :data:`HF_NAMES`, the
# one table that names adapters both ways (:func:`hf_module_name`, :func:`flax_module_path`).
FLAX_LINEARS = {
    **{name: "layers_{i}/attn/" + name for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{name: "layers_{i}/mlp/" + name for name in ("gate_proj", "up_proj", "down_proj")},
    "lm_head": "lm_head",
}


def _template_regex(template: str, layer: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(re.escape("{i}"), layer))


def hf_module_name(path: str) -> str | None:
  """The ``transformers`` ``LlamaForCausalLM`` module of our linear module ``path``, or ``None``.

  Kernels loaded from GGUF are already in Hugging Face row order (:func:`unpermute_qk`), so the
  names apply to both sources.

  Example:
    >>> hf_module_name("layers_2/attn/q_proj")
    'model.layers.2.self_attn.q_proj'
  """
  for role, ours in FLAX_LINEARS.items():
    match = _template_regex(ours, r"(\d+)").fullmatch(path)
    if match:
      return HF_NAMES[role].format(i=match.group(1) if match.groups() else None)
  return None


def flax_module_path(name: str) -> str | None:
  """The inverse of :func:`hf_module_name`, or ``None``."""
  for role, ours in FLAX_LINEARS.items():
    match = _template_regex(HF_NAMES[role], r"(\d+)").fullmatch(name)
    if match:
      return ours.format(i=match.group(1) if match.groups() else None)
  return None


def _taker(tensors: dict[str, np.ndarray], where: str):
  """``take(name)``: ``tensors[name]``, or a KeyError naming ``where`` and the missing tensor."""

  def take(name):
    if name not in tensors:
      raise KeyError(f"{where} has no tensor {name!r}.")
    return tensors[name]

  return take


def _assemble(cfg: LlamaConfig, take, names: dict[str, str], param_dtype: Any,
              permute_qk: bool) -> dict:
  """The ``Llama(cfg)`` parameter tree from source tensors.

  Args:
    cfg: the model's config.
    take: ``take(name)`` returns the float32 tensor ``name`` (PyTorch ``[out, in]``).
    names: each parameter role's source stem (see :data:`GGUF_NAMES`, :data:`HF_NAMES`).
    param_dtype: dtype of the returned arrays.
    permute_qk: undo llama.cpp's Q/K row order (:func:`unpermute_qk`).
  """

  def arr(x):
    return jnp.asarray(x, param_dtype)

  def tensor(role, i=None, part="weight"):
    return take(f"{names[role].format(i=i)}.{part}")

  params: dict[str, Any] = {"embed_tokens": {"embedding": arr(tensor("embed_tokens"))},
                            "norm": {"scale": arr(tensor("norm"))}}
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": arr(_kernel(tensor("lm_head")))}
  for i in range(cfg.n_layers):
    attn = {}
    for ours, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.n_kv_heads), ("v_proj", None),
                        ("o_proj", None)):
      w = tensor(ours, i)
      if permute_qk and heads:
        w = unpermute_qk(w, heads)
      attn[ours] = {"kernel": arr(_kernel(w))}
      if cfg.qkv_bias and ours != "o_proj":
        bias = tensor(ours, i, "bias")
        if permute_qk and heads:
          bias = unpermute_qk(bias, heads)
        attn[ours]["bias"] = arr(bias)
    mlp = {ours: {"kernel": arr(_kernel(tensor(ours, i)))}
           for ours in ("gate_proj", "up_proj", "down_proj")}
    params[f"layers_{i}"] = {
        "attn_norm": {"scale": arr(tensor("attn_norm", i))},
        "attn": attn,
        "mlp_norm": {"scale": arr(tensor("mlp_norm", i))},
        "mlp": mlp,
    }
  return params


def load_gguf(path: str | os.PathLike, param_dtype: Any = jnp.float32, reader=None
              ) -> tuple[LlamaConfig, dict]:
  """Config and parameters of a Llama/Qwen2 GGUF, dequantised once.

  Args:
    path: a ``.gguf`` file (see :func:`hetlora.models.files.resolve`).
    param_dtype: dtype of the returned arrays.
    reader: an :func:`open_gguf` reader of ``path`` to reuse (optional).

  Returns:
    ``(config, params)``; ``params`` nests like ``Llama(config)``'s.

  Example:
    >>> cfg, params = load_gguf(resolve('smollm2-135m-instruct'))
    >>> params['layers_0']['attn']['q_proj']['kernel'].shape
    (576, 576)
  """
  meta, t = read_gguf_tensors(path, reader)
  cfg = config_from_gguf(meta, t, str(path))
  permute = meta["general.architecture"] == "llama"
  return cfg, _assemble(cfg, _taker(t, f"GGUF {str(path)!r}"), GGUF_NAMES, param_dtype, permute)


def config_from_hf(hf: dict[str, Any], path: str = "") -> LlamaConfig:
  """A :class:`LlamaConfig` from a Hugging Face ``config.json`` dict."""
  model_type = hf.get("model_type")
  if model_type not in HF_ARCHS:
    raise ValueError(f"{path!r}: model_type {model_type!r} is not supported; supported: {HF_ARCHS}.")
  scaling = hf.get("rope_scaling")
  if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
    raise ValueError(f"{path!r}: rope_scaling {scaling!r} is not supported; only plain RoPE is.")
  d_model, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  return LlamaConfig(
      vocab_size=int(hf["vocab_size"]),
      d_model=d_model,
      n_layers=int(hf["num_hidden_layers"]),
      n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=int(hf.get("head_dim") or d_model // n_heads),
      ffn=int(hf["intermediate_size"]),
      rope_theta=float(hf.get("rope_theta", 10000.0)),
      rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
  )


def load_hf_safetensors(directory: str | os.PathLike,
                        param_dtype: Any = jnp.float32) -> tuple[LlamaConfig, dict]:
  """Config and parameters of a Hugging Face Llama-style directory.

  Reads ``config.json`` and every ``*.safetensors`` file (single or sharded),
  with names like ``model.layers.N.self_attn.q_proj.weight: [out, in]``,
  transposed to ``[in, out]`` kernels.
  """
  from safetensors import safe_open
  directory = Path(directory)
  cfg_path = directory / "config.json"
  if not cfg_path.is_file():
    raise FileNotFoundError(f"{str(cfg_path)!r} does not exist; pass a Hugging Face model directory.")
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors file in {str(directory)!r}.")
  cfg = config_from_hf(json.loads(cfg_path.read_text()), str(directory))
  t: dict[str, np.ndarray] = {}
  for f in files:
    with safe_open(f, framework="flax") as fh:
      for name in fh.keys():
        t[name] = np.asarray(fh.get_tensor(name).astype(jnp.float32))
  return cfg, _assemble(cfg, _taker(t, repr(str(directory))), HF_NAMES, param_dtype, False)


def load(path: str | os.PathLike, param_dtype: Any = jnp.float32) -> tuple[LlamaConfig, dict]:
  """:func:`load_gguf` for a ``.gguf`` file, :func:`load_hf_safetensors` for a directory."""
  path = Path(path)
  if path.is_dir():
    return load_hf_safetensors(path, param_dtype)
  if path.suffix == ".gguf":
    return load_gguf(path, param_dtype)
  raise FileNotFoundError(f"{str(path)!r} is neither a .gguf file nor a Hugging Face model directory.")
