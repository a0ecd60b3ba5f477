"""Hugging Face PEFT LoRA directories: export, and import as a run's starting adapter.

PEFT (Mangrulkar et al., 2022, github.com/huggingface/peft) adds to a
``torch.nn.Linear`` with weight ``W0: [d_out, d_in]``::

    y = x W0^T + s_P * (x A^T) B^T,   A = lora_A.weight: [r, d_in],  B = lora_B.weight: [d_out, r]
    s_P = lora_alpha / r              (use_rslora: lora_alpha / sqrt(r))

with ``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern``
(else the top-level ``r`` / ``lora_alpha``). Our module ``m`` (see
:class:`hetlora.export.Adapter`) is ``dW_m = s_m a_m[:, :r_m] b_m[:r_m]``, so
``A = a[:, :r]^T``, ``B = b[:r]^T`` and ``lora_alpha_m = s_m * r_m`` (rsLoRA:
``s_m * sqrt(r_m)``): PEFT computes exactly our update whatever the run's scale
rule (``alpha/r``, ``alpha/r_max``, ``rslora``).

A directory holds ``adapter_model.safetensors`` (keys
``base_model.model.<HF module>.lora_{A,B}.weight``) and ``adapter_config.json``;
``PeftModel.from_pretrained(base, directory)`` loads it onto the model class of
:data:`PEFT_MODELS` (``AutoModel`` for a BERT encoder, ``AutoModelForCausalLM``
for a Llama-family decoder). Tensors the base checkpoint lacks (the classifier
head of ``bert_classifier`` as the run evaluates it: trained, frozen as drawn,
or merged ``W0 + dW``) are written as PEFT writes ``modules_to_save``: whole
modules in PyTorch layout, ``base_model.model.<module>.weight: [d_out, d_in]``
and ``.bias`` in the same safetensors file, the module listed in the config's
``modules_to_save``. ``PeftModel.from_pretrained`` loads them into the base
model's module of that name (for BERT, a ``classifier = nn.Linear(H,
num_labels)`` attached to the ``BertModel``, applied to the pooled
``last_hidden_state``; ``docs/export.md``).

Example::

    adapter = workdir_adapter.from_workdir('workdirs/tweets')
    peft.export(adapter, 'exported/tweets')          # then, in PyTorch:
    # PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), 'exported/tweets')
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from hetlora import export as export_lib
from hetlora import lora as lora_lib
from hetlora.export import Adapter
from hetlora.models import bert_loading

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
SUFFIX_A, SUFFIX_B = ".lora_A.weight", ".lora_B.weight"


@dataclasses.dataclass(frozen=True)
class PeftModel:
  """How a model kind is loaded in ``transformers`` for PEFT."""
  task_type: str
  auto_class: str


PEFT_MODELS = {
    "bert_classifier": PeftModel("FEATURE_EXTRACTION", "AutoModel"),      # BertModel: encoder only
    "llama_lm": PeftModel("CAUSAL_LM", "AutoModelForCausalLM"),           # LlamaForCausalLM
}


def peft_alpha(s: float, rank: int, use_rslora: bool) -> float:
  """PEFT's ``lora_alpha`` giving scale ``s`` at ``rank``: ``s r`` (rsLoRA ``s sqrt(r)``)."""
  return float(s) * (math.sqrt(rank) if use_rslora else rank)


def peft_scale(lora_alpha: float, rank: int, use_rslora: bool) -> float:
  """PEFT's scale: ``lora_alpha / r`` (rsLoRA ``lora_alpha / sqrt(r)``)."""
  return float(lora_alpha) / (math.sqrt(rank) if use_rslora else rank)


def _peft_model(model_kind: str) -> PeftModel:
  if model_kind not in PEFT_MODELS:
    raise ValueError(f"model.kind={model_kind!r} has no PEFT export; supported: {sorted(PEFT_MODELS)}.")
  return PEFT_MODELS[model_kind]


