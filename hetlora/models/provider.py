"""The interface every model provider (``hetlora/models/<kind>.py``) implements.

A provider is a module, looked up by ``config.model.kind`` with
:func:`get` (``importlib.import_module(f"hetlora.models.{kind}")``, no
registry), that exposes:

- ``DEFAULT_PATTERN: str``: the default LoRA targets, a regex over
  ``'/'``-joined parameter paths (:func:`hetlora.lora.init`).
- ``HEAD_PATTERN: str`` (optional): the task head's parameters that
  ``load`` draws from ``key`` (the checkpoint lacks them), e.g.
  ``r'^classifier/(kernel|bias)$'``; ``config.model.head`` then picks how
  they train (:func:`hetlora.experiment.trainable_patterns`).
- ``TASK: str``: what its data is, ``'classification'`` (labelled examples with
  ``label_names``: a :class:`hetlora.data.TextDataset`, or a
  :class:`hetlora.data.ImageDataset` for an image model) or ``'causal_lm'`` (a
  :class:`hetlora.data.PromptDataset`).
- ``DEFAULT_NAME: str``: the model ``config.model.name`` falls back to.
- ``load(model_config, *, num_labels, key) -> Loaded``: weights, tokenizer
  and the pure functions below, from the ``config.model`` section
  (``name``: a known package model or a local path; ``max_len``;
  ``dtype``: ``'float32'`` or ``'bfloat16'``, the compute dtype; base
  parameters stay float32).

All functions of :class:`Loaded` take ``(base, lora_eff, batch)`` with
``lora_eff = hetlora.lora.fold_scale(...)`` (or ``None``/``{}``) and a batch
of the columns ``prepare`` returns, ``[B, ...]``, plus ``'mask': float[B]``
(1 for real examples) for ``eval_sums``.

Example::

    provider = provider_lib.get(config.model.kind)
    loaded = provider.load(config.model, num_labels=4, key=jax.random.key(0))
    cols = loaded.prepare(train_ds)                         # {name: [N, ...]}
    lora = hetlora.lora.init(key, loaded.base_params, provider.DEFAULT_PATTERN, r_max=8)
    loss = loaded.loss_fn(loaded.base_params, None, batch)  # float32[B]
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from types import ModuleType
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

Batch = Mapping[str, jax.Array]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TASKS = ("classification", "causal_lm")
# Known providers, named in error messages only (lookup is by module name).
KNOWN_KINDS = ("bert_classifier", "llama_lm", "vit_classifier")


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A loaded model and the pure functions a federated run needs.

  Attributes:
    base_params: the frozen weights (for a classifier, the random head too).
    loss_fn: ``(base, lora_eff, batch) -> float32[B]`` per-example loss.
    logits_fn: ``(base, lora_eff, batch) -> float32[B, C]`` class logits, or
      ``None`` for models without classes (used by HeLoRA-KD distillation).
    eval_sums: ``(base, lora_eff, batch) -> {metric: (sum, weight)}``,
      jit-able; a trainer adds both over batches and reports ``sum / weight``.
      Padded examples (``batch['mask'] == 0``) weigh nothing.
    prepare: ``(dataset, max_len=None) -> {column: np.ndarray [N, ...]}``,
      the tokenized columns ``loss_fn`` reads (``max_len`` defaults to
      ``model.max_len``), plus the flags ``truncated, empty: bool[N]``
      (:mod:`hetlora.data.tokenize`; packing leaves them out of batches).
    tokenizer: the ``tokenizers.Tokenizer`` (``None`` for image models).
    model: the Flax module.
    config: the model's own config dataclass (``BertConfig``, ``LlamaConfig``).
    generation_eval: ``generation_eval(sets, *, max_new_tokens, batch_size, max_examples,
      classification, marker, samples_per_task) -> evaluate`` for models that generate
      (``None`` for the others): ``sets: {name: PromptDataset}`` (e.g. ``'test'``,
      ``'unseen'``), and ``evaluate(base, adapters [G, ...]) -> (metrics, samples)``,
      host-side, answers their prompts and scores them (``metrics: {set: {metric: [G]}}``
      such as ``rougeL`` and ``exact_match``; ``samples``: a few prompt / reference /
      generation rows per task), :func:`hetlora.models.generation.make_evaluator`.
    choice_eval: ``choice_eval(sets, *, batch_size, max_examples, samples_per_task) -> evaluate``
      for models that score multiple-choice data by the options' log-likelihood (``None`` for
      the others): ``sets: {name: PromptDataset with choices}``, and ``evaluate(base, adapters
      [G, ...]) -> (metrics, samples)`` as for ``generation_eval``, with the metrics
      ``accuracy``, ``accuracy_norm`` (means over tasks) and ``accuracy/<task>``,
      ``accuracy_norm/<task>``, :func:`hetlora.models.multiple_choice.make_evaluator`.
  """
  base_params: Any
  loss_fn: Callable[[Any, Any, Batch], jax.Array]
  logits_fn: Callable[[Any, Any, Batch], jax.Array] | None
  eval_sums: Callable[[Any, Any, Batch], dict[str, tuple[jax.Array, jax.Array]]]
  prepare: Callable[..., dict[str, np.ndarray]]
  tokenizer: tokenizers.Tokenizer | None
  model: nn.Module
  config: Any
  generation_eval: Callable[..., Callable[[Any, Any], tuple[dict, list]]] | None = None
  choice_eval: Callable[..., Callable[[Any, Any], tuple[dict, list]]] | None = None


