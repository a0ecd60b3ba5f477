"""The row stream: a client's packed rows one at a time give the packed step's updates.

Host layout against a hand-made packing, then local training on the tiny BERT
(HetLoRA's penalty and pruning, a trained dense head) and the tiny Llama
(FFA-LoRA, ``b`` only): factors, dense parameters, ranks, losses and example
counts equal the packed steps' within 1e-5; and one federated round equals it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hetlora import client, data
from hetlora import lora as lora_lib
from hetlora.data import row_stream, segments
from hetlora.data.sources import PromptDataset, TextDataset
from hetlora.methods import ffa_lora, hetlora

from test_sequence_packing import PROMPTS, TEXTS, load, random_lora, token_columns

TOL = 1e-5


def test_stream_lays_out_non_empty_rows_in_step_order():
  cols = token_columns([10, 3, 7, 9, 2, 0], width=12)
  # client 0: step 0 packs {10}, {3, 7} -> 2 rows, {9, 2}: 1 row; client 1: one padding step, then 1 row
  slots = np.array([[[0, 1, 2], [3, 4, -1]], [[-1, -1, -1], [4, 1, -1]]])
  rows = segments.rows_needed(cols, slots)
  assert rows == 2
  packed = data.packing.gather(cols, slots, rows)
  mask = packed.pop("mask")
  assert row_stream.rows_per_step(cols, slots).tolist() == [[2, 1], [0, 1]]
  length = row_stream.stream_length(cols, slots)
  assert length == 3
  out = row_stream.to_stream({"batch": packed, "mask": mask}, length + 1)     # one padding row
  assert set(out["stream"]["tokens"]) == {"input_ids", "segment_ids", "positions"}
  assert out["stream"]["tokens"]["input_ids"].shape == (2, 4, 1, 12)
  assert out["batch"]["label"].shape == (2, 2, 3) and "input_ids" not in out["batch"]
  assert out["stream"]["step"].tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
  assert out["stream"]["ends"].tolist() == [[False, True, True, False], [True, False, False, False]]
  np.testing.assert_array_equal(out["stream"]["tokens"]["segment_ids"][0, :2, 0],
                                packed["segment_ids"][0, 0])
  np.testing.assert_array_equal(out["stream"]["tokens"]["input_ids"][1, 0, 0], packed["input_ids"][1, 1, 0])
  assert not out["stream"]["tokens"]["segment_ids"][0, 3].any()                  # the padding row is empty
  with pytest.raises(ValueError, match="stream_length"):
    row_stream.to_stream({"batch": packed, "mask": mask}, 2)
  with pytest.raises(ValueError, match="data.packing=True"):
    row_stream.to_stream({"batch": data.packing.gather(cols, slots), "mask": mask}, 3)


def _both(cols, slots):
  """Packed steps and their row stream, for ``slots: int[K, steps, B]``."""
  packed = data.packing.gather(cols, slots, segments.rows_needed(cols, slots))
  mask = packed.pop("mask")
  steps = {"batch": packed, "mask": mask}
  return steps, row_stream.to_stream(steps, row_stream.stream_length(cols, slots))


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _train_both(spec, base, lora, ranks, steps, stream):
  train = client.vmap_backend(spec)
  k = ranks.shape[0]
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), lora)
  return train(base, stacked, ranks, steps), train(base, stacked, ranks, stream)


def test_tiny_bert_stream_equals_packed_steps_with_penalty_pruning_and_a_trained_head(tiny_model_dirs):
  loaded = load("bert_classifier", tiny_model_dirs["bert_classifier"])
  cols = loaded.prepare(TextDataset(TEXTS, [0, 1, 2, 0, 1, 2, 0, 1], ["a", "b", "c"]))
  slots = np.array([[[3, 0, 5, 1], [6, 2, 7, -1], [-1, -1, -1, -1]],      # a padding step: no update
                    [[1, 4, -1, -1], [0, 3, 5, 7], [2, 6, 4, 1]]])
  steps, stream = _both(cols, slots)
  assert stream["stream"]["step"].shape[1] < 3 * steps["batch"]["input_ids"].shape[2]   # fewer rows computed
  spec = client.LocalSpec(loaded.loss_fn, optax.adamw(5e-2), alpha=8.0,
                          local=hetlora.local(lam=1.0, gamma=0.5, prune=True, r_min=1),
                          dense=r"^classifier/(kernel|bias)$")
  a, b = _train_both(spec, loaded.base_params, random_lora(loaded, "bert_classifier"), jnp.array([4, 3]),
                     steps, stream)
  assert _max_diff(a.lora, random_lora(loaded, "bert_classifier")) > 1e-2       # it trained
  np.testing.assert_array_equal(a.rank, b.rank)
  np.testing.assert_array_equal(a.examples, b.examples)
  diff = _max_diff((a.lora, a.dense, a.loss, a.update_norm), (b.lora, b.dense, b.loss, b.update_norm))
  print(f"tiny BERT: max |packed steps - row stream| {diff:.2e}")
  assert diff < TOL, diff


def test_tiny_llama_stream_equals_packed_steps_training_b_only(tiny_model_dirs):
  loaded = load("llama_lm", tiny_model_dirs["llama_lm"], loss_chunk=32, prompt_format="plain")
  cols = loaded.prepare(PromptDataset(*PROMPTS, [0, 1, 2, 0, 3, 1], ["add", "repeat", "yes", "colour"]))
  slots = np.array([[[4, 0, -1], [2, 5, 1]], [[3, 3, 1], [0, -1, -1]]])
  steps, stream = _both(cols, slots)
  spec = client.LocalSpec(loaded.loss_fn, optax.adamw(5e-2), alpha=8.0, local=ffa_lora.make().local)
  lora = random_lora(loaded, "llama_lm")
  a, b = _train_both(spec, loaded.base_params, lora, jnp.array([4, 2]), steps, stream)
  np.testing.assert_array_equal(a.examples, b.examples)
  diff = _max_diff((a.lora, a.loss), (b.lora, b.loss))
  print(f"tiny Llama: max |packed steps - row stream| {diff:.2e}")
  assert diff < TOL, diff
  for k, r in enumerate([4, 2]):                 # FFA-LoRA: ``a`` stays as it started (masked to the rank)
    trained = jax.tree.map(lambda x: x[k], b.lora)
    for path, mod in lora_lib.modules(trained).items():
      np.testing.assert_array_equal(mod["a"], lora_lib.modules(lora_lib.mask(lora, jnp.int32(r)))[path]["a"])
