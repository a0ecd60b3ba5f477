"""A DINOv2-style Vision Transformer in Flax whose every 2-D projection accepts a LoRA tree.

Architecture: ViT (Dosovitskiy et al., ICLR 2021, arXiv:2010.11929) as trained
by DINOv2 (Oquab et al., TMLR 2024, arXiv:2304.07193), without registers:
non-overlapping ``p x p`` patches, a CLS token, learned position embeddings,
and pre-LN layers with layer-scale ``gamma`` (Touvron et al., ICCV 2021,
arXiv:2103.17239)::

    h = x + gamma_1 * Attn(LN(x));   y = h + gamma_2 * W2 gelu(W1 LN(h))

and a final LayerNorm. Every projection (patch embedding, attention
query/key/value/output, MLP fc1/fc2, classifier head) is a
:class:`hetlora.models.layers.LoRADense` with a 2-D kernel ``[d_in, d_out]``.
Parameter paths::

    embeddings/patch/{kernel [p*p*C, D], bias}     (a patch flattened as (row, column, channel))
    embeddings/cls_token [1, D]
    embeddings/position [1 + g*g, D]               (CLS first, then the g x g grid row by row)
    layer_{i}/norm1/{scale,bias}
    layer_{i}/attention/{query,key,value,output}/{kernel,bias}
    layer_{i}/layer_scale1 [D]
    layer_{i}/norm2/{scale,bias}
    layer_{i}/mlp/{fc1,fc2}/{kernel,bias}
    layer_{i}/layer_scale2 [D]
    norm/{scale,bias}
    classifier/{kernel,bias}                       (ViTClassifier only)

The position embeddings are stored for one grid ``g``; a checkpoint trained at
another grid ``G`` is resized once, at load time, by :func:`resize_positions`
(bicubic, as the DINOv2 reference code does at run time).

Apply as ``ViTClassifier(cfg, n).apply({'params': base, 'lora': lora_eff}, pixels)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hetlora.models.layers import LoRADense

POOLINGS = ("cls", "mean")
# ImageNet statistics, the normalisation DINOv2 was trained with (RGB, pixels in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CUBIC_A = -0.75  # the bicubic kernel's coefficient in PyTorch and ONNX Resize


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Hyperparameters of a ViT backbone (DINOv2-S/14: 384 wide, 12 layers, 6 heads).

  ``grid`` is the side of the patch grid the position embeddings are stored for
  (37 in the DINOv2 checkpoints, 518-pixel images); the model reads images of
  ``grid * patch_size`` pixels.
  """
  hidden_size: int = 384
  num_layers: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  patch_size: int = 14
  channels: int = 3
  grid: int = 37
  layer_norm_eps: float = 1e-6
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def image_size(self) -> int:
    return self.grid * self.patch_size


def _cubic(t: np.ndarray) -> np.ndarray:
  """Keys' cubic convolution kernel with ``a = CUBIC_A`` at distances ``|t|``."""
  t = np.abs(t)
  a = CUBIC_A
  near = ((a + 2) * t - (a + 3)) * t * t + 1
  far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``float64[n_out, n_in]``: 1-D bicubic resampling, half-pixel centres, edges clamped.

  The weights of PyTorch's ``interpolate(mode='bicubic', align_corners=False)``
  and ONNX ``Resize(mode='cubic', cubic_coeff_a=-0.75)`` without antialiasing:
  output ``i`` reads input ``x = (i + 0.5) * n_in / n_out - 0.5``.

  Example:
    >>> cubic_matrix(3, 3)
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]])
  """
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    x = (i + 0.5) * n_in / n_out - 0.5
    x0 = int(np.floor(x))
    for j in range(x0 - 1, x0 + 3):
      m[i, min(max(j, 0), n_in - 1)] += _cubic(np.float64(x - j))
  return m


def resize_positions(position: np.ndarray, grid: int) -> np.ndarray:
  """Position embeddings ``[1 + G*G, D]`` resized to ``[1 + grid*grid, D]`` (CLS kept).

  The ``G x G`` patch embeddings are resampled bicubically (:func:`cubic_matrix`)
  in float64 and returned as float32; ``grid == G`` returns them unchanged.
  """
  n, d = position.shape
  g = int(round(np.sqrt(n - 1)))
  if g * g != n - 1:
    raise ValueError(f"position embeddings have {n} rows; expected 1 + a square number.")
  if g == grid:
    return np.asarray(position, np.float32)
  patches = np.asarray(position[1:], np.float64).reshape(g, g, d)
  m = cubic_matrix(g, grid)
  resized = np.einsum("ij,jkd,lk->ild", m, patches, m).reshape(grid * grid, d)
  return np.concatenate([position[:1], resized]).astype(np.float32)


def preprocess(pixels: jax.Array, size: int) -> jax.Array:
  """``uint8[B, h, w, C]`` (C = 1 or 3) -> ``float32[B, size, size, 3]``, ImageNet-normalised.

  Grey images are repeated over RGB; resizing is bilinear.
  """
  x = pixels.astype(jnp.float32) / 255.0
  x = jnp.broadcast_to(x, x.shape[:-1] + (3,)) if x.shape[-1] == 1 else x
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear")
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class Embeddings(nn.Module):
  """Patches + CLS + positions: ``[B, g*p, g*p, C] -> [B, 1 + g*g, D]``."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    b, h, w, c = images.shape
    p, g = cfg.patch_size, cfg.grid
    if (h, w, c) != (g * p, g * p, cfg.channels):
      raise ValueError(f"images of shape {(h, w, c)}; the model reads {(g * p, g * p, cfg.channels)} "
                       f"(a {g}x{g} grid of {p}-pixel patches).")
    patches = images.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, p * p * c)
    x = LoRADense(cfg.hidden_size, dtype=self.dtype, name="patch")(patches.astype(self.dtype))
    init = nn.initializers.normal(cfg.initializer_range)
    cls = self.param("cls_token", init, (1, cfg.hidden_size))
    position = self.param("position", init, (1 + g * g, cfg.hidden_size))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, cfg.hidden_size)), x], axis=1)
    return x + position.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention over all tokens, ``[B, N, D] -> [B, N, D]`` (scores in float32)."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    b, n, _ = x.shape
    dense = lambda name: LoRADense(cfg.hidden_size, dtype=self.dtype, name=name)
    split = lambda t: t.reshape(b, n, cfg.num_heads, cfg.head_dim)
    q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores / jnp.sqrt(jnp.float32(cfg.head_dim)), axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return dense("output")(ctx.reshape(b, n, cfg.hidden_size))


