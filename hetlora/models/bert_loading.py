"""Loading a Hugging Face BERT checkpoint (``config.json`` + ``model.safetensors``).

HF stores ``nn.Linear`` weights as ``[out, in]``; Flax kernels are
``[in, out]``, so linear weights are transposed. Names may carry a ``bert.``
or ``roberta.`` prefix (``BertFor*``, ``RobertaFor*`` checkpoints); RoBERTa
has the same tensors under the same names. Unused tensors (pooler, ``position_ids``,
task heads) are ignored. No hub calls: the directory is a local path or a
known package model (:func:`hetlora.models.files.resolve`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers 'bfloat16' with numpy for BF16 tensors)
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from hetlora.models import files
from hetlora.models.bert import BertConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# safetensors dtype tags this reader decodes (BF16 through ml_dtypes, registered with numpy).
SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


def read_safetensors(path: str | os.PathLike, names: set[str] | None = None
                     ) -> dict[str, np.ndarray]:
  """Reads tensors (all, or those in ``names``) from a ``.safetensors`` file.

  Uses ``safetensors.safe_open(path, framework="numpy")``; ``BF16`` tensors
  come back as ``ml_dtypes.bfloat16`` arrays.

  Raises:
    ValueError: the file is malformed, or a wanted tensor has a dtype this
      reader cannot decode.
  """
  path = Path(path)
  out = {}
  try:
    with safe_open(str(path), framework="numpy") as f:
      for name in f.keys():
        if names is not None and name not in names:
          continue
        tag = f.get_slice(name).get_dtype()
        if tag not in SAFETENSORS_DTYPES:
          raise ValueError(f"{path}: tensor {name!r} has dtype {tag}, which cannot be read; "
                           f"supported: {sorted(SAFETENSORS_DTYPES)}. Convert the checkpoint "
                           "to F32/F16/BF16.")
        out[name] = f.get_tensor(name)
  except SafetensorError as e:
    raise ValueError(f"{path} is not a readable safetensors file ({e}).") from None
  return out


# The encoder layer's linear modules: our module path under ``encoder/layer_{i}`` -> the HF module
# under ``encoder.layer.{i}``. One table for loading (:func:`_hf_names`) and for naming adapters
# (:func:`hf_module_name`, :func:`flax_module_path`).
LAYER_LINEARS = {
    "attention/query": "attention.self.query",
    "attention/key": "attention.self.key",
    "attention/value": "attention.self.value",
    "attention/output": "attention.output.dense",
    "mlp/intermediate": "intermediate.dense",
    "mlp/output": "output.dense",
}
_OUR_LAYER = re.compile(r"encoder/layer_(\d+)/(.+)")
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# Task-model checkpoints nest the encoder under the family's name.
PREFIXES = ("bert.", "roberta.")


def hf_module_name(path: str) -> str | None:
  """The ``transformers`` ``BertModel`` module of our linear module ``path``, or ``None``.

  ``None`` for modules a BERT checkpoint does not hold (the classifier head).

  Example:
    >>> hf_module_name("encoder/layer_3/attention/query")
    'encoder.layer.3.attention.self.query'
  """
  match = _OUR_LAYER.fullmatch(path)
  if not match or match.group(2) not in LAYER_LINEARS:
    return None
  return f"encoder.layer.{match.group(1)}.{LAYER_LINEARS[match.group(2)]}"


def flax_module_path(name: str) -> str | None:
  """The inverse of :func:`hf_module_name` (a ``bert.`` or ``roberta.`` prefix is ignored), or ``None``."""
  for prefix in PREFIXES:
    name = name.removeprefix(prefix)
  match = _HF_LAYER.fullmatch(name)
  ours = {hf: o for o, hf in LAYER_LINEARS.items()}
  if not match or match.group(2) not in ours:
    return None
  return f"encoder/layer_{match.group(1)}/{ours[match.group(2)]}"


def _hf_names(config: BertConfig) -> dict[str, tuple[str, bool]]:
  """``{flax path: (HF name without prefix, transpose?)}`` for the encoder."""
  m = {
      "embeddings/word_embeddings/embedding": ("embeddings.word_embeddings.weight", False),
      "embeddings/position_embeddings/embedding":
          ("embeddings.position_embeddings.weight", False),
      "embeddings/token_type_embeddings/embedding":
          ("embeddings.token_type_embeddings.weight", False),
      "embeddings/layer_norm/scale": ("embeddings.LayerNorm.weight", False),
      "embeddings/layer_norm/bias": ("embeddings.LayerNorm.bias", False),
  }
  norms = {"attention_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
  for i in range(config.num_hidden_layers):
    ours, theirs = f"encoder/layer_{i}", f"encoder.layer.{i}"
    for o, t in LAYER_LINEARS.items():
      m[f"{ours}/{o}/kernel"] = (f"{theirs}.{t}.weight", True)
      m[f"{ours}/{o}/bias"] = (f"{theirs}.{t}.bias", False)
    for o, t in norms.items():
      m[f"{ours}/{o}/scale"] = (f"{theirs}.{t}.weight", False)
      m[f"{ours}/{o}/bias"] = (f"{theirs}.{t}.bias", False)
  return m


def load_config(model: str | os.PathLike) -> BertConfig:
  """The :class:`BertConfig` of a model directory (or known model name)."""
  directory = _model_dir(model)
  return BertConfig.from_json(_require(directory, CONFIG_FILE, "the model's HF config"))


def load_bert(model: str | os.PathLike, dtype: Any = None) -> tuple[BertConfig, dict]:
  """Loads a HF BERT checkpoint into the :class:`hetlora.models.bert.BertModel` tree.

  Args:
    model: a local directory with ``config.json`` and ``model.safetensors``,
      or a known model name such as ``'all-minilm-l6-v2'``.
    dtype: if given, cast floating tensors to it (e.g. ``jnp.bfloat16``);
      default keeps the stored dtype.

  Returns:
    ``(config, params)`` with ``params['encoder']['layer_0']['attention']
    ['query']['kernel']: [H, H]`` (``[d_in, d_out]``), as ``jnp`` arrays.

  Raises:
    FileNotFoundError: the directory or one of its files is missing.
    ValueError: unsupported ``model_type``, unreadable dtype, or missing
      tensors (the message lists them).
  """
  directory = _model_dir(model)
  config = BertConfig.from_json(_require(directory, CONFIG_FILE, "the model's HF config"))
  weights = _require(directory, WEIGHTS_FILE, "the model weights in safetensors format")
  mapping = _hf_names(config)
  wanted = {name for name, _ in mapping.values()}
  tensors = read_safetensors(weights, names=wanted | {p + n for p in PREFIXES for n in wanted})
  prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in tensors)), "")
  missing = sorted(prefix + n for n in wanted if prefix + n not in tensors)
  if missing:
    raise ValueError(
        f"{weights} lacks {len(missing)} tensor(s) a {config.num_hidden_layers}-layer BERT "
        f"needs, e.g. {missing[:5]}; is this a BERT checkpoint matching {CONFIG_FILE}?")
  flat = {}
  for path, (name, transpose) in mapping.items():
    arr = tensors[prefix + name]
    if transpose:
      arr = arr.T
    arr = jnp.asarray(arr)
    if dtype is not None and jnp.issubdtype(arr.dtype, jnp.floating):
      arr = arr.astype(dtype)
    flat[path] = arr
  _check_shapes(flat, config, weights)
  return config, traverse_util.unflatten_dict(flat, sep="/")


def _check_shapes(flat: dict, config: BertConfig, source: Path) -> None:
  h, i = config.hidden_size, config.intermediate_size
  expect = {
      "embeddings/word_embeddings/embedding": (config.vocab_size, h),
      "embeddings/position_embeddings/embedding": (config.max_position_embeddings, h),
      "encoder/layer_0/attention/query/kernel": (h, h),
      "encoder/layer_0/mlp/intermediate/kernel": (h, i),
      "encoder/layer_0/mlp/output/kernel": (i, h),
  }
  for path, shape in expect.items():
    if tuple(flat[path].shape) != shape:
      raise ValueError(f"{source}: {path} has shape {tuple(flat[path].shape)}, but "
                       f"{CONFIG_FILE} implies {shape}.")


def _model_dir(model: str | os.PathLike) -> Path:
  path = files.resolve(model)
  if not path.is_dir():
    raise FileNotFoundError(
        f"{path} is not a directory; a BERT model is a directory holding "
        f"{CONFIG_FILE} and {WEIGHTS_FILE}.")
  return path


def _require(directory: Path, name: str, what: str) -> Path:
  path = directory / name
  if not path.is_file():
    present = sorted(p.name for p in directory.iterdir())[:20]
    raise FileNotFoundError(f"{path} is missing: expected {what} ({name}); "
                            f"the directory holds {present}.")
  return path
