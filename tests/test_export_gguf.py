"""The GGUF LoRA adapter file (``hetlora.export.gguf``), read back with ``gguf.GGUFReader``.

Checks the format llama.cpp's adapter loader expects (metadata, tensor names,
ggml shapes, types), the Q/K row order against an index-by-index reference,
and that llama.cpp's update ``(alpha / r) * lora_b @ lora_a`` equals ours.
Running the file in llama.cpp is ``benchmarks/llamacpp_roundtrip.py``.
"""

import dataclasses
import json

import gguf
import numpy as np
import pytest

from hetlora.export import Adapter
from hetlora.export import gguf as gguf_export
from hetlora.models import testing

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 32, 4, 2, 64, 2, 256
HD = HIDDEN // HEADS
ALPHA, R_MAX = 16.0, 4
SHAPES = {"attn/q_proj": (HIDDEN, HEADS * HD), "attn/k_proj": (HIDDEN, KV_HEADS * HD),
          "attn/v_proj": (HIDDEN, KV_HEADS * HD), "attn/o_proj": (HEADS * HD, HIDDEN),
          "mlp/gate_proj": (HIDDEN, FFN), "mlp/up_proj": (HIDDEN, FFN), "mlp/down_proj": (FFN, HIDDEN)}
GGUF_ROLE = {"attn/q_proj": "attn_q", "attn/k_proj": "attn_k", "attn/v_proj": "attn_v",
             "attn/o_proj": "attn_output", "mlp/gate_proj": "ffn_gate", "mlp/up_proj": "ffn_up",
             "mlp/down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
  return testing.write_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden=HIDDEN, heads=HEADS,
                                  kv_heads=KV_HEADS, ffn=FFN, layers=LAYERS, vocab_size=VOCAB)


def make_adapter(model_name, **changes) -> Adapter:
  """Random factors on every projection plus the untied head; ranks 1..R_MAX; ``alpha / r_max`` scales."""
  rng = np.random.default_rng(0)
  shapes = {f"layers_{i}/{m}": s for i in range(LAYERS) for m, s in SHAPES.items()}
  shapes["lm_head"] = (HIDDEN, VOCAB)
  modules = {p: {"a": rng.normal(size=(d_in, R_MAX)).astype(np.float32),
                 "b": rng.normal(size=(R_MAX, d_out)).astype(np.float32)}
             for p, (d_in, d_out) in shapes.items()}
  ranks = {p: 1 + k % R_MAX for k, p in enumerate(modules)}
  fields = dict(modules=modules, ranks=ranks, scales={p: ALPHA / R_MAX for p in modules},
                scale_rule="alpha/r_max", alpha=ALPHA, r_max=R_MAX, model_kind="llama_lm",
                model_name=str(model_name))
  fields.update(changes)
  return Adapter(**fields)


def gguf_name(path: str) -> str:
  if path == "lm_head":
    return "output.weight"
  layer, module = path.split("/", 1)
  return f"blk.{layer.removeprefix('layers_')}.{GGUF_ROLE[module]}.weight"


