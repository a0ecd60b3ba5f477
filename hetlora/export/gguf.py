"""A GGUF LoRA adapter that llama.cpp applies on top of the base model's GGUF.

The format is the one llama.cpp's ``convert_lora_to_gguf.py`` writes and
``src/llama-adapter.cpp`` reads:

- metadata ``general.type = 'adapter'``, ``general.architecture`` = the base
  model's (``'llama'`` for Llama/SmolLM2/Mistral, ``'qwen2'``; llama.cpp
  refuses a mismatch), ``adapter.type = 'lora'``, ``adapter.lora.alpha``
  (float32);
- per adapted weight ``W`` (GGUF name, e.g. ``blk.3.attn_q.weight``) two
  float32 tensors ``W.lora_a`` (numpy ``[r_m, d_in]``, ggml ``ne = [d_in, r_m]``)
  and ``W.lora_b`` (numpy ``[d_out, r_m]``, ggml ``ne = [r_m, d_out]``): ggml
  lists dims innermost first, the reverse of numpy.

llama.cpp adds ``(alpha / r_m) * lora_b @ lora_a @ x`` to ``W @ x``, with
``r_m`` the width of that tensor pair and one ``alpha`` for the file. Our
update is ``dW_m = s_m * a_m[:, :r_m] @ b_m[:r_m]`` with a per-module scale
``s_m`` (see :mod:`hetlora.export`), so each module's factor ``c_m = s_m r_m / alpha``
is folded into ``lora_a``::

    lora_a = c_m * a_m[:, :r_m].T        lora_b = P(b_m[:r_m].T)

``c_m = 1`` under ``scale_rule='alpha/r'`` (the factors are written as
trained); ``'alpha/r_max'`` gives ``r_m / r_max``, ``'rslora'`` ``sqrt(r_m)``.
``P`` is llama.cpp's Q/K row order (:func:`hetlora.models.gguf_loading.permute_qk`,
the converter's ``permute``) for ``attn_q`` / ``attn_k`` of a ``'llama'``
base, the identity otherwise: our kernels are in Hugging Face order.

An untied head's LoRA (module ``lm_head``) is written on ``output.weight``
(``lora_a: [r_m, d_model]``, ``lora_b: [vocab, r_m]``); llama.cpp applies it
through ``build_lora_mm(model.output, ...)`` like any projection
(``benchmarks/llamacpp_roundtrip.py --model untied``). A tied base has no
``output.weight``; llama.cpp would reject the whole file, so export refuses
an ``lm_head`` module there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

from hetlora.export import Adapter
from hetlora.models import files, gguf_loading

FILE_NAME = "adapter.gguf"
MODEL_KIND = "llama_lm"
# Hugging Face model_type -> the GGUF architecture llama.cpp's converter gives it.
HF_TO_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
PERMUTED_ARCHS = ("llama",)


@dataclasses.dataclass(frozen=True)
class BaseFacts:
  """What the adapter file depends on in the base model.

  Attributes:
    arch: GGUF ``general.architecture`` of the base (``'llama'``, ``'qwen2'``).
    n_layers: decoder layers.
    n_heads: query heads.
    n_kv_heads: key/value heads.
    tied_head: the LM head is the token embedding (no ``output.weight`` in the GGUF,
      ``tie_word_embeddings`` in a Hugging Face config): llama.cpp then has no weight
      an ``lm_head`` LoRA could adapt.
  """
  arch: str
  n_layers: int
  n_heads: int
  n_kv_heads: int
  tied_head: bool = False


def base_facts(model_name: str | os.PathLike) -> BaseFacts:
  """:class:`BaseFacts` of a base GGUF file, Hugging Face directory or known name (``files.resolve``).

  Raises:
    FileNotFoundError: ``model_name`` is neither.
    ValueError: an architecture llama.cpp adapters are not written for here.
  """
  path = files.resolve(model_name)
  if path.is_dir():
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
      raise FileNotFoundError(f"adapter base model {str(path)!r} has no config.json; pass the "
                              "Hugging Face directory or the .gguf file the run trained on.")
    hf = json.loads(cfg_path.read_text())
    cfg = gguf_loading.config_from_hf(hf, str(path))
    arch = HF_TO_GGUF_ARCH.get(hf["model_type"])
    if arch is None:
      raise ValueError(f"base model {str(path)!r}: model_type {hf['model_type']!r} has no llama.cpp "
                       f"architecture here; supported: {sorted(HF_TO_GGUF_ARCH)}.")
    return BaseFacts(arch, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings)
  if path.suffix != ".gguf":
    raise FileNotFoundError(f"adapter base model {str(path)!r} is neither a .gguf file nor a Hugging "
                            "Face directory; set Adapter.model_name to the model the run loaded.")
  reader = gguf_loading.open_gguf(path)
  meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
  arch = meta.get("general.architecture")
  if arch not in gguf_loading.GGUF_ARCHS:
    raise ValueError(f"base GGUF {str(path)!r}: architecture {arch!r} is not supported; "
                     f"supported: {gguf_loading.GGUF_ARCHS}.")
  n_heads = int(meta[f"{arch}.attention.head_count"])
  return BaseFacts(arch, int(meta[f"{arch}.block_count"]), n_heads,
                   int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
                   tied_head=not any(t.name == "output.weight" for t in reader.tensors))


def _check(adapter: Adapter) -> None:
  """Refuses an adapter this format cannot hold, naming the field and the fix."""
  if adapter.model_kind != MODEL_KIND:
    raise ValueError(f"GGUF adapters are written for model.kind={MODEL_KIND!r} (a Llama-family "
                     f"decoder llama.cpp runs), got {adapter.model_kind!r}; use --format peft.")
  if not (math.isfinite(adapter.alpha) and adapter.alpha > 0):
    raise ValueError(f"lora.alpha={adapter.alpha!r} must be finite and > 0 for a GGUF adapter "
                     "(llama.cpp reads alpha = 0 as 'no scaling').")
  if adapter.extra:
    raise ValueError(f"GGUF LoRA adapters hold only LoRA factors; Adapter.extra has "
                     f"{sorted(adapter.extra)}; export those with another format.")
  if not adapter.modules:
    raise ValueError("the adapter has no modules; nothing to export.")
  for path, mod in adapter.modules.items():
    if path not in adapter.ranks or path not in adapter.scales:
      raise ValueError(f"module {path!r} lacks an entry in Adapter.ranks or Adapter.scales.")
    a, b = np.asarray(mod["a"]), np.asarray(mod["b"])
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != adapter.r_max or b.shape[0] != adapter.r_max:
      raise ValueError(f"module {path!r}: factors a{a.shape}, b{b.shape} must be a: [d_in, r_max], "
                       f"b: [r_max, d_out] with r_max={adapter.r_max}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
      raise ValueError(f"module {path!r}: its factors hold NaN or inf; export a finite checkpoint.")
    r = adapter.ranks[path]
    if not 1 <= int(r) <= adapter.r_max or int(r) != r:
      raise ValueError(f"module {path!r}: rank {r!r} must be an integer in [1, r_max={adapter.r_max}]; "
                       "a rank-0 module has no update: drop it from Adapter.modules.")
    if not math.isfinite(adapter.scales[path]):
      raise ValueError(f"module {path!r}: scale {adapter.scales[path]!r} is not finite.")


def lora_tensors(adapter: Adapter, base: BaseFacts) -> dict[str, np.ndarray]:
  """The ``{gguf_name.lora_a / .lora_b: float32 array}`` of ``adapter`` (numpy order).

  Args:
    adapter: a checked adapter (see :func:`export`).
    base: the base model's facts (:func:`base_facts`).

  Returns:
    ``W.lora_a: [r_m, d_in]`` (with ``c_m`` folded in) and ``W.lora_b: [d_out, r_m]``
    (Q/K rows in llama.cpp order) per module, in ``adapter.modules`` order.
  """
  out = {}
  for path, mod in adapter.modules.items():
    try:
      name = gguf_loading.gguf_weight_name(path)
    except KeyError as e:
      raise ValueError(f"GGUF adapter: {e.args[0]}") from None
    if name.startswith("blk."):
      layer = int(name.split(".")[1])
      if layer >= base.n_layers:
        raise ValueError(f"module {path!r}: the base model has {base.n_layers} layers; wrong base model?")
    if name == "output.weight" and base.tied_head:
      raise ValueError(f"module {path!r}: the base model ties its LM head to the token embedding, so its "
                       "GGUF has no output.weight; llama.cpp rejects the whole adapter ('LoRA tensor "
                       "output.weight does not exist in base model') and our tied model never reads an "
                       "lm_head LoRA. Drop 'lm_head' from Adapter.modules, or export against the untied "
                       "base the run trained on.")
    r = int(adapter.ranks[path])
    c = float(adapter.scales[path]) * r / float(adapter.alpha)
    lora_a = c * np.asarray(mod["a"], np.float64)[:, :r].T                 # [r, d_in]
    lora_b = np.asarray(mod["b"], np.float64)[:r].T                        # [d_out, r]
    heads = {"attn_q": base.n_heads, "attn_k": base.n_kv_heads}.get(name.split(".")[-2])
    if heads and base.arch in PERMUTED_ARCHS:
      if lora_b.shape[0] % (2 * heads):
        raise ValueError(f"module {path!r}: d_out={lora_b.shape[0]} is not {heads} heads of even "
                         "width; wrong base model?")
      lora_b = gguf_loading.permute_qk(lora_b, heads)
    out[f"{name}.lora_a"] = np.ascontiguousarray(lora_a, np.float32)
    out[f"{name}.lora_b"] = np.ascontiguousarray(lora_b, np.float32)
  return out


def export(adapter: Adapter, out_dir: str | os.PathLike) -> list[Path]:
  """Writes ``out_dir/adapter.gguf``, a llama.cpp LoRA adapter (float32 factors).

  Use it with the base model's GGUF, e.g. ``llama-cli -m SmolLM2-135M-Instruct.Q4_1.gguf
  --lora adapter.gguf`` or ``llama_cpp.Llama(model_path=..., lora_path=...)``.

  Args:
    adapter: a ``model_kind='llama_lm'`` adapter whose ``model_name`` is the base
      GGUF file or Hugging Face directory (read for the architecture and heads).
    out_dir: created if missing; an existing ``adapter.gguf`` is replaced.

  Returns:
    ``[out_dir/adapter.gguf]``.

  Raises:
    ValueError: another model kind, ``alpha <= 0``, a rank outside
      ``[1, r_max]``, malformed or non-finite factors, extra tensors, a module path that is
      no Llama projection, an ``lm_head`` module on a tied-head base, or a base model that
      does not fit.
  """
  import gguf
  _check(adapter)
  base = base_facts(adapter.model_name)
  tensors = lora_tensors(adapter, base)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / FILE_NAME
  tmp = out_dir / (FILE_NAME + ".tmp")
  writer = gguf.GGUFWriter(tmp, base.arch)
  writer.add_type(gguf.GGUFType.ADAPTER)
  writer.add_name(f"hetlora LoRA adapter of {Path(adapter.model_name).name}")
  writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
  writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapter.alpha))
  for name, value in tensors.items():
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(tmp, path)
  return [path]
