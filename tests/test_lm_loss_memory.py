"""The chunked causal-LM loss (:mod:`hetlora.models.lm_tasks`) equals the full-logits one and uses less memory.

Reference: ``chunk = 0``, the model's full ``[B, L, V]`` logits through
``log_softmax``. Tied and untied heads, a LoRA on the untied head, chunks that
do not divide ``L - 1``, left and right padding; per-example losses, LoRA
gradients and ``eval_sums`` within 1e-5 (float32). Memory: XLA's compiled
temporaries of the gradient, at a size where ``L x V`` logits dominate.
"""

import doctest
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hetlora import lora as lora_lib
from hetlora.models import llama, llama_lm, lm_tasks

PATTERN = r"(q|v|down)_proj/kernel$"


def config(tied: bool, vocab: int = 61, d: int = 16, layers: int = 1) -> llama.LlamaConfig:
  return llama.LlamaConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=4, n_kv_heads=2,
                           head_dim=d // 4, ffn=24, tie_embeddings=tied)


def _numpy_like(tree, rng, std, shift=0.0):
  """A tree of ``tree``'s shapes (arrays or ``ShapeDtypeStruct``) with ``shift + std * N(0, 1)`` numpy draws."""
  return jax.tree.map(lambda s: jnp.asarray(shift + std * rng.standard_normal(s.shape), s.dtype), tree)


@functools.lru_cache(maxsize=None)
def setup(tied: bool, head_lora: bool):
  """``(model, params, lora_eff, batch)``: random weights, a folded rank-3 LoRA, a padded batch.

  Weights are numpy draws on the shapes of ``init`` (``jax.eval_shape``), so
  setting up compiles no initialiser: params ``init + 0.3 N(0, 1)`` (norm scales
  ``1 + 0.3 N``), LoRA ``a`` of ``lora_lib.init``'s shapes ``~ 0.3 N``, ``b = 0.2 + 0.1 N``.
  """
  model = llama.Llama(config(tied))
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray((path[-1].key == "scale") + 0.3 * rng.standard_normal(s.shape), s.dtype),
      shapes)
  pattern = PATTERN + (r"|lm_head/kernel$" if head_lora else "")
  lora_shapes = jax.eval_shape(lambda p: lora_lib.init(jax.random.key(1), p, pattern, r_max=4), params)
  lora = lora_lib.map_modules(lambda m: {"a": _numpy_like(m["a"], rng, 0.3),
                                         "b": _numpy_like(m["b"], rng, 0.1, 0.2)}, lora_shapes)
  lora_eff = lora_lib.fold_scale(lora, jnp.int32(3), jnp.float32(2.0))
  b, l = 3, 14
  ids = jnp.asarray(rng.integers(0, model.config.vocab_size, (b, l)), jnp.int32)
  attention = np.ones((b, l), np.int32)
  attention[1, 9:] = 0        # right padding
  attention[2, :3] = 0        # left padding
  loss_mask = np.zeros((b, l), np.float32)
  loss_mask[0, 5:] = 1
  loss_mask[1, 2:] = 1
  loss_mask[2, 8:] = 1
  batch = {"input_ids": ids, "attention_mask": jnp.asarray(attention), "loss_mask": jnp.asarray(loss_mask),
           "mask": jnp.asarray([1.0, 1.0, 0.0])}
  return model, params, lora_eff, batch


CASES = [(True, False), (False, False), (False, True)]   # (tied head, LoRA on lm_head)


@pytest.mark.parametrize("tied,head_lora", CASES)
def test_head_logits_is_the_modules_head(tied, head_lora):
  model, params, lora_eff, batch = setup(tied, head_lora)

  @jax.jit
  def both(params, lora_eff, batch):
    var = llama.variables(params, lora_eff)
    logits = model.apply(var, batch["input_ids"], batch["attention_mask"])
    h = model.apply(var, batch["input_ids"], batch["attention_mask"], return_hidden=True)
    return logits, h, llama.head_logits(model, params, lora_eff, h)

  logits, h, from_hidden = both(params, lora_eff, batch)
  assert h.shape == batch["input_ids"].shape + (model.config.d_model,)
  np.testing.assert_allclose(from_hidden, logits, atol=1e-5)


def loss_and_grads(tied: bool, head_lora: bool, chunks: tuple[int, ...]):
  """Per chunk size: ``(per-example losses float32[B], grads of their sum w.r.t. the folded LoRA tree)``,
  all chunk sizes in one jitted program (one compilation)."""
  model, params, lora_eff, batch = setup(tied, head_lora)

  def one(chunk, l):
    loss_fn = lm_tasks.causal_lm_loss(model, chunk)
    grads, per = jax.grad(lambda l: (loss_fn(params, l, batch).sum(), loss_fn(params, l, batch)),
                          has_aux=True)(l)
    return per, grads

  return jax.jit(lambda l: [one(c, l) for c in chunks])(lora_eff)