def hf_to_gguf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Reference, index by index: HF row ``h*hd + j*hd/2 + i`` goes to GGUF row ``h*hd + 2i + j``."""
  hd = w.shape[0] // n_heads
  out = np.empty_like(w)
  for h in range(n_heads):
    for j in range(2):
      for i in range(hd // 2):
        out[h * hd + 2 * i + j] = w[h * hd + j * hd // 2 + i]
  return out


def read(path):
  reader = gguf.GGUFReader(path)
  meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  return reader, meta, {t.name: t for t in reader.tensors}


def test_metadata_names_shapes_types(base_dir, tmp_path):
  adapter = make_adapter(base_dir)
  paths = gguf_export.export(adapter, tmp_path / "out")
  assert paths == [tmp_path / "out" / "adapter.gguf"]
  reader, meta, tensors = read(paths[0])
  assert meta["general.type"] == "adapter"
  assert meta["general.architecture"] == "llama"
  assert meta["adapter.type"] == "lora"
  assert meta["adapter.lora.alpha"] == ALPHA
  assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
  expected = {gguf_name(p) + s for p in adapter.modules for s in (".lora_a", ".lora_b")}
  assert set(tensors) == expected
  for path, mod in adapter.modules.items():
    r, (d_in, d_out) = adapter.ranks[path], (mod["a"].shape[0], mod["b"].shape[1])
    ta, tb = tensors[gguf_name(path) + ".lora_a"], tensors[gguf_name(path) + ".lora_b"]
    assert [int(d) for d in ta.shape] == [d_in, r]                  # ggml ne: innermost first
    assert [int(d) for d in tb.shape] == [r, d_out]
    assert ta.tensor_type == tb.tensor_type == gguf.GGMLQuantizationType.F32


def test_values_permutation_and_llamacpp_scale(base_dir, tmp_path):
  adapter = make_adapter(base_dir)
  _, _, tensors = read(gguf_export.export(adapter, tmp_path)[0])
  for path, mod in adapter.modules.items():
    r, s = adapter.ranks[path], adapter.scales[path]
    lora_a = np.asarray(tensors[gguf_name(path) + ".lora_a"].data)     # [r, d_in]
    lora_b = np.asarray(tensors[gguf_name(path) + ".lora_b"].data)     # [d_out, r]
    heads = {"attn/q_proj": HEADS, "attn/k_proj": KV_HEADS}.get(path.split("/", 1)[-1])
    b_t = mod["b"][:r].T
    expected_b = hf_to_gguf_rows(b_t, heads) if heads else b_t
    np.testing.assert_array_equal(lora_b, expected_b)
    # llama.cpp's update of the GGUF weight: (alpha / r) * lora_b @ lora_a, rows in GGUF order.
    ours = s * (mod["a"][:, :r].astype(np.float64) @ mod["b"][:r]).T          # [d_out, d_in]
    if heads:
      ours = hf_to_gguf_rows(ours, heads)
    np.testing.assert_allclose(ALPHA / r * lora_b.astype(np.float64) @ lora_a, ours,
                               rtol=1e-5, atol=1e-5)


def test_alpha_over_r_writes_factors_as_trained(base_dir, tmp_path):
  adapter = make_adapter(base_dir)
  adapter = make_adapter(base_dir, scale_rule="alpha/r",
                         scales={p: ALPHA / r for p, r in adapter.ranks.items()})
  _, _, tensors = read(gguf_export.export(adapter, tmp_path)[0])
  for path, mod in adapter.modules.items():
    r = adapter.ranks[path]
    np.testing.assert_allclose(tensors[gguf_name(path) + ".lora_a"].data, mod["a"][:, :r].T, rtol=1e-6)


def test_qwen2_base_is_not_permuted(base_dir, tmp_path):
  qwen = tmp_path / "qwen"
  qwen.mkdir()
  hf = json.loads((base_dir / "config.json").read_text())
  (qwen / "config.json").write_text(json.dumps({**hf, "model_type": "qwen2"}))
  adapter = make_adapter(qwen)
  _, meta, tensors = read(gguf_export.export(adapter, tmp_path / "out")[0])
  assert meta["general.architecture"] == "qwen2"
  mod = adapter.modules["layers_0/attn/q_proj"]
  np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_b"].data, mod["b"][:1].T)


def write_gguf_base(path, tied: bool):
  """A GGUF with the metadata export reads; ``output.weight`` (the untied head) unless ``tied``."""
  w = gguf.GGUFWriter(path, "llama")
  w.add_block_count(LAYERS)
  w.add_head_count(HEADS)
  w.add_head_count_kv(KV_HEADS)
  w.add_tensor("token_embd.weight", np.zeros((VOCAB, HIDDEN), np.float32))
  if not tied:
    w.add_tensor("output.weight", np.zeros((VOCAB, HIDDEN), np.float32))
  w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
  return path


def test_gguf_base_model(tmp_path):
  base = write_gguf_base(tmp_path / "base.gguf", tied=False)
  facts = gguf_export.BaseFacts("llama", LAYERS, HEADS, KV_HEADS, tied_head=False)
  assert gguf_export.base_facts(base) == facts
  adapter = make_adapter(base)
  _, _, tensors = read(gguf_export.export(adapter, tmp_path / "out")[0])
  b_t = adapter.modules["layers_1/attn/k_proj"]["b"][:adapter.ranks["layers_1/attn/k_proj"]].T
  np.testing.assert_array_equal(tensors["blk.1.attn_k.weight.lora_b"].data, hf_to_gguf_rows(b_t, KV_HEADS))


def with_module(adapter, path, **changes):
  """``adapter`` with ``changes[field]`` set as module ``path``'s entry of each field."""
  return dataclasses.replace(adapter, **{k: {**getattr(adapter, k), path: v} for k, v in changes.items()})


