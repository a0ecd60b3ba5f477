"""Federated partitioners: split ``N`` example indices among ``K`` clients.

Every partitioner returns ``list[int64[n_k]]`` (one sorted index array per
client) that is disjoint, covers ``range(N)`` exactly once and has no empty
client. Semantics follow Flower Datasets (Beutel et al., "Flower: A Friendly
Federated Learning Research Framework", arXiv:2007.14390):

- :func:`iid`: a seeded permutation cut into ``K`` near-equal parts.
- :func:`dirichlet`: label skew (Hsu, Qi & Brown, "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification",
  arXiv:1909.06335). For each class ``c`` with indices ``I_c``, draw
  ``p_c ~ Dirichlet(alpha * 1_K)`` and give client ``k`` the next
  ``floor(cumsum(p_c)_k * |I_c|) - floor(cumsum(p_c)_{k-1} * |I_c|)`` shuffled
  indices of ``I_c``. Redraw everything until every client has ``>= min_size``
  examples. Small ``alpha`` gives few classes per client; large ``alpha`` tends
  to IID.
- :func:`shards`: pathological non-IID (McMahan et al., "Communication-Efficient
  Learning of Deep Networks from Decentralized Data", AISTATS 2017,
  arXiv:1602.05629): sort by label, cut into ``K * shards_per_client``
  shards, deal each client ``shards_per_client`` random shards.
- :func:`natural`: one client per distinct key (writer, task, user).

Example::

    parts = dirichlet(labels, num_clients=10, alpha=0.1, seed=0)
    print(format_stats(client_stats(parts, labels, num_classes=77)))
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

Partition = list[np.ndarray]


def _check_num_clients(n: int, num_clients: int) -> None:
  if num_clients < 1:
    raise ValueError(f"data.num_clients={num_clients} must be >= 1; set config.data.num_clients.")
  if num_clients > n:
    raise ValueError(f"data.num_clients={num_clients} exceeds the {n} examples, so some client "
                     "would be empty; lower config.data.num_clients.")


def validate_partition(partition: Sequence[np.ndarray], n: int) -> None:
  """Raise ``ValueError`` unless ``partition`` is disjoint, complete over ``range(n)``
  and has no empty client."""
  sizes = [len(p) for p in partition]
  empty = [k for k, s in enumerate(sizes) if s == 0]
  if empty:
    raise ValueError(f"clients {empty[:10]} are empty; lower config.data.num_clients "
                     "or change the partition settings.")
  flat = np.concatenate([np.asarray(p, np.int64) for p in partition]) if partition else np.zeros(0, np.int64)
  if flat.size and (flat.min() < 0 or flat.max() >= n):
    raise ValueError(f"partition indices must lie in [0, {n}); got [{flat.min()}, {flat.max()}].")
  counts = np.bincount(flat, minlength=n)
  if (counts > 1).any():
    raise ValueError(f"partition is not disjoint: {(counts > 1).sum()} indices belong to several clients.")
  if (counts == 0).any():
    raise ValueError(f"partition is incomplete: {(counts == 0).sum()} of {n} indices belong to no client.")


def iid(n: int, num_clients: int, seed: int = 0) -> Partition:
  """IID: a permutation of ``range(n)`` seeded by ``seed``, cut into ``num_clients``
  parts of size ``n // K`` or ``n // K + 1``."""
  _check_num_clients(n, num_clients)
  perm = np.random.default_rng(seed).permutation(n)
  return [np.sort(p) for p in np.array_split(perm, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 10,
              max_tries: int = 100) -> Partition:
  """Label skew by per-class Dirichlet(alpha) proportions (see module docstring).

  Args:
    labels: ``int[N]`` class ids.
    num_clients: ``K``.
    alpha: Dirichlet concentration, ``> 0``.
    seed: seed of all draws.
    min_size: every client gets at least this many examples.
    max_tries: redraws before giving up with a ``ValueError``.
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  _check_num_clients(n, num_clients)
  if not alpha > 0:
    raise ValueError(f"data.dirichlet_alpha={alpha} must be > 0; set config.data.dirichlet_alpha, "
                     "e.g. 0.1 (strong skew) to 100 (near IID).")
  if min_size < 1:
    raise ValueError(f"data.min_client_size={min_size} must be >= 1 so no client is empty; "
                     "set config.data.min_client_size.")
  if min_size * num_clients > n:
    raise ValueError(f"data.min_client_size={min_size} times data.num_clients={num_clients} exceeds "
                     f"the {n} examples; lower one of them.")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  smallest = 0
  for _ in range(max_tries):
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(labels == c))
      p = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
      for k, chunk in enumerate(np.split(idx, cuts)):
        parts[k].append(chunk)
    out = [np.sort(np.concatenate(p)) for p in parts]
    smallest = min(len(p) for p in out)
    if smallest >= min_size:
      return out
  raise ValueError(
      f"dirichlet partition: after {max_tries} draws some client still had fewer than "
      f"data.min_client_size={min_size} examples (smallest {smallest}) with data.dirichlet_alpha={alpha} "
      f"and data.num_clients={num_clients}; raise config.data.dirichlet_alpha, lower "
      "config.data.num_clients or config.data.min_client_size.")


def natural(keys: Sequence | np.ndarray) -> Partition:
  """One client per distinct key, in ``np.unique(keys)`` order (sorted keys)."""
  keys = np.asarray(keys)
  if keys.shape[0] == 0:
    raise ValueError("natural partition needs at least one example; the dataset is empty.")
  _, inverse = np.unique(keys, return_inverse=True)
  inverse = inverse.reshape(-1)
  order = np.argsort(inverse, kind="stable")
  bounds = np.cumsum(np.bincount(inverse))[:-1]
  return [np.sort(p) for p in np.split(order, bounds)]


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> Partition:
  """Pathological non-IID: label-sorted shards, ``shards_per_client`` random ones per client.

  Indices are shuffled before a stable sort by label, so shards are random
  within a class. ``K * shards_per_client`` shards of near-equal size cover
  every index.
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  _check_num_clients(n, num_clients)
  if shards_per_client < 1:
    raise ValueError(f"data.shards_per_client={shards_per_client} must be >= 1; "
                     "set config.data.shards_per_client, e.g. 2.")
  num_shards = num_clients * shards_per_client
  if num_shards > n:
    raise ValueError(f"data.num_clients * data.shards_per_client = {num_shards} shards exceed the "
                     f"{n} examples, so some shard would be empty; lower config.data.shards_per_client.")
  rng = np.random.default_rng(seed)
  perm = rng.permutation(n)
  by_label = perm[np.argsort(labels[perm], kind="stable")]
  pieces = np.array_split(by_label, num_shards)
  deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return [np.sort(np.concatenate([pieces[s] for s in row])) for row in deal]


PARTITIONERS = ("iid", "dirichlet", "shards", "natural")


def make_partition(method: str, *, labels: np.ndarray | None = None, keys: np.ndarray | None = None,
                   num_clients: int | None = None, seed: int = 0, **kwargs) -> Partition:
  """Dispatch by name: ``'iid'``, ``'dirichlet'`` (``alpha``, ``min_size``), ``'shards'``
  (``shards_per_client``) or ``'natural'`` (needs ``keys``)."""
  if method == "natural":
    if keys is None:
      raise ValueError("natural partition needs per-example keys (e.g. task ids); pass keys=.")
    return natural(keys)
  if method not in PARTITIONERS:
    raise ValueError(f"unknown partition {method!r}; set config.data.partition to one of {list(PARTITIONERS)}.")
  if labels is None or num_clients is None:
    raise ValueError(f"{method} partition needs labels and num_clients.")
  if method == "iid":
    return iid(len(labels), num_clients, seed)
  if method == "dirichlet":
    return dirichlet(labels, num_clients, seed=seed, **kwargs)
  return shards(labels, num_clients, seed=seed, **kwargs)


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class ClientStats:
  """Sizes ``int64[K]`` and label histograms ``int64[K, C]`` of a partition."""
  sizes: np.ndarray
  histograms: np.ndarray

  @property
  def classes_per_client(self) -> np.ndarray:
    """``int64[K]``: number of classes with at least one example."""
    return (self.histograms > 0).sum(axis=1)

  @property
  def top_class_share(self) -> np.ndarray:
    """``float64[K]``: share of each client's most frequent class."""
    return self.histograms.max(axis=1) / np.maximum(self.sizes, 1)


def client_stats(partition: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> ClientStats:
  """Per-client sizes and label histograms."""
  labels = np.asarray(labels)
  hist = np.stack([np.bincount(labels[np.asarray(p, np.int64)], minlength=num_classes)[:num_classes]
                   for p in partition]) if len(partition) else np.zeros((0, num_classes), np.int64)
  return ClientStats(np.asarray([len(p) for p in partition], np.int64), hist.astype(np.int64))


def format_stats(stats: ClientStats, label_names: Sequence[str] | None = None, max_rows: int = 20) -> str:
  """A plain-text report: a summary line, then one line per client (at most ``max_rows``)."""
  s = stats.sizes
  k = len(s)
  if k == 0:
    return "0 clients"
  lines = [f"{k} clients, {int(s.sum())} examples; size min/median/max "
           f"{int(s.min())}/{int(np.median(s))}/{int(s.max())}; "
           f"classes per client mean {stats.classes_per_client.mean():.1f}; "
           f"top-class share mean {stats.top_class_share.mean():.2f}"]
  for i in range(min(k, max_rows)):
    top = int(stats.histograms[i].argmax())
    name = label_names[top] if label_names is not None else str(top)
    lines.append(f"  client {i:4d}: {int(s[i]):6d} examples, {int(stats.classes_per_client[i]):3d} classes, "
                 f"top {name} ({stats.top_class_share[i]:.0%})")
  if k > max_rows:
    lines.append(f"  ... {k - max_rows} more clients")
  return "\n".join(lines)
