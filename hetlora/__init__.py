"""hetlora: federated fine-tuning with heterogeneous-rank LoRA in JAX.

Curated public API; submodules hold the rest:

- :mod:`hetlora.lora` (LoRA trees), :mod:`hetlora.aggregation` (shared jitted primitives),
- :mod:`hetlora.methods` (one module per method: ``hetlora.methods.hetlora``, ...),
- :mod:`hetlora.client` (local training), :mod:`hetlora.server` (the round), :mod:`hetlora.ranks`,
  :mod:`hetlora.dense` (base parameters clients train in full, e.g. a classifier head),
- :mod:`hetlora.models`, :mod:`hetlora.data`, :mod:`hetlora.experiment`, :mod:`hetlora.trainer`.
"""

from hetlora import aggregation, client, dense, lora, methods, ranks, server
from hetlora.client import LocalSpec, local_train, sequential_backend, vmap_backend
from hetlora.lora import fold_scale, truncate
from hetlora.methods import Local, Method
from hetlora.server import ServerState, make_round, sample_cohort

__version__ = "0.1.0"

__all__ = [
    "Local", "LocalSpec", "Method", "ServerState", "aggregation", "client", "dense", "fold_scale", "local_train",
    "lora", "make_round", "methods", "ranks", "sample_cohort", "sequential_backend", "server",
    "truncate", "vmap_backend",
]
