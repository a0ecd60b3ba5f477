"""hetlora: federated fine-tuning with heterogeneous-rank LoRA in JAX.

Curated public API; submodules hold the rest:

- :mod:`hetlora.lora` (LoRA trees), :mod:`hetlora.aggregation` (jitted aggregators),
- :mod:`hetlora.client` (local training), :mod:`hetlora.server` (the round),
- :mod:`hetlora.methods` (every method as a ``Method``), :mod:`hetlora.ranks`,
- :mod:`hetlora.models`, :mod:`hetlora.data`, :mod:`hetlora.trainer`.
"""

from hetlora import aggregation, client, lora, methods, ranks, server
from hetlora.aggregation import fedavg, hetlora as hetlora_aggregate, zero_pad
from hetlora.client import LocalSpec, Pruning, local_train, sequential_backend, vmap_backend
from hetlora.lora import fold_scale, truncate
from hetlora.methods import Method, get_method
from hetlora.server import ServerState, make_round, sample_cohort

__version__ = "0.1.0"

__all__ = [
    "LocalSpec", "Method", "Pruning", "ServerState", "aggregation", "client", "fedavg", "fold_scale",
    "get_method", "hetlora_aggregate", "local_train", "lora", "make_round", "methods", "ranks",
    "sample_cohort", "sequential_backend", "server", "truncate", "vmap_backend", "zero_pad",
]
