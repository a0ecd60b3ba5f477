"""A Llama-family decoder (Llama, SmolLM, Qwen2) whose projections take a LoRA tree.

The architecture is the pre-norm decoder of Touvron et al., "LLaMA: Open and
Efficient Foundation Language Models" (arXiv:2302.13971): per layer::

    h = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))
    y = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))

with ``n(x) = w * x / sqrt(mean(x^2) + eps)`` (RMSNorm), grouped-query
attention (``n_heads`` query heads share ``n_kv_heads`` key/value heads),
and rotary position embeddings (Su et al., arXiv:2104.09864) in the Hugging
Face "rotate half" convention: dimension ``i < head_dim/2`` is paired with
``i + head_dim/2``. Qwen2 adds a bias to q, k and v.

Every 2-D projection is a :class:`hetlora.models.layers.LoRADense` with
kernel ``[d_in, d_out]``, so a LoRA tree with paths such as
``layers_0/attn/q_proj`` or ``layers_3/mlp/down_proj`` adapts it::

    logits = model.apply({'params': base, 'lora': lora_eff}, ids, mask)

A tied head reuses the token embedding (no LoRA there); an untied head is the
``lm_head`` LoRADense. ``model.apply(..., return_hidden=True)`` stops before
the head and returns the final normed hidden states ``h: [B, L, D]``;
:func:`head_logits` is the head as a pure function of ``(params, lora, h)``,
so a loss can apply it to a few tokens at a time
(:func:`hetlora.models.lm_tasks.chunked_logprobs`) instead of materialising
``[B, L, V]`` logits. Decoding uses an explicit, fixed-size KV cache pytree
(:func:`init_cache`) so :func:`generate` is one jitted ``lax.while_loop``.

Packed rows (:mod:`hetlora.models.segments`): ``segment_ids`` and
``positions: int32[B, L]`` in place of the mask make attention causal within
each segment and restart RoPE positions per segment, so each segment's
logits equal those of the example alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from hetlora.models import segments
from hetlora.models.layers import LoRADense

Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static shape hyperparameters of a Llama-family decoder.

  Attributes:
    vocab_size: V, rows of the token embedding.
    d_model: D, residual width.
    n_layers: number of decoder layers.
    n_heads: H, query heads.
    n_kv_heads: key/value heads (H must be a multiple).
    head_dim: per-head width (``d_model // n_heads`` for most models).
    ffn: hidden width of the SwiGLU MLP.
    rope_theta: RoPE base frequency.
    rms_eps: RMSNorm epsilon.
    tie_embeddings: the LM head is the transposed token embedding.
    qkv_bias: q/k/v projections have a bias (Qwen2).
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  qkv_bias: bool = False

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")


class RMSNorm(nn.Module):
  """``y = scale * x / sqrt(mean(x^2, -1) + eps)``, normalised in float32."""
  eps: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(dtype) * x32.astype(dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Half-rotation rotary embedding.

  Args:
    x: ``[B, L, heads, head_dim]``.
    positions: ``int32[B, L]`` absolute positions.
    theta: base frequency.

  Returns:
    ``[B, L, heads, head_dim]``: ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half([x1, x2]) = [-x2, x1]`` and angle ``pos * theta^(-2i/head_dim)``.
  """
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, L, hd/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]    # [B, L, 1, hd]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


