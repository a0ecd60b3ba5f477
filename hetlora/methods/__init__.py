"""Every federated LoRA method, one module each, looked up by module name.

===============  ==============================================================
module           method
===============  ==============================================================
``hetlora``      HetLoRA (Cho et al., EMNLP 2024): truncation, rank self-pruning,
                 sparsity-weighted aggregation
``zero_pad``     zero-padding: HetLoRA without self-pruning and sparsity weights
``homlora``      HomLoRA: FedAvg of the factors, one rank for every client (FedIT)
``helora_pad``   HeLoRA-Pad (Fan et al., ACM TOIT 2025)
``helora_kd``    HeLoRA-KD (Fan et al., ACM TOIT 2025): rank groups, mutual distillation
``flexlora``     FlexLoRA (Bai et al., NeurIPS 2024)
``flora``        FLoRA (Wang et al., NeurIPS 2024)
``ffa_lora``     FFA-LoRA (Sun et al., ICLR 2024)
===============  ==============================================================

Each module exposes ``aggregate(lora, ranks, num_examples, scales)`` (jitted,
importable alone) and ``make(**options) -> Method`` (see
:mod:`hetlora.methods.base`). Nothing is registered at import time: a new
method is a new module here.

Example:
  >>> names()[:3]
  ['ffa_lora', 'flexlora', 'flora']
  >>> get('helora_pad', padding='mean').name
  'helora_pad'
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import Any, Mapping

from hetlora.methods.base import Local, Method, Run

__all__ = ["Local", "Method", "Run", "build", "get", "module", "names"]

_NOT_METHODS = frozenset({"base"})


def names() -> list[str]:
  """The method module names, sorted."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_METHODS)


def module(name: str) -> ModuleType:
  """The module ``hetlora.methods.<name>``; a clear error for unknown names."""
  if name not in names():
    raise ValueError(f"method.name={name!r} is unknown; choose one of {names()}.")
  return importlib.import_module(f"{__name__}.{name}")


def get(name: str, **options) -> Method:
  """The method ``name`` with ``options`` bound (its module's ``make``).

  Unknown options raise a ``ValueError`` listing the ones ``make`` takes.
  """
  make = module(name).make
  allowed = sorted(inspect.signature(make).parameters)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"method.kwargs {unknown} are not options of method {name!r}; "
                     f"set method.kwargs to options among {allowed}.")
  return make(**options)


def build(name: str, run: Run, options: Mapping[str, Any] | None = None) -> Method:
  """The method for a run: its ``run_options(run)`` updated by the user's ``options``."""
  derive = getattr(module(name), "run_options", None)
  derived = derive(run) if derive is not None else {}
  return get(name, **{**derived, **dict(options or {})})
