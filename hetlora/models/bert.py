"""A BERT-family encoder in Flax whose every 2-D projection accepts a LoRA tree.

Architecture: BERT (Devlin et al., NAACL 2019, arXiv:1810.04805), post-LN
transformer layers::

    h = LN(x + Attn(x));   y = LN(h + W2 gelu(W1 h))

as used by MiniLM checkpoints such as ``all-MiniLM-L6-v2`` (Wang et al., 2020,
arXiv:2002.10957; Reimers & Gurevych, 2019, arXiv:1908.10084 for the
mean-pooled sentence embedding) and by RoBERTa (Liu et al., 2019,
arXiv:1907.11692; ``model_type: roberta``), which is the same encoder with
its position ids shifted past the padding id (``position_offset =
pad_token_id + 1``, as ``transformers``' ``RobertaEmbeddings`` numbers the
tokens of a right-padded row) and one token type.

Every projection (attention query/key/value/output, MLP intermediate/output,
classifier head) is a :class:`hetlora.models.layers.LoRADense` with a 2-D
kernel ``[d_in, d_out]``, so a LoRA tree from :func:`hetlora.lora.init` can
adapt any of them. Parameter paths::

    embeddings/{word,position,token_type}_embeddings/embedding
    embeddings/layer_norm/{scale,bias}
    encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}
    encoder/layer_{i}/attention_norm/{scale,bias}
    encoder/layer_{i}/mlp/{intermediate,output}/{kernel,bias}
    encoder/layer_{i}/mlp_norm/{scale,bias}
    classifier/{kernel,bias}                      (BertClassifier only)

Apply as ``model.apply({'params': base, 'lora': lora_eff}, input_ids, mask)``.

Packed rows (:mod:`hetlora.models.segments`): pass ``segment_ids`` and
``positions: int[B, L]`` instead of a mask; a token attends only within its
segment and takes its position embedding from ``positions``, so each segment's
states equal those of the example alone. :class:`BertClassifier` then pools
per segment into ``num_segments`` example slots.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hetlora.models import segments
from hetlora.models.layers import LoRADense

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}
POOLINGS = ("mean", "cls")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyperparameters of a BERT encoder (the fields of a HF ``config.json``)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0
  position_offset: int = 0     # RoBERTa: pad_token_id + 1 (its token i has position id offset + i)

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size={self.hidden_size} is not divisible by "
          f"num_attention_heads={self.num_attention_heads}.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
          f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}.")

  @property
  def max_tokens(self) -> int:
    """Tokens an example may hold: the position table less the ids reserved before it."""
    return self.max_position_embeddings - self.position_offset

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config") -> "BertConfig":
    """Reads a Hugging Face BERT ``config.json`` dict; unknown keys are ignored.

    Raises:
      ValueError: ``model_type`` is not BERT-like, or positions are not absolute.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"{source}: model_type={model_type!r} is not supported by the BERT encoder; "
          f"expected one of {SUPPORTED_MODEL_TYPES} (architectures={hf.get('architectures')}).")
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(f"{source}: position_embedding_type={pos!r} is not supported; "
                       "only 'absolute' is.")
    names = {f.name for f in dataclasses.fields(cls)} - {"position_offset"}
    kwargs = {k: v for k, v in hf.items() if k in names and v is not None}
    if model_type == "roberta":
      kwargs["position_offset"] = int(hf.get("pad_token_id", 1)) + 1
    return cls(**kwargs)

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "BertConfig":
    """Reads ``config.json`` at ``path``."""
    with open(path, encoding="utf-8") as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return cls.from_hf_dict(hf, source=str(path))


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm: ``[B, L] -> [B, L, H]``.

  Positions are ``0..L-1`` unless ``positions: int[B, L]`` is given (packed
  rows); the position embedding read is ``position_offset`` further on.
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool = True, positions=None):
    cfg = self.config
    seq_len = input_ids.shape[-1]
    if seq_len > cfg.max_tokens:
      raise ValueError(f"sequence length {seq_len} exceeds the model's {cfg.max_tokens} positions "
                       f"(max_position_embeddings={cfg.max_position_embeddings}, {cfg.position_offset} "
                       "reserved); truncate inputs (config.model.max_len).")
    init = nn.initializers.normal(cfg.initializer_range)
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, dtype=self.dtype,
                                     embedding_init=init, name=name)
    x = embed(cfg.vocab_size, "word_embeddings")(input_ids)
    if positions is None:
      positions = jnp.arange(seq_len)[None]
    x = x + embed(cfg.max_position_embeddings, "position_embeddings")(positions + cfg.position_offset)
    x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertAttention(nn.Module):
  """Multi-head self-attention, ``[B, L, H] -> [B, L, H]``.

  ``query/key/value/output`` are ``LoRADense`` with kernels ``[H, H]``; heads
  are split by reshaping the dense output to ``[B, L, n_heads, head_dim]``.
  Scores and softmax run in float32; keys a query does not see (``visible:
  bool[B, 1 or L, L]``, query by key) get ``-inf``-like scores.
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, visible, deterministic: bool = True):
    cfg = self.config
    b, l, _ = x.shape
    dense = lambda name: LoRADense(cfg.hidden_size, dtype=self.dtype, name=name,
                                   kernel_init=nn.initializers.normal(cfg.initializer_range))
    split = lambda t: t.reshape(b, l, cfg.num_attention_heads, cfg.head_dim)
    q, k, v = (split(dense(n)(x)) for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim))
    scores = jnp.where(visible[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return dense("output")(ctx.reshape(b, l, cfg.hidden_size))


class BertMLP(nn.Module):
  """``output(act(intermediate(x)))``: ``[B, L, H] -> [B, L, I] -> [B, L, H]``."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    h = LoRADense(cfg.intermediate_size, dtype=self.dtype, kernel_init=init,
                  name="intermediate")(x)
    h = ACTIVATIONS[cfg.hidden_act](h)
    return LoRADense(cfg.hidden_size, dtype=self.dtype, kernel_init=init, name="output")(h)


