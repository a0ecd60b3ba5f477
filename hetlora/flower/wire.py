"""What travels between the Flower server and a client: a client's rank slots, never ``r_max``.

A client of rank ``r`` receives and returns only its first ``r`` slots of
every adapted module (all other slots are zero by the masking rule of
:mod:`hetlora.lora`, so nothing is lost)::

    a[:, :r]: [d_in, r],   b[:r, :]: [r, d_out]       r (d_in + d_out) numbers per module

and pads them back to ``r_max`` with zeros on arrival, so the jitted programs
on either side keep their shapes. A method that trains only ``b``
(``Local.trainable == 'b'``) uploads ``b`` alone: the server takes ``a``
from what it sent. Dense trainables (a trained head) travel whole.
Arrays are Flower :class:`flwr.app.ArrayRecord` entries keyed by their
``'/'``-joined parameter path (``'.../query/a'``); numbers such as the rank,
example counts and losses travel in :class:`flwr.app.MetricRecord` /
:class:`flwr.app.ConfigRecord`.

Example:
  >>> import numpy as np
  >>> one = {'q': {'a': np.ones((3, 4), np.float32), 'b': np.ones((4, 2), np.float32)}}
  >>> record = adapter_record(one, rank=2)
  >>> record['q/a'].shape, payload_bytes(record) > 4 * 2 * (3 + 2)
  ((3, 2), True)
  >>> back = adapter_from_record(record, like=one, rank=2)
  >>> back['q']['a'][:, 2:].sum(), back['q']['b'][:2].sum()
  (np.float32(0.0), np.float32(4.0))
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import traverse_util
from flwr.app import Array, ArrayRecord

from hetlora import lora as lora_lib


def adapter_record(lora: lora_lib.LoRA, rank: int, parts: str = "ab") -> ArrayRecord:
  """One client's tree (``a: [d_in, r_max]``) as its first ``rank`` slots.

  Args:
    lora: one client's LoRA tree (host or device arrays).
    rank: the client's rank ``r``.
    parts: ``'ab'`` both factors, ``'b'`` only ``b`` (a method that keeps ``a`` fixed).
  """
  out = {}
  for path, mod in lora_lib.modules(lora).items():
    if "a" in parts:
      out[f"{path}/a"] = Array(np.ascontiguousarray(np.asarray(mod["a"])[:, :rank]))
    out[f"{path}/b"] = Array(np.ascontiguousarray(np.asarray(mod["b"])[:rank]))
  return ArrayRecord(out)


def adapter_from_record(record: ArrayRecord, like: lora_lib.LoRA, rank: int,
                        fallback_a: lora_lib.LoRA | None = None) -> dict[str, Any]:
  """The tree of ``record`` padded with zeros to the shapes of ``like`` (``a: [d_in, r_max]``).

  Args:
    record: the slots :func:`adapter_record` wrote.
    like: a tree of the run's shapes and dtypes.
    rank: the rank the slots were written at.
    fallback_a: where ``record`` lacks ``a`` (``parts='b'``), the tree whose ``a`` slots
      ``< rank`` are used.

  Raises:
    ValueError: a module is missing or its slots have the wrong shape.
  """
  flat_like = traverse_util.flatten_dict(like, sep="/")
  flat_fallback = traverse_util.flatten_dict(fallback_a, sep="/") if fallback_a is not None else {}
  out = {}
  for key, ref in flat_like.items():
    full = np.zeros(ref.shape, ref.dtype)
    if key in record:
      value = record[key].numpy()
    elif key.endswith("/a") and key in flat_fallback:
      value = np.asarray(flat_fallback[key])[:, :rank]
    else:
      raise ValueError(f"the upload lacks {key!r}; client and server must run the same lora.pattern "
                       "and model (check the site's model-dir).")
    want = (ref.shape[0], rank) if key.endswith("/a") else (rank, ref.shape[1])
    if value.shape != want:
      raise ValueError(f"{key!r} has shape {value.shape}, expected {want} (rank {rank}); client and "
                       "server must run the same model and lora.r_max.")
    if key.endswith("/a"):
      full[:, :rank] = value
    else:
      full[:rank] = value
    out[key] = full
  return traverse_util.unflatten_dict(out, sep="/")


def tree_record(tree: Any) -> ArrayRecord:
  """A nested dict of arrays (dense trainables, base kernels) keyed by ``'/'``-joined paths."""
  return ArrayRecord({path: Array(np.ascontiguousarray(np.asarray(x)))
                      for path, x in traverse_util.flatten_dict(tree, sep="/").items()})


def tree_from_record(record: ArrayRecord) -> dict[str, Any]:
  """The nested dict :func:`tree_record` wrote."""
  return traverse_util.unflatten_dict({path: record[path].numpy() for path in record}, sep="/")


def payload_bytes(*records: ArrayRecord) -> int:
  """Bytes of the arrays in ``records`` as serialized on the wire (headers included)."""
  return int(sum(len(array.data) for record in records for array in record.values()))
