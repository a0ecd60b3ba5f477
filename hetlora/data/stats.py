"""What the tokenized data holds: examples, cut and empty examples, labels, per split and client.

Tokenization flags every example that lost tokens to ``model.max_len``
(``truncated: bool[N]``) or has no text (``empty: bool[N]``)
(:mod:`hetlora.data.tokenize`). :func:`data_statistics` counts them per
split and per client, with the label counts (class labels, or the task ids of
instruction data), as a JSON-ready dict; :func:`format_statistics` prints it;
:func:`statistics` takes an :class:`hetlora.experiment.Experiment`.

Example::

    stats = data_statistics(train_cols, test_cols, partition, label_names=['neg', 'pos'])
    stats['train']['truncated'], stats['clients'][0]['examples']
    print(format_statistics(stats))
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

LABEL_KEYS = ("label", "task_id")  # the class column of classification / instruction data


def _label_key(columns: Mapping[str, np.ndarray]) -> str | None:
  return next((k for k in LABEL_KEYS if k in columns), None)


def _count(columns: Mapping[str, np.ndarray], flag: str, idx: np.ndarray | None = None) -> int | None:
  """How many examples (of ``idx``) carry ``flag``; ``None`` when the columns have no such flag."""
  if flag not in columns:
    return None
  x = np.asarray(columns[flag], bool)
  return int((x if idx is None else x[idx]).sum())


def _size(columns: Mapping[str, np.ndarray]) -> int:
  return len(next(iter(columns.values()))) if columns else 0


def _split(columns: Mapping[str, np.ndarray], key: str | None, names: list[str]) -> dict[str, Any]:
  n = _size(columns)
  out: dict[str, Any] = {"examples": n, "truncated": _count(columns, "truncated"),
                         "empty": _count(columns, "empty")}
  if key is not None and key in columns:
    counts = np.bincount(np.asarray(columns[key], np.int64), minlength=len(names))
    out["label_counts"] = {names[i] if i < len(names) else str(i): int(c) for i, c in enumerate(counts)}
  return out


def data_statistics(train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray],
                    partition: Sequence[np.ndarray],
                    label_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Counts per split and per client (JSON-ready).

  Args:
    train, test: tokenized columns ``{name: [N, ...]}`` with ``truncated, empty: bool[N]``
      and ``label`` or ``task_id: int32[N]``.
    partition: ``K`` index arrays into ``train``, one per client.
    label_names: names of the label ids (default: the ids as strings).

  Returns:
    ``{'label_key', 'train': S, 'test': S, 'clients': [C, ...]}`` with
    ``S = {'examples', 'truncated', 'empty', 'label_counts': {name: count}}`` and
    ``C = {'client', 'examples', 'truncated', 'empty', 'labels', 'top_label',
    'top_label_share'}`` (``labels``: distinct labels the client holds;
    ``top_label_share``: share of its most frequent one). A count is ``None``
    when the columns carry no such flag.
  """
  key = _label_key(train)
  num = 0
  for cols in (train, test):
    if key is not None and key in cols and _size(cols):
      num = max(num, int(np.max(cols[key])) + 1)
  names = [str(n) for n in label_names] if label_names else [str(i) for i in range(num)]
  clients = []
  labels = np.asarray(train[key], np.int64) if key is not None else None
  for k, idx in enumerate(partition):
    idx = np.asarray(idx, np.int64)
    entry: dict[str, Any] = {"client": k, "examples": int(len(idx)),
                             "truncated": _count(train, "truncated", idx), "empty": _count(train, "empty", idx)}
    if labels is not None and len(idx):
      hist = np.bincount(labels[idx], minlength=len(names))
      top = int(hist.argmax())
      entry.update(labels=int((hist > 0).sum()), top_label=names[top] if top < len(names) else str(top),
                   top_label_share=float(hist[top] / len(idx)))
    clients.append(entry)
  return {"label_key": key, "train": _split(train, key, names), "test": _split(test, key, names),
          "clients": clients}


def statistics(exp) -> dict[str, Any]:
  """:func:`data_statistics` of an :class:`hetlora.experiment.Experiment` (its ``train``,
  ``test``, ``partition`` and ``label_names``), e.g. to write ``data_stats.json``; the
  held-out tasks' set (``exp.unseen``, when there is one) as the split ``'unseen'``."""
  stats = data_statistics(exp.train, exp.test, exp.partition, label_names=list(exp.label_names) or None)
  unseen = getattr(exp, "unseen", None)
  if unseen is not None:
    stats["unseen"] = _split(unseen, _label_key(unseen), [])
  return stats


def _share(count: int | None, n: int) -> str:
  if count is None:
    return "n/a"
  return f"{count} ({100.0 * count / max(n, 1):.1f}%)"


def _labels_line(counts: Mapping[str, int] | None, max_labels: int = 10) -> str:
  if not counts:
    return ""
  if len(counts) <= max_labels:
    return "labels " + ", ".join(f"{name} {c}" for name, c in counts.items())
  c = np.asarray(list(counts.values()))
  return (f"{len(c)} labels ({int((c > 0).sum())} present), count min/median/max "
          f"{int(c.min())}/{int(np.median(c))}/{int(c.max())}")


def format_statistics(stats: Mapping[str, Any], max_clients: int = 20) -> str:
  """A plain-text report of :func:`data_statistics`: one line per split, a client summary,
  then one line per client (at most ``max_clients``)."""
  lines = []
  for split in ("train", "test", "unseen"):
    if split not in stats:
      continue
    s = stats[split]
    lines.append(f"{split:5s}: {s['examples']} examples, truncated {_share(s['truncated'], s['examples'])}, "
                 f"empty {_share(s['empty'], s['examples'])}; {_labels_line(s.get('label_counts'))}")
  clients = stats["clients"]
  if clients:
    sizes = np.asarray([c["examples"] for c in clients])
    lines.append(f"{len(clients)} clients, examples min/median/max "
                 f"{int(sizes.min())}/{int(np.median(sizes))}/{int(sizes.max())}")
    for c in clients[:max_clients]:
      top = (f", {c['labels']} labels, top {c['top_label']} ({c['top_label_share']:.0%})"
             if "labels" in c else "")
      lines.append(f"  client {c['client']:4d}: {c['examples']:6d} examples, truncated "
                   f"{_share(c['truncated'], c['examples'])}, empty {_share(c['empty'], c['examples'])}{top}")
    if len(clients) > max_clients:
      lines.append(f"  ... {len(clients) - max_clients} more clients")
  return "\n".join(lines)