class Attention(nn.Module):
  """Grouped-query causal self-attention with an optional KV cache."""
  config: LlamaConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, visible, layer_cache=None, cache_index=None):
    """Attention of the chunk ``x`` over itself or over the cache.

    Args:
      x: ``[B, L, D]``.
      positions: ``int32[B, L]`` RoPE positions.
      visible: ``bool[B, L, S]``, query ``l`` sees key slot ``s`` (``S = L``
        without cache; causal, padding and segments already applied).
      layer_cache: ``{'k', 'v': [B, S, n_kv, head_dim]}`` or None.
      cache_index: ``int32[]`` slot where this chunk is written.

    Returns:
      ``([B, L, D], new layer_cache or None)``.
    """
    c = self.config
    dense = functools.partial(LoRADense, dtype=self.dtype, param_dtype=self.param_dtype)
    b, l, _ = x.shape
    q = dense(c.n_heads * c.head_dim, use_bias=c.qkv_bias, name="q_proj")(x)
    k = dense(c.n_kv_heads * c.head_dim, use_bias=c.qkv_bias, name="k_proj")(x)
    v = dense(c.n_kv_heads * c.head_dim, use_bias=c.qkv_bias, name="v_proj")(x)
    q = rope(q.reshape(b, l, c.n_heads, c.head_dim), positions, c.rope_theta)
    k = rope(k.reshape(b, l, c.n_kv_heads, c.head_dim), positions, c.rope_theta)
    v = v.reshape(b, l, c.n_kv_heads, c.head_dim)
    new_cache = None
    if layer_cache is not None:
      start = (0, cache_index, 0, 0)
      k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    groups = c.n_heads // c.n_kv_heads
    q = q.reshape(b, l, c.n_kv_heads, groups, c.head_dim)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k).astype(jnp.float32) / jnp.sqrt(c.head_dim).astype(jnp.float32)
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, l, c.n_heads * c.head_dim)
    return dense(c.d_model, use_bias=False, name="o_proj")(out), new_cache


class MLP(nn.Module):
  """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, ``[B, L, D] -> [B, L, D]``."""
  config: LlamaConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = functools.partial(LoRADense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(dense(c.ffn, name="gate_proj")(x)) * dense(c.ffn, name="up_proj")(x)
    return dense(c.d_model, name="down_proj")(h)


class DecoderLayer(nn.Module):
  """Pre-norm attention block then pre-norm MLP block, both residual."""
  config: LlamaConfig
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, positions, visible, layer_cache=None, cache_index=None):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h, new_cache = Attention(c, name="attn", **kw)(
        RMSNorm(c.rms_eps, name="attn_norm", **kw)(x), positions, visible, layer_cache, cache_index)
    x = x + h
    x = x + MLP(c, name="mlp", **kw)(RMSNorm(c.rms_eps, name="mlp_norm", **kw)(x))
    return x, new_cache


def _causal(key_mask: jax.Array, query_slots: jax.Array) -> jax.Array:
  """``bool[B, L, S]``: valid key slots (``key_mask: bool[B, S]``) at or before each query's slot."""
  return key_mask[:, None, :] & (jnp.arange(key_mask.shape[1])[None, None, :] <= query_slots[None, :, None])