class MLP(nn.Module):
  """``fc2(gelu(fc1(x)))``: ``[B, N, D] -> [B, N, M] -> [B, N, D]`` (exact, erf GELU)."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = nn.gelu(LoRADense(cfg.mlp_dim, dtype=self.dtype, name="fc1")(x), approximate=False)
    return LoRADense(cfg.hidden_size, dtype=self.dtype, name="fc2")(h)


class Layer(nn.Module):
  """One pre-LN layer with layer-scale, ``[B, N, D] -> [B, N, D]``."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
    scale = lambda name: self.param(name, nn.initializers.ones, (cfg.hidden_size,)).astype(x.dtype)
    x = x + scale("layer_scale1") * Attention(cfg, self.dtype, name="attention")(norm("norm1")(x))
    return x + scale("layer_scale2") * MLP(cfg, self.dtype, name="mlp")(norm("norm2")(x))


def _encode(config: ViTConfig, dtype, images):
  """Embeddings, layers and the final LayerNorm, inside the caller's compact scope."""
  x = Embeddings(config, dtype, name="embeddings")(images)
  for i in range(config.num_layers):
    x = Layer(config, dtype, name=f"layer_{i}")(x)
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name="norm")(x)


class ViTModel(nn.Module):
  """The backbone: normalised images ``[B, g*p, g*p, C]`` -> tokens ``[B, 1 + g*g, D]`` (CLS first).

  Example:
    >>> cfg = ViTConfig(hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16, patch_size=2, grid=2)
    >>> x = jnp.zeros((1, 4, 4, 3))
    >>> params = ViTModel(cfg).init(jax.random.key(0), x)['params']
    >>> ViTModel(cfg).apply({'params': params}, x).shape
    (1, 5, 8)
  """
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    return _encode(self.config, self.dtype, images)


def pool(tokens: jax.Array, method: str) -> jax.Array:
  """``[B, 1 + N, D] -> float32[B, D]``: the CLS token (``'cls'``) or the patches' mean (``'mean'``)."""
  if method == "cls":
    return tokens[:, 0].astype(jnp.float32)
  if method == "mean":
    return jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
  raise ValueError(f"pooling must be one of {POOLINGS}, got {method!r}.")


class ViTClassifier(nn.Module):
  """Pixels -> :func:`preprocess` -> backbone -> pooling -> ``LoRADense`` head.

  ``uint8[B, h, w, 1 or 3] -> float32[B, num_labels]``; the backbone's
  parameters sit at the same paths as in :class:`ViTModel`, so a loaded tree
  plus :func:`init_head` is a complete parameter tree.
  """
  config: ViTConfig
  num_labels: int
  pooling: str = "cls"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    images = preprocess(pixels, self.config.image_size).astype(self.dtype)
    pooled = pool(_encode(self.config, self.dtype, images), self.pooling)
    logits = LoRADense(self.num_labels, dtype=self.dtype, name="classifier",
                       kernel_init=nn.initializers.normal(self.config.initializer_range))(pooled)
    return logits.astype(jnp.float32)


def init_head(key: jax.Array, config: ViTConfig, num_labels: int) -> dict[str, Any]:
  """A fresh head ``{'classifier': {'kernel': [D, num_labels], 'bias': [num_labels]}}``, N(0, 0.02)."""
  kernel = config.initializer_range * jax.random.normal(key, (config.hidden_size, num_labels))
  return {"classifier": {"kernel": kernel, "bias": jnp.zeros((num_labels,))}}
