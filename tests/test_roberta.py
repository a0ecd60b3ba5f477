"""RoBERTa through the BERT-family encoder: loading, position ids, tokenizer, errors.

The reference is a plain-numpy forward of the checkpoint's tensors under their
Hugging Face names, numbering positions as ``transformers``'
``create_position_ids_from_input_ids`` does (``cumsum(ids != pad) + pad`` on
real tokens). transformers itself is the consumer in
``benchmarks/peft_roundtrip.py`` (case ``tiny-roberta``).
"""

import math

import jax
import ml_collections
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hetlora.models import bert, bert_classifier, bert_loading, testing, tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory):
  return testing.write_tiny_roberta(tmp_path_factory.mktemp("roberta"))


def _layer_norm(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _reference(t, hf, ids, mask):
  """RobertaModel's last_hidden_state in numpy: ``[B, L] -> [B, L, H]``."""
  pad, eps, heads = hf["pad_token_id"], hf["layer_norm_eps"], hf["num_attention_heads"]
  positions = np.cumsum(ids != pad, axis=1) * (ids != pad) + pad
  x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][positions]
       + t["embeddings.token_type_embeddings.weight"][0])
  x = _layer_norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"], eps)
  lin = lambda h, name: h @ t[name + ".weight"].T + t[name + ".bias"]
  b, l, d = x.shape
  dh = d // heads
  for i in range(hf["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(x, p + f"attention.self.{n}").reshape(b, l, heads, dh) for n in ("query", "key", "value"))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    scores = np.where(mask[:, None, None, :] > 0, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, d)
    x = _layer_norm(x + lin(ctx, p + "attention.output.dense"), t[p + "attention.output.LayerNorm.weight"],
                    t[p + "attention.output.LayerNorm.bias"], eps)
    h = lin(_gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
    x = _layer_norm(x + h, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"], eps)
  return x


def test_roberta_matches_the_numpy_reference_with_shifted_positions(roberta_dir):
  config, params = bert_loading.load_bert(roberta_dir)
  assert (config.position_offset, config.max_tokens, config.type_vocab_size) == (2, 64, 1)
  tok = tokenizer_lib.load_tokenizer(roberta_dir, max_len=16)
  enc = tokenizer_lib.encode(tok, ["hello roberta", "a much longer sentence here"], max_len=16)
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert ids[0, 0] == 0 and ids[0, mask[0].sum() - 1] == 2 and ids[0, -1] == 1   # <s> .. </s> <pad>
  ours = np.asarray(bert.BertModel(config).apply({"params": params}, ids, mask))
  hf = __import__("json").loads((roberta_dir / bert_loading.CONFIG_FILE).read_text())
  want = _reference(load_file(str(roberta_dir / bert_loading.WEIGHTS_FILE)), hf, ids, mask)
  np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5)   # padding too
  real = mask.astype(bool)
  # The offset matters: the same weights read as BERT (positions from 0) give other states.
  as_bert = bert.BertConfig(**{**config.__dict__, "position_offset": 0})
  unshifted = np.asarray(bert.BertModel(as_bert).apply({"params": params}, ids, mask))
  assert np.max(np.abs(unshifted[real] - want[real])) > 1e-2


def test_task_checkpoints_under_roberta_prefix_load_the_same(roberta_dir, tmp_path):
  tensors = load_file(str(roberta_dir / bert_loading.WEIGHTS_FILE))
  save_file({"roberta." + k: v for k, v in tensors.items()} | {"classifier.dense.weight": np.zeros((2, 2))},
            str(tmp_path / bert_loading.WEIGHTS_FILE))
  (tmp_path / bert_loading.CONFIG_FILE).write_text((roberta_dir / bert_loading.CONFIG_FILE).read_text())
  _, want = bert_loading.load_bert(roberta_dir)
  _, got = bert_loading.load_bert(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert bert_loading.flax_module_path("roberta.encoder.layer.1.attention.self.value") == \
      "encoder/layer_1/attention/value"


def test_the_classifier_provider_refuses_lengths_past_the_reserved_positions(roberta_dir):
  cfg = ml_collections.ConfigDict({"name": str(roberta_dir), "max_len": 65, "dtype": "float32",
                                   "pooling": "mean"})
  with pytest.raises(ValueError, match="max_len"):
    bert_classifier.load(cfg, num_labels=3, key=jax.random.key(0))
  cfg.max_len = 64
  loaded = bert_classifier.load(cfg, num_labels=3, key=jax.random.key(0))
  assert loaded.config.position_offset == 2