def _names(adapter: Adapter) -> dict[str, str]:
  """``{our module path: HF module name}``; refuses modules the base checkpoint lacks."""
  out = {}
  for path in adapter.modules:
    name = export_lib.hf_module_name(adapter.model_kind, path)
    if name is None:
      raise ValueError(f"module {path!r} has no Hugging Face name in a {adapter.model_kind} checkpoint; "
                       "export it merged in Adapter.extra (hetlora.export.workdir_adapter does so for "
                       "the classifier head), or set config.lora.pattern to leave it out.")
    out[path] = name
  return out


def state_dict(adapter: Adapter) -> dict[str, np.ndarray]:
  """The PEFT tensors: ``lora_A.weight: float32[r_m, d_in]``, ``lora_B.weight: float32[d_out, r_m]``,
  and the :func:`saved_modules` under ``base_model.model.``."""
  export_lib.check(adapter)
  out = {}
  for path, name in _names(adapter).items():
    r, mod = int(adapter.ranks[path]), adapter.modules[path]
    out[PREFIX + name + SUFFIX_A] = np.ascontiguousarray(np.asarray(mod["a"], np.float32)[:, :r].T)
    out[PREFIX + name + SUFFIX_B] = np.ascontiguousarray(np.asarray(mod["b"], np.float32)[:r, :].T)
  out.update({PREFIX + key: value for key, value in saved_modules(adapter).items()})
  return out


def saved_modules(adapter: Adapter) -> dict[str, np.ndarray]:
  """``Adapter.extra`` as PEFT's ``modules_to_save`` state: ``path/kernel: [d_in, d_out]`` ->
  ``<module>.weight: [d_out, d_in]``, ``path/bias`` -> ``<module>.bias`` (``<module>``: the path
  with ``'.'`` for ``'/'``)."""
  out = {}
  for path, value in sorted(adapter.extra.items()):
    leaf = path.rsplit("/", 1)[1]
    value = np.asarray(value, np.float32)
    name = _saved_module(path) + "." + ("weight" if leaf == "kernel" else leaf)
    out[name] = np.ascontiguousarray(value.T if leaf == "kernel" else value)
  return out


def _saved_module(path: str) -> str:
  """The PEFT module name of an ``Adapter.extra`` parameter: ``'classifier/kernel'`` -> ``'classifier'``."""
  return path.rsplit("/", 1)[0].replace("/", ".")


def adapter_config(adapter: Adapter) -> dict[str, Any]:
  """``adapter_config.json``: ``r`` is the most common rank; other ranks and alphas are patterns.

  Keys of ``rank_pattern`` / ``alpha_pattern`` are full HF module names, as
  are ``target_modules`` (a leaf such as ``output.dense`` would be ambiguous).
  """
  export_lib.check(adapter)
  names = _names(adapter)
  rslora = adapter.scale_rule == "rslora"
  ranks = {names[p]: int(r) for p, r in adapter.ranks.items()}
  alphas = {names[p]: peft_alpha(adapter.scales[p], adapter.ranks[p], rslora) for p in names}
  counts = collections.Counter(ranks.values())
  r = max(counts, key=lambda k: (counts[k], k))
  with_r = [alphas[n] for n in sorted(ranks) if ranks[n] == r]
  lora_alpha = collections.Counter(with_r).most_common(1)[0][0]
  return {
      "peft_type": "LORA",
      "task_type": _peft_model(adapter.model_kind).task_type,
      "base_model_name_or_path": adapter.model_name,
      "r": r,
      "lora_alpha": lora_alpha,
      "use_rslora": rslora,
      "rank_pattern": {n: k for n, k in sorted(ranks.items()) if k != r},
      "alpha_pattern": {n: v for n, v in sorted(alphas.items()) if v != lora_alpha},
      "target_modules": sorted(ranks),
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "modules_to_save": sorted({_saved_module(p) for p in adapter.extra}) or None,
      "init_lora_weights": True,
      "inference_mode": True,
  }


