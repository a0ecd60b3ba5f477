"""What travels between the Flower server and a client: a client's rank slots, never ``r_max``.

A client of rank ``r`` receives and returns only its first ``r`` slots of
every adapted module (all other slots are zero by the masking rule of
:mod:`hetlora.lora`, so nothing is lost)::

    a[:, :r]: [d_in, r],   b[:r, :]: [r, d_out]       r (d_in + d_out) numbers per module

and pads them back to ``r_max`` with zeros on arrival, so the jitted programs
on either side keep their shapes. A method that trains only ``b``
(``Local.trainable == 'b'``) uploads ``b`` alone: the server takes ``a``
from what it sent. Dense trainables (a trained head) travel whole.
A client's slots travel as one flat array of an :class:`flwr.app.ArrayRecord`
(:func:`adapter_record`); dense trees as entries keyed by their ``'/'``-joined
parameter path (``'classifier/kernel'``); numbers such as the rank,
example counts and losses travel in :class:`flwr.app.MetricRecord` /
:class:`flwr.app.ConfigRecord`. A SuperNode gets one message a round for all
the cohort clients it holds: each client's records are keyed
``'<record>.<client>'`` (:func:`client_key`), the shared ones (dense
trainables, changed kernels, the task) travel once.

Example:
  >>> import numpy as np
  >>> one = {'q': {'a': np.ones((3, 4), np.float32), 'b': np.ones((4, 2), np.float32)}}
  >>> record = adapter_record(one, rank=2)
  >>> record['ab'].shape, payload_bytes(record) > 4 * 2 * (3 + 2)
  ((10,), True)
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


def client_key(record: str, client: int) -> str:
  """The key of one client's record in a message that carries several: ``'adapter.7'``."""
  return f"{record}.{int(client)}"


def _slots(like: lora_lib.LoRA, rank: int, parts: str) -> list[tuple[str, tuple[int, int]]]:
  """``(path/a or path/b, shape at rank)`` of every factor a record holds, in its order."""
  out = []
  for path, mod in lora_lib.modules(like).items():
    if "a" in parts:
      out.append((f"{path}/a", (np.shape(mod["a"])[0], rank)))
    out.append((f"{path}/b", (rank, np.shape(mod["b"])[1])))
  return out


def adapter_record(lora: lora_lib.LoRA, rank: int, parts: str = "ab") -> ArrayRecord:
  """One client's tree (``a: [d_in, r_max]``) as its first ``rank`` slots, in one flat array.

  The record holds one array keyed ``parts``: every module's ``a[:, :rank]``
  (unless ``parts == 'b'``) and ``b[:rank]``, raveled and concatenated in
  the order of :func:`hetlora.lora.modules`. One array rather than one per
  factor: Flower stores and sends every array as its own object (one call
  each, on every hop), so a message's cost follows its array count.

  Args:
    lora: one client's LoRA tree (host or device arrays, one dtype).
    rank: the client's rank ``r``.
    parts: ``'ab'`` both factors, ``'b'`` only ``b`` (a method that keeps ``a`` fixed).
  """
  pieces = []
  for mod in lora_lib.modules(lora).values():
    if "a" in parts:
      pieces.append(np.asarray(mod["a"])[:, :rank])
    pieces.append(np.asarray(mod["b"])[:rank])
  if len({p.dtype for p in pieces}) > 1:
    raise ValueError(f"the factors have dtypes {sorted({str(p.dtype) for p in pieces})}; a client's tree has one.")
  return ArrayRecord({parts: Array(np.concatenate([p.ravel() for p in pieces]))})


def adapter_from_record(record: ArrayRecord, like: lora_lib.LoRA, rank: int,
                        fallback_a: lora_lib.LoRA | None = None) -> dict[str, Any]:
  """The tree of ``record`` padded with zeros to the shapes of ``like`` (``a: [d_in, r_max]``).

  Args:
    record: the slots :func:`adapter_record` wrote.
    like: a tree of the run's shapes and dtypes.
    rank: the rank the slots were written at.
    fallback_a: where ``record`` holds ``b`` alone (``parts='b'``), the tree whose ``a`` slots
      ``< rank`` are used.

  Raises:
    ValueError: the record's size does not fit the run's modules at ``rank``, or it lacks ``a``
      and no ``fallback_a`` is given.
  """
  parts = "ab" if "ab" in record else "b" if "b" in record else None
  if parts is None or (parts == "b" and fallback_a is None):
    raise ValueError(f"the upload holds {sorted(record)}, expected the factors 'ab' (or 'b' for a "
                     "method that keeps a fixed); client and server must run the same hetlora and method.")
  flat = record[parts].numpy().ravel()
  layout = _slots(like, rank, parts)
  if flat.size != sum(r * c for _, (r, c) in layout):
    raise ValueError(f"the upload holds {flat.size} numbers, the run's modules at rank {rank} take "
                     f"{sum(r * c for _, (r, c) in layout)}; client and server must run the same model, "
                     "lora.pattern and lora.r_max (check the site's model-dir).")
  values, offset = {}, 0
  for key, (r, c) in layout:
    values[key], offset = flat[offset:offset + r * c].reshape(r, c), offset + r * c
  flat_fallback = traverse_util.flatten_dict(fallback_a, sep="/") if parts == "b" else {}
  out = {}
  for key, ref in traverse_util.flatten_dict(like, sep="/").items():
    full = np.zeros(ref.shape, ref.dtype)
    if key.endswith("/a"):
      full[:, :rank] = values[key] if key in values else np.asarray(flat_fallback[key])[:, :rank]
    else:
      full[:rank] = values[key]
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
