"""Exporting a trained global adapter to the formats deployment tools load.

One format per module (``hetlora.export.<format>``), each with
``export(adapter: Adapter, out_dir) -> list[Path]``; ``launch/export.py``
picks the module by ``--format``.

An :class:`Adapter` is format-neutral: the unscaled factors of one model,
how many rank slots of each module to write, and the scale ``s`` that makes
the update of module ``m``::

    dW_m = s_m * a_m[:, :r_m] @ b_m[:r_m, :]        a_m: [d_in, r_max], b_m: [r_max, d_out]

so every format converts ``s_m`` into its own convention (PEFT's
``lora_alpha / r`` or ``lora_alpha / sqrt(r)``, llama.cpp's ``alpha / r``).

:func:`hetlora.export.workdir_adapter.from_workdir` builds the adapter of a
trained run (an all-zero module is written at rank 1 with zero factors);
:func:`hf_module_name` / :func:`flax_module_path` name modules as the model
kind's Hugging Face checkpoint does (the loaders' own tables); :func:`check`
refuses ranks outside ``[1, r_max]``. ``docs/export.md`` has the commands.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A global adapter ready to export.

  Attributes:
    modules: ``{'flax/module/path': {'a': float32[d_in, r_max], 'b': float32[r_max, d_out]}}``
      (numpy, unscaled: the scale lives in ``scales``), in the layout of
      :func:`hetlora.lora.modules`.
    ranks: ``{'flax/module/path': r_m}``, the rank slots written per module
      (``1 <= r_m <= r_max``).
    scales: ``{'flax/module/path': s_m}``, see the module docstring.
    scale_rule: the run's ``config.lora.scale_rule`` (``'alpha/r'``,
      ``'alpha/r_max'`` or ``'rslora'``).
    alpha: the run's ``config.lora.alpha``.
    r_max: the run's ``config.lora.r_max``.
    model_kind: ``config.model.kind`` (``'bert_classifier'``, ``'llama_lm'``).
    model_name: the base model as the run resolved it (a directory or a
      GGUF file).
    extra: other tensors the deployment needs beside the factors (e.g. a
      trained classifier head), ``{'flax/param/path': np.ndarray}``.
  """
  modules: Mapping[str, Mapping[str, np.ndarray]]
  ranks: Mapping[str, int]
  scales: Mapping[str, float]
  scale_rule: str
  alpha: float
  r_max: int
  model_kind: str
  model_name: str
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


FORMATS = ("peft", "gguf")


def _name_maps(model_kind: str):
  """The loader module that owns ``model_kind``'s Hugging Face names (one table, both ways)."""
  from hetlora.models import bert_loading, gguf_loading   # the loaders own the HF <-> Flax tables
  maps = {"bert_classifier": bert_loading, "llama_lm": gguf_loading}
  if model_kind not in maps:
    raise ValueError(f"model.kind={model_kind!r} has no Hugging Face module names to export under; "
                     f"supported: {sorted(maps)} (add hf_module_name / flax_module_path beside the "
                     "kind's loader and list it in hetlora.export._name_maps).")
  return maps[model_kind]


def hf_module_name(model_kind: str, path: str) -> str | None:
  """The Hugging Face module of our linear module ``path`` (``None``: the checkpoint lacks it).

  Example:
    >>> hf_module_name('bert_classifier', 'encoder/layer_0/attention/query')
    'encoder.layer.0.attention.self.query'
    >>> hf_module_name('llama_lm', 'layers_1/mlp/down_proj')
    'model.layers.1.mlp.down_proj'
  """
  return _name_maps(model_kind).hf_module_name(path)


def flax_module_path(model_kind: str, name: str) -> str | None:
  """The inverse of :func:`hf_module_name` (``None`` for names our model does not have)."""
  return _name_maps(model_kind).flax_module_path(name)


def check(adapter: Adapter) -> None:
  """Raises ``ValueError`` naming the module whose rank, shape or scale cannot be exported.

  Every module needs ``a: [d_in, r_max]``, ``b: [r_max, d_out]``, a rank in
  ``[1, r_max]`` and a finite scale ``> 0``.
  """
  if set(adapter.ranks) != set(adapter.modules) or set(adapter.scales) != set(adapter.modules):
    raise ValueError("Adapter.ranks and Adapter.scales must name exactly the modules of Adapter.modules; "
                     f"differences: {sorted(set(adapter.ranks) ^ set(adapter.modules))}, "
                     f"{sorted(set(adapter.scales) ^ set(adapter.modules))}.")
  if not adapter.modules:
    raise ValueError("the adapter has no LoRA module to export: config.lora.pattern selected only "
                     "modules the base checkpoint lacks (e.g. the classifier head); set it to select "
                     "some of the encoder's or decoder's projections.")
  for path, mod in adapter.modules.items():
    a, b, r = np.asarray(mod["a"]), np.asarray(mod["b"]), adapter.ranks[path]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != adapter.r_max or b.shape[0] != adapter.r_max:
      raise ValueError(f"module {path!r}: factors a{list(a.shape)}, b{list(b.shape)} are not "
                       f"a[d_in, r_max={adapter.r_max}], b[r_max, d_out].")
    if not 1 <= int(r) <= adapter.r_max:
      raise ValueError(f"module {path!r}: rank {r} is outside [1, r_max={adapter.r_max}]; a PEFT or "
                       "GGUF adapter needs every module's rank in that range (an all-zero module is "
                       "written at rank 1).")
    s = float(adapter.scales[path])
    if not np.isfinite(s) or s <= 0:
      raise ValueError(f"module {path!r}: scale {s} must be finite and > 0.")
