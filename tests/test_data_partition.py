"""Tests for hetlora.data.partition."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetlora import data

BANKING77 = Path(__file__).resolve().parents[2] / "shared" / "data" / "banking77"


def assert_valid(parts, n):
  """Independent check: disjoint, complete, non-empty, int index arrays."""
  assert all(len(p) > 0 for p in parts)
  flat = np.concatenate(parts)
  assert flat.size == n
  np.testing.assert_array_equal(np.sort(flat), np.arange(n))
  data.validate_partition(parts, n)


labels_strategy = st.lists(st.integers(0, 5), min_size=1, max_size=300).map(np.asarray)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_iid_invariants(n, k, seed):
  if k > n:
    with pytest.raises(ValueError, match="data.num_clients"):
      data.iid(n, k, seed)
    return
  parts = data.iid(n, k, seed)
  assert len(parts) == k
  assert_valid(parts, n)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(labels=labels_strategy, k=st.integers(1, 10), alpha=st.floats(0.05, 100.0),
       min_size=st.integers(1, 5), seed=st.integers(0, 1000))
def test_dirichlet_invariants(labels, k, alpha, min_size, seed):
  n = len(labels)
  try:
    parts = data.dirichlet(labels, k, alpha, seed=seed, min_size=min_size)
  except ValueError as e:
    # Only infeasible or unlucky settings may fail, and the message names the fields.
    assert "data." in str(e)
    return
  assert len(parts) == k
  assert_valid(parts, n)
  assert min(len(p) for p in parts) >= min_size


@settings(max_examples=60, deadline=None)
@given(labels=labels_strategy, k=st.integers(1, 10), spc=st.integers(1, 4), seed=st.integers(0, 1000))
def test_shards_invariants(labels, k, spc, seed):
  n = len(labels)
  if k * spc > n:
    with pytest.raises(ValueError, match="data."):
      data.shards(labels, k, spc, seed)
    return
  parts = data.shards(labels, k, spc, seed)
  assert len(parts) == k
  assert_valid(parts, n)


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.sampled_from(["u1", "u2", "w", "z"]), min_size=1, max_size=100))
def test_natural_invariants(keys):
  parts = data.natural(keys)
  distinct = sorted(set(keys))
  assert len(parts) == len(distinct)
  assert_valid(parts, len(keys))
  for key, p in zip(distinct, parts):
    assert all(keys[i] == key for i in p)


def test_determinism_and_seed_dependence():
  labels = np.repeat(np.arange(10), 50)
  a = data.dirichlet(labels, 8, 0.3, seed=1, min_size=5)
  b = data.dirichlet(labels, 8, 0.3, seed=1, min_size=5)
  c = data.dirichlet(labels, 8, 0.3, seed=2, min_size=5)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_small_alpha_skews_labels():
  labels = np.repeat(np.arange(10), 200)
  skewed = data.client_stats(data.dirichlet(labels, 10, 0.05, seed=0, min_size=1), labels, 10)
  uniform = data.client_stats(data.dirichlet(labels, 10, 1000.0, seed=0, min_size=1), labels, 10)
  assert skewed.top_class_share.mean() > 0.5
  assert uniform.top_class_share.mean() < 0.15
  assert skewed.classes_per_client.mean() < uniform.classes_per_client.mean()
  assert uniform.classes_per_client.min() == 10


def test_shards_give_few_classes_per_client():
  labels = np.repeat(np.arange(10), 100)
  stats = data.client_stats(data.shards(labels, 10, 2, seed=0), labels, 10)
  assert stats.classes_per_client.max() <= 2 * 2  # A shard spans at most 2 classes here.
  np.testing.assert_array_equal(stats.sizes, np.full(10, 100))


def test_client_stats_exact():
  labels = np.array([0, 1, 1, 2, 2, 2])
  stats = data.client_stats([np.array([0, 3]), np.array([1, 2, 4, 5])], labels, num_classes=4)
  np.testing.assert_array_equal(stats.sizes, [2, 4])
  np.testing.assert_array_equal(stats.histograms, [[1, 0, 1, 0], [0, 2, 2, 0]])
  np.testing.assert_array_equal(stats.classes_per_client, [2, 2])
  np.testing.assert_allclose(stats.top_class_share, [0.5, 0.5])
  report = data.format_stats(stats, label_names=["a", "b", "c", "d"])
  assert report.startswith("2 clients, 6 examples; size min/median/max 2/3/4")
  assert "client    1:      4 examples,   2 classes" in report


def test_errors_name_field_and_fix():
  labels = np.repeat(np.arange(3), 10)
  with pytest.raises(ValueError, match=r"data.dirichlet_alpha=0 must be > 0; set config.data.dirichlet_alpha"):
    data.dirichlet(labels, 3, 0)
  with pytest.raises(ValueError, match=r"data.dirichlet_alpha=-1"):
    data.dirichlet(labels, 3, -1.0)
  with pytest.raises(ValueError, match=r"data.num_clients=31 exceeds the 30 examples.*lower config.data.num_clients"):
    data.iid(30, 31)
  with pytest.raises(ValueError, match=r"data.num_clients=0 must be >= 1"):
    data.shards(labels, 0)
  with pytest.raises(ValueError, match=r"min_client_size=11 times data.num_clients=3 exceeds"):
    data.dirichlet(labels, 3, 1.0, min_size=11)
  with pytest.raises(ValueError, match=r"after 2 draws.*raise config.data.dirichlet_alpha"):
    data.dirichlet(np.repeat(np.arange(2), 50), 10, 0.01, min_size=10, max_tries=2)
  with pytest.raises(ValueError, match="empty"):
    data.validate_partition([np.array([0, 1]), np.array([], np.int64)], 2)
  with pytest.raises(ValueError, match="not disjoint"):
    data.validate_partition([np.array([0, 1]), np.array([1])], 2)
  with pytest.raises(ValueError, match="incomplete"):
    data.validate_partition([np.array([0])], 2)


def test_make_partition_dispatch():
  labels = np.repeat(np.arange(4), 25)
  a = data.make_partition("dirichlet", labels=labels, num_clients=4, seed=3, alpha=0.5, min_size=2)
  b = data.dirichlet(labels, 4, 0.5, seed=3, min_size=2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert len(data.make_partition("natural", keys=labels)) == 4
  assert len(data.make_partition("iid", labels=labels, num_clients=7)) == 7
  with pytest.raises(ValueError, match=r"unknown partition 'lda'.*'dirichlet'"):
    data.make_partition("lda", labels=labels, num_clients=2)


@pytest.mark.skipif(not BANKING77.exists(), reason="shared BANKING77 data absent")
def test_dirichlet_on_banking77():
  ds = data.banking77("train")
  parts = data.dirichlet(ds.labels, 50, 0.1, seed=0, min_size=20)
  assert_valid(parts, len(ds))
  stats = data.client_stats(parts, ds.labels, ds.num_classes)
  assert stats.sizes.min() >= 20 and stats.classes_per_client.mean() < 40