class Llama(nn.Module):
  """Llama-family causal LM.

  Parameter paths: ``embed_tokens/embedding: [V, D]``,
  ``layers_{i}/attn/{q,k,v,o}_proj/kernel``, ``layers_{i}/mlp/{gate,up,down}_proj/kernel``,
  ``layers_{i}/{attn,mlp}_norm/scale``, ``norm/scale`` and, when untied,
  ``lm_head/kernel: [D, V]``.
  """
  config: LlamaConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, cache: Cache | None = None,
               return_hidden: bool = False, segment_ids=None, positions=None):
    """Logits of every position.

    Args:
      input_ids: ``int32[B, L]``.
      attention_mask: ``int[B, L]``, 1 for real tokens (left or right padding
        both work); default all ones.
      cache: None for a full forward, or a cache from :func:`init_cache`;
        the chunk is written at ``cache['index']`` and attends to all valid
        earlier slots.
      return_hidden: stop before the LM head and return the final normed
        hidden states ``h: [B, L, D]`` (compute dtype); then
        ``logits == head_logits(self, params, lora, h)``. With a cache this
        returns ``(h, new_cache)``, so a decoder can apply the head to the
        positions it needs only (:func:`generate` prefills this way).
      segment_ids: ``int32[B, L]`` packed rows (module docstring), with
        ``positions: int32[B, L]``; ``attention_mask`` is then not read. Not with a cache.

    Returns:
      ``float32[B, L, V]`` logits, or ``(logits, new_cache)`` with a cache;
      with ``return_hidden`` ``h: [B, L, D]`` in place of the logits
      (``h`` or ``(h, new_cache)``).
    """
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids are for a full forward; pass cache=None.")
    c = self.config
    b, l = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, l), jnp.int32)
    valid = attention_mask.astype(jnp.int32)
    index = None if cache is None else cache["index"]
    if segment_ids is not None:
      visible = segments.visibility(segment_ids, causal=True)
    elif cache is None:
      positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
      visible = _causal(valid.astype(bool), jnp.arange(l))
    else:
      positions = cache["next_pos"][:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
      key_mask = jax.lax.dynamic_update_slice(cache["mask"], valid.astype(bool), (0, index))
      visible = _causal(key_mask, index + jnp.arange(l))
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="embed_tokens")
    x = embed(input_ids)
    new_layers = []
    for i in range(c.n_layers):
      layer_cache = None if cache is None else cache["layers"][i]
      x, new_lc = DecoderLayer(c, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
          x, positions, visible, layer_cache, index)
      new_layers.append(new_lc)
    x = RMSNorm(c.rms_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    if return_hidden:
      out = x
    else:
      if c.tie_embeddings:
        out = embed.attend(x)
      else:
        out = LoRADense(c.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="lm_head")(x)
      out = out.astype(jnp.float32)
    if cache is None:
      return out
    new_cache = {"layers": tuple(new_layers), "mask": key_mask, "index": index + l,
                 "next_pos": cache["next_pos"] + valid.sum(axis=1)}
    return out, new_cache


def head_logits(model: Llama, params: Mapping[str, Any], lora: Mapping[str, Any] | None,
                h: jax.Array) -> jax.Array:
  """The LM head of ``model`` as a pure function: ``float32[..., V]`` logits of hidden states.

  Tied: ``h @ E^T`` with the token embedding ``E: [V, D]`` (as
  ``nn.Embed.attend``; a LoRA entry at ``embed_tokens`` is ignored, as the
  module ignores it). Untied: ``h @ W0 + (h @ a) @ b`` with
  ``W0 = params['lm_head']['kernel']: [D, V]`` and ``lora['lm_head'] = {'a': [D, r],
  'b': [r, V]}`` when the LoRA tree adapts the head (as :class:`LoRADense`).

  Args:
    model: the :class:`Llama` whose head this is (its config and compute dtype).
    params: its base parameters.
    lora: the folded LoRA tree or None/{}.
    h: ``[..., D]`` final normed hidden states (``return_hidden=True``).

  Returns:
    ``float32[..., V]``, equal to the module's logits at those positions.

  Example:
    >>> h = model.apply({'params': params}, ids, mask, return_hidden=True)   # doctest: +SKIP
    >>> logits = head_logits(model, params, None, h[:, -1])                 # [B, V]  # doctest: +SKIP
  """
  if model.config.tie_embeddings:
    emb = params["embed_tokens"]["embedding"]
    dtype = model.dtype or jnp.result_type(h.dtype, emb.dtype)
    # Contract E's feature axis in place: an explicit E.T inside a scan over chunks is hoisted
    # and materialised as a [D, V] copy (108 MiB for SmolLM2).
    return jnp.einsum("...d,vd->...v", h.astype(dtype), emb.astype(dtype)).astype(jnp.float32)
  kernel = params["lm_head"]["kernel"]
  dtype = model.dtype or h.dtype
  x = h.astype(dtype)
  y = jnp.dot(x, kernel.astype(dtype))
  adapter = (lora or {}).get("lm_head")
  if adapter:
    y = y + jnp.dot(jnp.dot(x, adapter["a"].astype(dtype)), adapter["b"].astype(dtype))
  return y.astype(jnp.float32)


def init_cache(config: LlamaConfig, batch: int, size: int, dtype: Any = jnp.float32) -> Cache:
  """An empty fixed-size KV cache.

  Returns:
    ``{'layers': ({'k', 'v': [B, S, n_kv, head_dim]},) * n_layers,
    'mask': bool[B, S], 'index': int32[] (next slot), 'next_pos': int32[B]}``.
  """
  shape = (batch, size, config.n_kv_heads, config.head_dim)
  layers = tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                 for _ in range(config.n_layers))
  return {"layers": layers, "mask": jnp.zeros((batch, size), bool),
          "index": jnp.zeros((), jnp.int32), "next_pos": jnp.zeros((batch,), jnp.int32)}