def get(kind: str) -> ModuleType:
  """The provider module ``hetlora.models.<kind>``, checked to implement the interface.

  Raises:
    ValueError: no such module, or it is not a provider (names ``model.kind``).
  """
  if not isinstance(kind, str) or not kind.isidentifier():
    raise ValueError(f"model.kind={kind!r} is not a module name; choose one of {KNOWN_KINDS}.")
  try:
    module = importlib.import_module(f"hetlora.models.{kind}")
  except ModuleNotFoundError as e:
    if e.name != f"hetlora.models.{kind}":
      raise
    raise ValueError(f"model.kind={kind!r} has no provider module hetlora/models/{kind}.py; "
                     f"choose one of {KNOWN_KINDS}.") from None
  missing = [a for a in ("DEFAULT_PATTERN", "TASK", "load") if not hasattr(module, a)]
  if missing:
    raise ValueError(f"model.kind={kind!r}: hetlora.models.{kind} is not a model provider "
                     f"(lacks {missing}); choose one of {KNOWN_KINDS}.")
  return module


def compute_dtype(model_config) -> Any:
  """``DTYPES[model.dtype]``, or a ``ValueError`` naming the field."""
  name = model_config.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r} must be one of {sorted(DTYPES)}.")
  return DTYPES[name]


def max_len_of(model_config, limit: int | None = None, minimum: int = 1) -> int:
  """``model.max_len`` checked to lie in ``[minimum, limit]``."""
  max_len = model_config.get("max_len")
  if not isinstance(max_len, (int, np.integer)) or max_len < minimum:
    raise ValueError(f"model.max_len={max_len!r} must be an int >= {minimum} "
                     "(tokens per example, e.g. 64).")
  if limit is not None and max_len > limit:
    raise ValueError(f"model.max_len={max_len} exceeds what the model supports ({limit} "
                     "positions); set model.max_len <= that.")
  return int(max_len)


def num_classes_of(num_labels: int | None, kind: str) -> int:
  """``num_labels`` (the data source's classes) checked to be ``>= 2`` for classifier ``kind``."""
  if num_labels is None or int(num_labels) < 2:
    raise ValueError(f"model.kind={kind!r} needs num_labels >= 2 (the data source's classes), "
                     f"got {num_labels!r}; use a classification data.source.")
  return int(num_labels)


def pooling_of(model_config, choices: tuple[str, ...]) -> str:
  """``model.pooling`` (default ``'mean'``) checked to be one of ``choices``."""
  pooling = model_config.get("pooling", "mean")
  if pooling not in choices:
    raise ValueError(f"model.pooling={pooling!r} must be one of {choices}.")
  return pooling


def example_mask(batch: Batch) -> jax.Array:
  """``float32[B]``: ``batch['mask']``, or ones when the batch has no mask (``B`` from any column)."""
  if "mask" in batch:
    return batch["mask"].astype(jnp.float32)
  return jnp.ones(jax.tree.leaves(batch)[0].shape[:1], jnp.float32)


def check_dataset(dataset, expected: type, kind: str, task: str) -> None:
  """A ``TypeError`` naming ``model.kind`` when ``dataset`` is not the provider's task."""
  if not isinstance(dataset, expected):
    raise TypeError(
        f"model.kind={kind!r} trains on {task} data ({expected.__name__}), but the data source "
        f"gave {type(dataset).__name__}; pick a {task} data.source or another model.kind.")


@contextlib.contextmanager
def model_errors(name, kind: str):
  """Re-raises loading errors prefixed with ``model.name`` and ``model.kind``."""
  try:
    yield
  except (FileNotFoundError, KeyError, ValueError) as e:
    message = e.args[0] if len(e.args) == 1 else str(e)
    raise type(e)(f"model.name={str(name)!r} (model.kind={kind!r}): {message}") from None