def export(adapter: Adapter, out_dir: str | os.PathLike) -> list[Path]:
  """Writes ``adapter_model.safetensors`` and ``adapter_config.json``.

  Raises:
    ValueError: a module of rank 0 or above ``r_max``, a bad shape or scale, or
      a module the base checkpoint has no name for (the message names it).
  """
  tensors, config = state_dict(adapter), adapter_config(adapter)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = [out / ADAPTER_FILE, out / CONFIG_FILE]
  save_file(tensors, str(written[0]), metadata={"format": "pt"})
  written[1].write_text(json.dumps(config, indent=2) + "\n")
  return written


# --- import -----------------------------------------------------------------------------------------


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
  """PEFT's lookup (``peft.utils.other.get_pattern_key``): the first key ``k`` with
  ``re.match(rf"(.*\\.)?({k})$", name)``, else ``default``."""
  for key, value in pattern.items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


def read(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``(adapter_config, tensors)`` of a PEFT LoRA directory, checked for what we can import."""
  directory = Path(directory)
  cfg_path, weights = directory / CONFIG_FILE, directory / ADAPTER_FILE
  for path in (cfg_path, weights):
    if not path.is_file():
      raise FileNotFoundError(f"{path} is missing: a PEFT LoRA directory holds {CONFIG_FILE} and "
                              f"{ADAPTER_FILE} (PeftModel.save_pretrained writes both).")
  try:
    config = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_path} is not valid JSON: {e}") from None
  unsupported = {"peft_type": ("LORA", config.get("peft_type")),
                 "bias": ("none", config.get("bias", "none")),
                 "fan_in_fan_out": (False, bool(config.get("fan_in_fan_out", False))),
                 "use_dora": (False, bool(config.get("use_dora", False)))}
  for field, (want, got) in unsupported.items():
    if got != want:
      raise ValueError(f"{cfg_path}: {field}={got!r} cannot be imported (only {field}={want!r}).")
  return config, bert_loading.read_safetensors(weights)   # F32/F16/BF16 as numpy


def import_peft(directory: str | os.PathLike, like_lora: Mapping[str, Any], model_kind: str,
                scale: float = 1.0) -> tuple[dict[str, Any], dict[str, int]]:
  """A PEFT LoRA adapter (HF module names) as our tree shaped like ``like_lora``.

  The result computes PEFT's update under our scale ``scale``:
  ``scale * a[:, :r] @ b[:r] == s_P * A^T B^T`` (``a = A^T s_P / scale``,
  ``b = B^T``), slots ``>= r`` zero. Modules of ``like_lora`` the adapter does
  not hold keep their values from ``like_lora`` (a fresh init adds nothing).

  Args:
    directory: a PEFT LoRA directory.
    like_lora: our tree ``{'a': [d_in, r_max], 'b': [r_max, d_out]}`` per module.
    model_kind: ``config.model.kind`` (picks the HF name table).
    scale: the scale our model applies to the result (e.g. the run's scale at ``r_max``).

  Returns:
    ``(lora, ranks)``: the tree (dtype of ``like_lora``) and ``{module path: r}`` of the imported modules.

  Raises:
    ValueError / FileNotFoundError: naming the file, module or field at fault.
  """
  config, tensors = read(directory)
  like = lora_lib.modules(like_lora)
  r_max = lora_lib.r_max_of(like_lora)
  rslora = bool(config.get("use_rslora", False))
  found: dict[str, dict[str, np.ndarray]] = {}
  saved = tuple(PREFIX + m + "." for m in config.get("modules_to_save") or ())
  skipped = sorted(key for key in tensors if key.startswith(saved))
  if skipped:
    logging.warning("%s: the modules_to_save tensors %s (e.g. a classifier head) are not imported: the run "
                    "draws its head from its seed and trains it as config.model.head says.", directory, skipped)
  for key, value in tensors.items():
    if key in skipped:
      continue
    if not key.startswith(PREFIX) or not key.endswith((SUFFIX_A, SUFFIX_B)):
      raise ValueError(f"{directory}/{ADAPTER_FILE}: tensor {key!r} is not a LoRA factor "
                       f"({PREFIX}<module>{SUFFIX_A} / {SUFFIX_B}) nor of a module in modules_to_save; "
                       "only plain LoRA adapters import.")
    name, part = key[len(PREFIX):-len(SUFFIX_A)], key[-len(SUFFIX_A):]
    found.setdefault(name, {})["a" if part == SUFFIX_A else "b"] = np.asarray(value, np.float32)
  flat = {p: dict(m) for p, m in like.items()}
  ranks = {}
  for name, pair in sorted(found.items()):
    path = export_lib.flax_module_path(model_kind, name)
    if path is None or path not in like:
      raise ValueError(f"{directory}: module {name!r} is not one the run adapts (our path {path!r}); set "
                       f"config.lora.pattern to select it, or drop it from the adapter. The run adapts "
                       f"{sorted(like)[:8]}...")
    if set(pair) != {"a", "b"}:
      raise ValueError(f"{directory}: module {name!r} lacks lora_{'B' if 'a' in pair else 'A'}.weight.")
    a_t, b_t = pair["a"], pair["b"]
    r = a_t.shape[0]
    d_in, d_out = like[path]["a"].shape[0], like[path]["b"].shape[1]
    if a_t.shape != (r, d_in) or b_t.shape != (d_out, r):
      raise ValueError(f"{directory}: module {name!r} has lora_A{list(a_t.shape)}, lora_B{list(b_t.shape)}; "
                       f"our {path} needs lora_A[r, {d_in}], lora_B[{d_out}, r]. The adapter must be "
                       "for the base model of config.model.name: set it to that model.")
    r_cfg = int(_pattern_value(config.get("rank_pattern") or {}, name, config.get("r", r)))
    if r_cfg != r:
      raise ValueError(f"{directory}: module {name!r} has rank {r} in its tensors but {r_cfg} in "
                       f"{CONFIG_FILE} (r / rank_pattern).")
    if not 1 <= r <= r_max:
      raise ValueError(f"{directory}: module {name!r} has rank {r}, above the run's r_max={r_max}; set "
                       f"config.lora.r_max >= {r}.")
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
    ratio = peft_scale(alpha, r, rslora) / float(scale)
    dtype = like[path]["a"].dtype
    a = np.zeros((d_in, r_max), np.float32)
    b = np.zeros((r_max, d_out), np.float32)
    a[:, :r], b[:r] = a_t.T * ratio, b_t.T
    flat[path] = {"a": a.astype(dtype), "b": b.astype(dtype)}
    ranks[path] = r
  tree = traverse_util.unflatten_dict(
      {f"{p}/{k}": v for p, m in flat.items() for k, v in m.items()}, sep="/")
  return tree, ranks


def initial_adapter(config, like_lora: Mapping[str, Any]) -> dict[str, Any]:
  """``config.lora.init_from`` as a run's starting global adapter (``hetlora.experiment.build``).

  The run evaluates its global adapter at ``s = scale(r_max)`` of its own
  ``config.lora.scale_rule`` and ``alpha``, so the imported factors are
  rescaled to give PEFT's update there (:func:`import_peft` with that ``s``).
  FlexLoRA's server adapter is scale 1 instead: its start is off by ``s``.

  Raises:
    ValueError / FileNotFoundError: prefixed with ``config.lora.init_from=...``.
  """
  r_max, path = int(config.lora.r_max), config.lora.init_from
  s = float(lora_lib.scale(r_max, config.lora.alpha, config.lora.scale_rule, r_max))
  try:
    lora, _ = import_peft(path, like_lora, config.model.kind, scale=s)
  except (FileNotFoundError, ValueError) as e:
    raise type(e)(f"config.lora.init_from={str(path)!r}: {e}") from None
  return jax.tree.map(jnp.asarray, lora)