@pytest.mark.parametrize("tied,head_lora", CASES)
def test_chunked_loss_and_grads_equal_full(tied, head_lora):
  # 3 x 13 = 39 target tokens: 8 chunks of 5, the last padded
  (per_full, g_full), (per, g) = loss_and_grads(tied, head_lora, (0, 5))
  assert per.shape == (3,) and per.dtype == jnp.float32
  np.testing.assert_allclose(per, per_full, rtol=1e-5, atol=1e-5)
  assert ("lm_head" in lora_lib.modules(g)) == head_lora
  for path, gf in lora_lib.modules(g_full).items():
    for name in ("a", "b"):
      assert np.abs(np.asarray(gf[name])).sum() > 0, (path, name)
      np.testing.assert_allclose(lora_lib.modules(g)[path][name], gf[name], rtol=1e-5, atol=1e-5,
                                 err_msg=f"{path}/{name}")


@pytest.mark.parametrize("tied,head_lora", CASES)
def test_eval_sums_chunked_equal_full(tied, head_lora):
  model, params, lora_eff, batch = setup(tied, head_lora)

  @jax.jit
  def sums_and_argmax(params, lora_eff, batch):   # one program for the four computations
    argmax = lambda c: lm_tasks.model_logprobs(model, params, lora_eff, batch, c, with_argmax=True)[1]
    return (llama_lm.eval_sums_fn(model, 0)(params, lora_eff, batch),
            llama_lm.eval_sums_fn(model, 5)(params, lora_eff, batch), argmax(5), argmax(0))

  full, chunked, argmax_chunked, argmax_full = sums_and_argmax(params, lora_eff, batch)
  for key in ("loss", "token_accuracy"):
    np.testing.assert_allclose(chunked[key], full[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert float(full["loss"][1]) == 9 + 7         # answer tokens of the two real examples (third: mask 0)
  np.testing.assert_array_equal(argmax_chunked, argmax_full)   # every position's prediction, not just the rare hits


def test_chunked_logprobs_doctest_and_errors():
  result = doctest.testmod(lm_tasks, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0 and result.attempted >= 2
  with pytest.raises(ValueError, match="chunk"):
    lm_tasks.causal_lm_loss(llama.Llama(config(True)), -1)
  model, params, _, _ = setup(True, False)
  ids = jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids"):
    model.apply({"params": params}, ids, None, llama.init_cache(model.config, 1, 4),
                segment_ids=jnp.ones((1, 2), jnp.int32), positions=jnp.zeros((1, 2), jnp.int32))


def test_return_hidden_with_cache():
  """With a cache, ``return_hidden`` gives ``(h, new_cache)``: the cache of the logits call and
  ``head_logits(h)`` equal to its logits."""
  model, params, lora_eff, batch = setup(False, True)
  var = llama.variables(params, lora_eff)
  ids, mask = batch["input_ids"][:, :6], batch["attention_mask"][:, :6]

  @jax.jit
  def both(var):
    cache = llama.init_cache(model.config, ids.shape[0], 8)
    logits, c1 = model.apply(var, ids, mask, cache)
    h, c2 = model.apply(var, ids, mask, cache, return_hidden=True)
    return logits, c1, h, c2, llama.head_logits(model, params, lora_eff, h)

  logits, c1, h, c2, from_hidden = both(var)
  assert h.shape == ids.shape + (model.config.d_model,)
  jax.tree.map(np.testing.assert_array_equal, c2, c1)
  np.testing.assert_allclose(from_hidden, logits, atol=1e-5)


def test_model_loss_chunk_config():
  assert llama_lm.loss_chunk_of(ml_collections.ConfigDict({"loss_chunk": None})) == lm_tasks.DEFAULT_CHUNK
  assert llama_lm.loss_chunk_of(ml_collections.ConfigDict({"loss_chunk": 0})) == 0
  with pytest.raises(ValueError, match=r"model\.loss_chunk"):
    llama_lm.loss_chunk_of(ml_collections.ConfigDict({"loss_chunk": -3}))


def _grad_temp_bytes(model, params, lora_eff, batch, chunk):
  loss_fn = lm_tasks.causal_lm_loss(model, chunk)
  grad = jax.jit(jax.grad(lambda l: loss_fn(params, l, batch).mean()))
  return grad.lower(lora_eff).compile().memory_analysis().temp_size_in_bytes


def test_chunked_grad_compiles_to_less_temp_memory():
  """``V = 8192``, ``L = 256``, ``D = 32``: one ``[B, L, V]`` float32 buffer is 16 MiB, the model ~0.1 MiB."""
  model = llama.Llama(config(True, vocab=8192, d=32, layers=1))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  lora_eff = lora_lib.init(jax.random.key(1), params, PATTERN, r_max=4)
  b, l = 2, 256
  batch = {"input_ids": jnp.zeros((b, l), jnp.int32), "attention_mask": jnp.ones((b, l), jnp.int32),
           "loss_mask": jnp.ones((b, l), jnp.float32)}
  logits_bytes = b * l * 8192 * 4
  full = _grad_temp_bytes(model, params, lora_eff, batch, 0)
  chunked = _grad_temp_bytes(model, params, lora_eff, batch, 32)
  assert full >= logits_bytes                  # the full path holds at least one [B, L, V] buffer
  assert chunked < logits_bytes                # the chunked one never does (measured: 54.5 vs 9.7 MiB)
  assert chunked < full / 4, (full, chunked)
