"""Assigning client ranks: the system heterogeneity of a federation.

``assign(num_clients, seed, ...)`` returns ``int32[N]`` ranks, a pure function
of its arguments. Distributions over a set of allowed ranks (``choices``, e.g.
``(1, 2, 4, 8, 16, 32)`` as in LoRA-A², Koo et al. 2025), or over every
integer in ``[r_min, r_max]`` when ``choices`` is empty:

- ``uniform``: each allowed rank equally likely (HetLoRA's setting);
- ``heavy_tail``: probability proportional to ``1 / 2^i`` for the i-th
  smallest rank (most clients are weak);
- ``normal``: a discretised normal centred on the middle rank (most clients
  are average);
- ``constant``: every client gets ``r_max`` (homogeneous LoRA at r_max), or
  use ``r_min == r_max``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DISTRIBUTIONS = ("uniform", "heavy_tail", "normal", "constant")


def allowed(r_min: int, r_max: int, choices: Sequence[int] = ()) -> np.ndarray:
  """The sorted allowed ranks, validated against ``[r_min, r_max]``."""
  if r_min < 1 or r_min > r_max:
    raise ValueError(f"lora.r_min={r_min} must satisfy 1 <= r_min <= lora.r_max={r_max}; set config.lora.r_min and config.lora.r_max.")
  values = np.arange(r_min, r_max + 1) if len(choices) == 0 else np.unique(np.asarray(choices))
  bad = values[(values < r_min) | (values > r_max)]
  if bad.size:
    raise ValueError(f"lora.rank_choices {list(map(int, bad))} fall outside [r_min={r_min}, r_max={r_max}]; "
                     "set config.lora.rank_choices inside it or widen config.lora.r_min / config.lora.r_max.")
  return values.astype(np.int32)


def probabilities(values: np.ndarray, distribution: str) -> np.ndarray:
  """Probability of each allowed rank under ``distribution``."""
  n = len(values)
  if distribution == "uniform":
    p = np.ones(n)
  elif distribution == "heavy_tail":
    p = 0.5 ** np.arange(n)
  elif distribution == "normal":
    x = np.arange(n) - (n - 1) / 2
    p = np.exp(-0.5 * (x / max(n / 4, 0.5)) ** 2)
  elif distribution == "constant":
    p = np.zeros(n)
    p[-1] = 1.0
  else:
    raise ValueError(f"lora.rank_distribution {distribution!r} is unknown; set config.lora.rank_distribution to one of {DISTRIBUTIONS}.")
  return p / p.sum()


def assign(num_clients: int, seed: int, r_min: int, r_max: int, choices: Sequence[int] = (),
           distribution: str = "uniform") -> np.ndarray:
  """``int32[num_clients]`` ranks drawn i.i.d. from ``distribution`` over the allowed ranks."""
  values = allowed(r_min, r_max, choices)
  rng = np.random.default_rng([seed, 0x52414E4B])
  return rng.choice(values, size=num_clients, p=probabilities(values, distribution)).astype(np.int32)