class BertLayer(nn.Module):
  """One post-LN transformer layer, ``[B, L, H] -> [B, L, H]`` (``visible`` as in :class:`BertAttention`)."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, visible, deterministic: bool = True):
    cfg = self.config
    drop = nn.Dropout(cfg.hidden_dropout_prob)
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
    h = BertAttention(cfg, self.dtype, name="attention")(x, visible, deterministic)
    x = norm("attention_norm")(x + drop(h, deterministic=deterministic))
    h = BertMLP(cfg, self.dtype, name="mlp")(x)
    return norm("mlp_norm")(x + drop(h, deterministic=deterministic))


class BertStack(nn.Module):
  """``num_hidden_layers`` layers named ``layer_0 .. layer_{n-1}``."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, visible, deterministic: bool = True):
    for i in range(self.config.num_hidden_layers):
      x = BertLayer(self.config, self.dtype, name=f"layer_{i}")(x, visible, deterministic)
    return x


def _encode(config, dtype, input_ids, attention_mask, token_type_ids, deterministic,
            segment_ids=None, positions=None):
  """Embeddings + encoder stack, built inside the caller's compact scope.

  With ``segment_ids`` (packed rows) attention stays within a segment and
  ``attention_mask`` is not read. Under a ``position_offset`` (RoBERTa) the
  real tokens count from 0 and padding takes position ``-1`` (the embedding
  row ``pad_token_id``), as ``transformers`` numbers them.
  """
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)
  if segment_ids is not None:
    visible = segments.visibility(segment_ids)
  else:
    mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
    visible = mask[:, None, :].astype(bool)
    if config.position_offset:   # RoBERTa numbers real tokens from 0 and gives padding the id before
      positions = jnp.cumsum(mask, axis=-1) * mask - 1
  x = BertEmbeddings(config, dtype, name="embeddings")(input_ids, token_type_ids, deterministic, positions)
  return BertStack(config, dtype, name="encoder")(x, visible, deterministic)


