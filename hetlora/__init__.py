"""hetlora: federated fine-tuning with heterogeneous-rank LoRA in JAX.

Curated public API; submodules hold the rest:

- :mod:`hetlora.lora` (LoRA trees), :mod:`hetlora.aggregation` (shared jitted primitives),
- :mod:`hetlora.methods` (one module per method: ``hetlora.methods.hetlora``, ...),
- :mod:`hetlora.client` (local training), :mod:`hetlora.server` (the round), :mod:`hetlora.ranks`,
  :mod:`hetlora.dense` (base parameters clients train in full, e.g. a classifier head),
- :mod:`hetlora.models`, :mod:`hetlora.data`, :mod:`hetlora.experiment`, :mod:`hetlora.trainer`.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# Attributes resolved on first use (PEP 562), so that importing one submodule (e.g. the Flower
# ClientApp that only relays to a site worker) does not import JAX and every other module.
_SUBMODULES = ("aggregation", "client", "dense", "lora", "methods", "ranks", "server")
_NAMES = {"LocalSpec": "client", "local_train": "client", "sequential_backend": "client",
          "vmap_backend": "client", "fold_scale": "lora", "truncate": "lora", "Local": "methods",
          "Method": "methods", "ServerState": "server", "make_round": "server", "sample_cohort": "server"}

__all__ = sorted((*_SUBMODULES, *_NAMES))


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"hetlora.{name}")
  if name in _NAMES:
    return getattr(importlib.import_module(f"hetlora.{_NAMES[name]}"), name)
  raise AttributeError(f"module 'hetlora' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted({*globals(), *__all__})
