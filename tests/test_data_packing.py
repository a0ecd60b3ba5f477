"""Tests for hetlora.data.packing."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetlora import data


def make_columns(n, length=3):
  """Columns whose rows identify the example: input_ids[i] = i + 1 (so padding, 0, is distinguishable)."""
  ids = np.repeat(np.arange(1, n + 1, dtype=np.int32)[:, None], length, axis=1)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "label": np.arange(n, dtype=np.int32) % 3}


def client_sets(sizes, seed=0):
  perm = np.random.default_rng(seed).permutation(sum(sizes))
  return np.split(perm, np.cumsum(sizes)[:-1])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6), batch=st.integers(1, 8),
       epochs=st.sampled_from([1, 2, 3, 0.5, 1.5]), seed=st.integers(0, 100), rnd=st.integers(0, 5))
def test_epoch_packing_invariants(sizes, batch, epochs, seed, rnd):
  n = sum(sizes)
  cols = make_columns(n)
  clients = client_sets(sizes, seed)
  out = data.pack_cohort(cols, clients, batch, local_epochs=epochs, seed=seed, round_idx=rnd)
  k = len(sizes)
  steps = max(math.ceil(math.ceil(s * epochs) / batch) for s in sizes)
  assert out["input_ids"].shape == (k, steps, batch, 3)
  assert out["label"].shape == out["mask"].shape == (k, steps, batch)
  assert out["mask"].dtype == np.float32 and out["num_examples"].dtype == np.float32
  np.testing.assert_array_equal(out["num_examples"], sizes)
  for j, (size, idx) in enumerate(zip(sizes, clients)):
    mask = out["mask"][j].reshape(-1)
    seen = out["input_ids"][j, :, :, 0].reshape(-1)
    # Mask counts exactly the examples seen; real slots come first, padding after.
    assert mask.sum() == math.ceil(size * epochs)
    assert np.all(mask[:int(mask.sum())] == 1) and np.all(mask[int(mask.sum()):] == 0)
    # Padding is zero and never an example; real slots only hold this client's examples.
    assert np.all(seen[mask == 0] == 0)
    assert set((seen[mask == 1] - 1).tolist()) <= set(idx.tolist())
    # Each full epoch visits every example exactly once.
    for e in range(int(epochs)):
      epoch = np.sort(seen[e * size:(e + 1) * size] - 1)
      np.testing.assert_array_equal(epoch, np.sort(idx))


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=5), batch=st.integers(1, 8),
       steps=st.integers(1, 6), seed=st.integers(0, 100))
def test_fixed_steps_cycles_data(sizes, batch, steps, seed):
  cols = make_columns(sum(sizes))
  clients = client_sets(sizes, seed)
  out = data.pack_cohort(cols, clients, batch, local_steps=steps, seed=seed)
  assert out["mask"].shape == (len(sizes), steps, batch)
  assert np.all(out["mask"] == 1)
  for j, (size, idx) in enumerate(zip(sizes, clients)):
    seen = out["input_ids"][j, :, :, 0].reshape(-1) - 1
    assert set(seen.tolist()) <= set(idx.tolist())
    passes = steps * batch // size
    counts = np.bincount(seen, minlength=sum(sizes))[idx]
    assert counts.min() >= passes and counts.max() <= passes + 1


def test_determinism_and_per_client_seeding():
  cols = make_columns(60)
  clients = client_sets([10, 20, 30])
  kw = dict(local_epochs=2, seed=7, round_idx=3, client_ids=[4, 9, 2])
  a = data.pack_cohort(cols, clients, 4, **kw)
  b = data.pack_cohort(cols, clients, 4, **kw)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  c = data.pack_cohort(cols, clients, 4, **{**kw, "round_idx": 4})
  assert not np.array_equal(a["input_ids"], c["input_ids"])
  # A client's stream depends on its id, not its cohort position.
  solo = data.pack_cohort(cols, [clients[1]], 4, local_epochs=2, seed=7, round_idx=3, client_ids=[9])
  np.testing.assert_array_equal(solo["input_ids"][0], a["input_ids"][1, :solo["input_ids"].shape[1]])
  # Consecutive epochs use different shuffles (overwhelmingly likely for 30 examples).
  ids = a["input_ids"][2, :, :, 0].reshape(-1)
  assert not np.array_equal(ids[:30], ids[30:60])


def test_small_client_is_padded_not_dropped():
  cols = make_columns(13)
  out = data.pack_cohort(cols, [np.arange(12), np.array([12])], 4, local_epochs=1)
  assert out["mask"].shape == (2, 3, 4)
  np.testing.assert_array_equal(out["mask"][1], [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
  assert out["input_ids"][1, 0, 0, 0] == 13
  np.testing.assert_array_equal(out["num_examples"], [12, 1])


def test_pad_steps_to_and_epoch_steps():
  cols = make_columns(20)
  clients = [np.arange(5), np.arange(5, 20)]
  assert data.epoch_steps([5, 15, 40], 4, 1) == 10
  assert data.epoch_steps([10], 3, 0.3) == 1  # ceil(10 * 0.3) = 3 despite float round-off.
  out = data.pack_cohort(cols, clients, 4, local_epochs=1, pad_steps_to=10)
  assert out["mask"].shape == (2, 10, 4)
  np.testing.assert_array_equal(out["mask"].sum((1, 2)), [5, 15])
  with pytest.raises(ValueError, match="pad_steps_to=2 is below the 4 steps"):
    data.pack_cohort(cols, clients, 4, local_epochs=1, pad_steps_to=2)


def test_packing_errors_name_fields():
  cols = make_columns(4)
  clients = [np.arange(4)]
  with pytest.raises(ValueError, match="exactly one of config.client.local_epochs and config.client.local_steps"):
    data.pack_cohort(cols, clients, 2)
  with pytest.raises(ValueError, match="exactly one"):
    data.pack_cohort(cols, clients, 2, local_epochs=1, local_steps=3)
  with pytest.raises(ValueError, match="client.batch_size=0"):
    data.pack_cohort(cols, clients, 0, local_epochs=1)
  with pytest.raises(ValueError, match="client.local_epochs=0"):
    data.pack_cohort(cols, clients, 2, local_epochs=0)
  with pytest.raises(ValueError, match="positions \\[1\\] have no examples"):
    data.pack_cohort(cols, [np.arange(4), np.array([], np.int64)], 2, local_epochs=1)
  with pytest.raises(ValueError, match="client_ids has shape"):
    data.pack_cohort(cols, clients, 2, local_epochs=1, client_ids=[1, 2])


def test_eval_batches_cover_once_with_padding():
  cols = make_columns(10)
  got = list(data.batches(cols, 4))
  assert len(got) == 3
  assert all(b["input_ids"].shape == (4, 3) and b["mask"].shape == (4,) for b in got)
  np.testing.assert_array_equal(got[-1]["mask"], [1, 1, 0, 0])
  np.testing.assert_array_equal(got[-1]["input_ids"][2:], 0)
  seen = np.concatenate([b["label"][b["mask"] == 1] for b in got])
  np.testing.assert_array_equal(seen, cols["label"])
  sub = list(data.batches(cols, 3, indices=np.array([7, 2])))
  assert len(sub) == 1
  np.testing.assert_array_equal(sub[0]["input_ids"][:, 0], [8, 3, 0])
  assert sum(b["mask"].sum() for b in data.batches(cols, 3)) == 10