class BertModel(nn.Module):
  """The encoder: token ids ``int32[B, L]`` -> hidden states ``[B, L, H]``.

  Attributes:
    config: the :class:`BertConfig`.
    dtype: compute dtype (e.g. ``jnp.bfloat16`` on accelerators); parameters
      keep the dtype they were loaded or initialised with.

  Example:
    >>> cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
    ...                  num_attention_heads=2, intermediate_size=16)
    >>> ids = jnp.ones((2, 5), jnp.int32)
    >>> params = BertModel(cfg).init(jax.random.key(0), ids)['params']
    >>> BertModel(cfg).apply({'params': params}, ids).shape
    (2, 5, 8)
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
               deterministic: bool = True):
    return _encode(self.config, self.dtype, input_ids, attention_mask, token_type_ids,
                   deterministic)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mask-weighted mean over tokens: ``[B, L, H], [B, L] -> float32[B, H]``.

  Rows with no unmasked token give zeros (the count is clamped to 1e-9, as in
  sentence-transformers).
  """
  m = attention_mask.astype(jnp.float32)[..., None]
  total = jnp.sum(hidden.astype(jnp.float32) * m, axis=-2)
  return total / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)


def cls_pool(hidden: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
  """The first token's state: ``[B, L, H] -> float32[B, H]``."""
  del attention_mask
  return hidden[..., 0, :].astype(jnp.float32)


def pool(hidden: jax.Array, attention_mask: jax.Array, method: str) -> jax.Array:
  """Dispatches to :func:`mean_pool` (``'mean'``) or :func:`cls_pool` (``'cls'``)."""
  if method == "mean":
    return mean_pool(hidden, attention_mask)
  if method == "cls":
    return cls_pool(hidden, attention_mask)
  raise ValueError(f"pooling must be one of {POOLINGS}, got {method!r}.")


def segment_pool(hidden: jax.Array, segment_ids: jax.Array, positions: jax.Array, method: str,
                 num_segments: int) -> jax.Array:
  """:func:`pool` of each segment of packed rows: ``[R, L, H] -> float32[num_segments, H]``.

  ``'mean'``: the mean of a segment's states (zeros for an empty slot);
  ``'cls'``: the state at its position 0.
  """
  if method == "mean":
    total = segments.segment_sum(hidden, segment_ids, num_segments)
    count = segments.segment_sum(jnp.ones(segment_ids.shape), segment_ids, num_segments)
    return total / jnp.maximum(count, 1e-9)[:, None]
  if method == "cls":
    return segments.segment_sum(hidden, jnp.where(positions == 0, segment_ids, 0), num_segments)
  raise ValueError(f"pooling must be one of {POOLINGS}, got {method!r}.")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along the last axis."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class BertClassifier(nn.Module):
  """Encoder + pooling + ``LoRADense`` head: ``int32[B, L] -> float32[B, num_labels]``.

  The encoder's parameters sit at the same paths as in :class:`BertModel`, so
  a loaded tree plus :func:`init_head` is a complete parameter tree. Packed
  rows (``segment_ids``, ``positions: int32[R, L]`` and the static
  ``num_segments = B``) give ``float32[B, num_labels]`` by :func:`segment_pool`.
  """
  config: BertConfig
  num_labels: int
  pooling: str = "mean"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
               deterministic: bool = True, segment_ids=None, positions=None,
               num_segments: int | None = None):
    if segment_ids is not None:
      hidden = _encode(self.config, self.dtype, input_ids, None, token_type_ids, deterministic,
                       segment_ids, positions)
      pooled = segment_pool(hidden, segment_ids, positions, self.pooling, num_segments)
    else:
      if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
      hidden = _encode(self.config, self.dtype, input_ids, attention_mask, token_type_ids,
                       deterministic)
      pooled = pool(hidden, attention_mask, self.pooling)
    pooled = nn.Dropout(self.config.hidden_dropout_prob)(pooled, deterministic=deterministic)
    logits = LoRADense(self.num_labels, dtype=self.dtype, name="classifier",
                       kernel_init=nn.initializers.normal(self.config.initializer_range))(pooled)
    return logits.astype(jnp.float32)


def init_head(key: jax.Array, config: BertConfig, num_labels: int,
              dtype: Any = jnp.float32) -> dict[str, Any]:
  """A fresh classifier head ``{'classifier': {'kernel': [H, num_labels], 'bias'}}``.

  Merge with loaded encoder params: ``params = {**encoder_params, **init_head(...)}``.
  """
  kernel = config.initializer_range * jax.random.normal(
      key, (config.hidden_size, num_labels), dtype)
  return {"classifier": {"kernel": kernel, "bias": jnp.zeros((num_labels,), dtype)}}