@pytest.mark.parametrize("change, match", [
    ("kind", "model.kind='llama_lm'"),
    ("alpha0", "lora.alpha=0.0"),
    ("extra", "Adapter.extra"),
    ("rank0", "rank 0 must be an integer in \\[1, r_max=4\\]"),
    ("rank5", "rank 5 must be an integer in \\[1, r_max=4\\]"),
    ("embedding", "'embed_tokens' is no Llama projection"),
    ("layer9", "the base model has 2 layers"),
    ("nan", "NaN or inf"),
])
def test_refusals(base_dir, tmp_path, change, match):
  adapter, v = make_adapter(base_dir), "layers_0/attn/v_proj"
  bad = {
      "kind": lambda: dataclasses.replace(adapter, model_kind="bert_classifier"),
      "alpha0": lambda: dataclasses.replace(adapter, alpha=0.0),
      "extra": lambda: dataclasses.replace(adapter, extra={"head/kernel": np.zeros(2)}),
      "rank0": lambda: with_module(adapter, v, ranks=0),
      "rank5": lambda: with_module(adapter, v, ranks=5),
      "embedding": lambda: with_module(adapter, "embed_tokens", modules=adapter.modules[v],
                                       ranks=1, scales=1.0),
      "layer9": lambda: with_module(adapter, "layers_9/attn/v_proj", modules=adapter.modules[v],
                                    ranks=1, scales=1.0),
      "nan": lambda: with_module(adapter, v, modules={"a": adapter.modules[v]["a"] * np.nan,
                                                     "b": adapter.modules[v]["b"]}),
  }[change]()
  with pytest.raises(ValueError, match=match):
    gguf_export.export(bad, tmp_path)
  assert not list(tmp_path.iterdir())


def test_untied_head_is_output_weight_unpermuted(base_dir, tmp_path):
  # llama.cpp adapts the untied head through build_lora_mm(model.output, ...): lora_a [r, D], lora_b [V, r].
  adapter = make_adapter(base_dir)
  assert gguf_export.base_facts(base_dir).tied_head is False
  _, _, tensors = read(gguf_export.export(adapter, tmp_path)[0])
  r, s, mod = adapter.ranks["lm_head"], adapter.scales["lm_head"], adapter.modules["lm_head"]
  ta, tb = tensors["output.weight.lora_a"], tensors["output.weight.lora_b"]
  assert [int(d) for d in ta.shape] == [HIDDEN, r] and [int(d) for d in tb.shape] == [r, VOCAB]
  np.testing.assert_array_equal(tb.data, mod["b"][:r].T)
  np.testing.assert_allclose(ALPHA / r * np.asarray(tb.data, np.float64) @ ta.data,
                             s * (mod["a"][:, :r].astype(np.float64) @ mod["b"][:r]).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_tied_head_base_refuses_lm_head(tmp_path, source, base_dir):
  if source == "gguf":
    base = write_gguf_base(tmp_path / "tied.gguf", tied=True)
  else:
    base = tmp_path / "tied_hf"
    base.mkdir()
    hf = json.loads((base_dir / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
  assert gguf_export.base_facts(base).tied_head is True
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="module 'lm_head': the base model ties its LM head.*no output.weight"):
    gguf_export.export(make_adapter(base), out)
  assert not out.exists()
  adapter = make_adapter(base)
  body = {p: v for p, v in adapter.modules.items() if p != "lm_head"}
  paths = gguf_export.export(dataclasses.replace(adapter, modules=body), out)   # the rest exports as before
  assert not any(t.startswith("output.") for t in read(paths[0])[2])