def variables(params: Mapping[str, Any], lora: Mapping[str, Any] | None) -> dict[str, Any]:
  """``{'params': params, 'lora': lora}``, leaving out an absent or empty LoRA tree."""
  return {"params": params} if not lora else {"params": params, "lora": lora}


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def generate(model: Llama, params, lora, prompt_ids: jax.Array, prompt_mask: jax.Array,
             key: jax.Array, temperature: jax.Array | float = 0.0, *,
             max_new_tokens: int, eos_id: jax.Array | int | None = None) -> dict[str, jax.Array]:
  """Greedy (``temperature <= 0``) or temperature sampling with a KV cache.

  The prompt is prefilled in one pass, then one token per ``lax.while_loop``
  step is decoded, until ``max_new_tokens`` or every row has emitted ``eos_id``.
  The prefill computes hidden states only and applies the LM head
  (:func:`head_logits`) to each row's last prompt token, so no ``[B, P, V]``
  logits are materialised.

  Args:
    model: a :class:`Llama` (static).
    params: base parameters.
    lora: the folded LoRA tree (:func:`hetlora.lora.fold_scale`) or None/{}.
    prompt_ids: ``int32[B, P]`` (left or right padded).
    prompt_mask: ``int[B, P]``, 1 for prompt tokens.
    key: PRNG key (unused when greedy).
    temperature: float scalar; ``<= 0`` means argmax.
    max_new_tokens: N, static.
    eos_id: int32 scalar stop token (traced: no recompilation per value), or
      None / a negative id to always run N steps.

  Returns:
    ``{'tokens': int32[B, N]`` (after a row's eos: ``eos_id``),
    ``'mask': int32[B, N]`` (1 for generated tokens, the eos included)}.

  Example:
    >>> out = generate(model, params, None, ids, mask, jax.random.key(0), max_new_tokens=8)
  """
  b, p = prompt_ids.shape
  cfg = model.config
  temperature = jnp.asarray(temperature, jnp.float32)
  var = variables(params, lora)
  cache = init_cache(cfg, b, p + max_new_tokens, model.dtype)
  h, cache = model.apply(var, prompt_ids, prompt_mask, cache, return_hidden=True)   # [B, P, D]
  prompt_mask = prompt_mask.astype(jnp.int32)
  last = jnp.max(jnp.where(prompt_mask > 0, jnp.arange(p)[None], 0), axis=1)
  h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]             # [B, D]
  next_logits = head_logits(model, params, lora, h_last)                         # [B, V]
  eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
  fill = jnp.maximum(eos, 0)

  def pick(logits_bv, k):
    greedy = jnp.argmax(logits_bv, axis=-1)
    sampled = jax.random.categorical(k, logits_bv / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

  def cond(state):
    t, _, _, _, done, _, _ = state
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(state):
    t, cache, next_logits, key, done, tokens, mask = state
    key, sub = jax.random.split(key)
    tok = jnp.where(done, fill, pick(next_logits, sub))
    tokens = tokens.at[:, t].set(tok)
    mask = mask.at[:, t].set((~done).astype(jnp.int32))
    done = done | (tok == eos)
    h, cache = model.apply(var, tok[:, None], jnp.ones((b, 1), jnp.int32), cache, return_hidden=True)
    return t + 1, cache, head_logits(model, params, lora, h[:, 0]), key, done, tokens, mask

  state = (jnp.zeros((), jnp.int32), cache, next_logits, key, jnp.zeros((b,), bool),
           jnp.full((b, max_new_tokens), fill, jnp.int32), jnp.zeros((b, max_new_tokens), jnp.int32))
  _, _, _, _, _, tokens, mask = jax.lax.while_loop(cond, body, state)
  return {"tokens": tokens, "mask": mask}
