"""Models, specs and synthetic cohorts shared by the benchmarks.

``setup(name, r_max)`` returns a :class:`Setup` for ``'tiny'`` (an MLP
classifier, ``x: [B, 128] -> 10`` classes, LoRA on every kernel) or
``'minilm'`` (all-MiniLM-L6-v2 as a 77-way classifier, LoRA on attention
query/value and the classifier head). ``Setup.cohort(K, steps, B, seed)``
draws a synthetic round ``data = {'batch': [K, steps, B, ...], 'mask':
[K, steps, B]}`` (every example real).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common  # noqa: F401  (puts the checkout on sys.path)
from hetlora import client as client_lib
from hetlora import lora as lora_lib

MINILM = "all-minilm-l6-v2"
MINILM_PATTERN = r"(attention/(query|value)|classifier)/kernel$"


@dataclasses.dataclass(frozen=True)
class Setup:
  name: str
  spec: client_lib.LocalSpec
  base: Any
  global_lora: Any
  make_batch: Callable[[np.random.Generator, tuple[int, ...]], dict[str, np.ndarray]]

  def cohort(self, k: int, steps: int, batch: int, seed: int = 0) -> dict[str, Any]:
    """Synthetic ``{'batch': [K, steps, B, ...], 'mask': float32[K, steps, B]}``."""
    rng = np.random.default_rng(seed)
    return {"batch": self.make_batch(rng, (k, steps, batch)),
            "mask": np.ones((k, steps, batch), np.float32)}


def ranks(k: int, r_min: int, r_max: int, seed: int = 0) -> jax.Array:
  """``int32[K]`` ranks drawn uniformly from ``[r_min, r_max]``."""
  return jnp.asarray(np.random.default_rng(seed).integers(r_min, r_max + 1, size=k), jnp.int32)


def tiny(r_max: int, d_in: int = 128, hidden: tuple[int, ...] = (256, 256), classes: int = 10) -> Setup:
  from hetlora.models import tiny as tiny_lib
  model = tiny_lib.MLPClassifier(hidden=hidden, num_classes=classes)
  base = tiny_lib.init_params(model, jax.random.key(0), d_in)
  spec = client_lib.LocalSpec(loss_fn=tiny_lib.classification_loss(model),
                              optimizer=optax.adamw(1e-3, weight_decay=0.0), alpha=2.0 * r_max,
                              scale_rule="alpha/r_max")
  glob = lora_lib.init(jax.random.key(1), base, r"kernel$", r_max)

  def make_batch(rng, shape):
    return {"x": rng.standard_normal(shape + (d_in,)).astype(np.float32),
            "label": rng.integers(0, classes, shape).astype(np.int32)}

  return Setup("tiny", spec, base, glob, make_batch)


def minilm(r_max: int, seq_len: int = 64, num_labels: int = 77, lr: float = 5e-4,
           alpha: float = 32.0, dtype: str = "float32") -> Setup:
  """all-MiniLM-L6-v2 classifier; scale ``alpha / r_max`` for every client (the peer's default).

  ``dtype``: the compute dtype (``model.dtype``), ``'float32'`` or ``'bfloat16'``.
  """
  from hetlora.models import bert, bert_loading, provider, tasks
  cfg, enc = bert_loading.load_bert(MINILM)
  base = {**enc, **bert.init_head(jax.random.key(0), cfg, num_labels)}
  model = bert.BertClassifier(cfg, num_labels=num_labels, dtype=provider.DTYPES[dtype])
  spec = client_lib.LocalSpec(loss_fn=tasks.classification_loss(model),
                              optimizer=optax.adamw(lr, weight_decay=0.0), alpha=alpha,
                              scale_rule="alpha/r_max")
  glob = lora_lib.init(jax.random.key(1), base, MINILM_PATTERN, r_max)

  def make_batch(rng, shape):
    return {"input_ids": rng.integers(1000, cfg.vocab_size, shape + (seq_len,)).astype(np.int32),
            "attention_mask": np.ones(shape + (seq_len,), np.int32),
            "token_type_ids": np.zeros(shape + (seq_len,), np.int32),
            "label": rng.integers(0, num_labels, shape).astype(np.int32)}

  return Setup("minilm", spec, base, glob, make_batch)


def setup(name: str, r_max: int, **kwargs) -> Setup:
  if name == "tiny":
    return tiny(r_max, **kwargs)
  if name == "minilm":
    return minilm(r_max, **kwargs)
  raise ValueError(f"--model must be 'tiny' or 'minilm', got {name!r}.")
