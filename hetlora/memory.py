"""Device-memory estimates of a round from XLA's compiled memory analysis.

For a cohort program compiled for ``c`` clients at a time, XLA reports the
bytes of its arguments, outputs and temporaries
(``jax.jit(f).lower(...).compile().memory_analysis()``). The bytes of one
chunk program are affine in ``c``::

    mem(c) = fixed + c * per_client        (fixed: base weights + shared temporaries)

and a chunked round over ``K`` clients additionally keeps the other
``K - c`` clients' inputs and outputs resident::

    round(c) = mem(c) + (K - c) * io_per_client

:func:`plan_chunk_size` fits the line from ``c = 1, 2``, picks the largest
``c`` with ``round(c) <= budget`` and checks it by compiling at ``c``.
Nothing is run; inputs may be ``jax.ShapeDtypeStruct``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from hetlora import client as client_lib


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """Bytes reported by XLA for one compiled program."""
  argument: int
  output: int
  temp: int
  alias: int
  code: int

  @property
  def total(self) -> int:
    """Live bytes at peak: arguments + outputs + temporaries - donated aliases + code."""
    return self.argument + self.output + self.temp - self.alias + self.code


def compiled_memory(fn: Any, *args) -> CompiledMemory:
  """Compiles ``jax.jit(fn)`` for ``args`` (arrays or ShapeDtypeStructs) and reads its memory.

  >>> compiled_memory(lambda x: x * 2, jax.ShapeDtypeStruct((256,), np.float32)).argument
  1024
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  stats = jitted.lower(*args).compile().memory_analysis()
  if stats is None:
    raise RuntimeError(f"backend {jax.default_backend()!r} reports no compiled memory analysis.")
  return CompiledMemory(argument=int(stats.argument_size_in_bytes),
                        output=int(stats.output_size_in_bytes),
                        temp=int(stats.temp_size_in_bytes),
                        alias=int(stats.alias_size_in_bytes),
                        code=int(stats.generated_code_size_in_bytes))


def stacked_specs(tree: Any, num_clients: int) -> Any:
  """``ShapeDtypeStruct`` of ``[num_clients, *x.shape]`` for every leaf of one client's tree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_clients,) + tuple(np.shape(x)),
                                                     jax.numpy.result_type(x)), tree)


def _nbytes(tree: Any) -> int:
  return sum(int(np.prod(np.shape(x))) * jax.numpy.result_type(x).itemsize
             for x in jax.tree.leaves(tree))


def cohort_memory(spec: client_lib.LocalSpec, base_params: Any, example_client_inputs: tuple,
                  num_clients: int) -> CompiledMemory:
  """Compiled memory of :func:`hetlora.client.vmap_backend` for ``num_clients`` clients.

  Args:
    spec: the clients' :class:`hetlora.client.LocalSpec`.
    base_params: base weights (arrays or ShapeDtypeStructs).
    example_client_inputs: ``(lora, rank, data)`` of ONE client: ``a: [d_in,
      r_max]``, ``int32[]``, ``{'batch': [steps, B, ...], 'mask': [steps, B]}``.
    num_clients: clients trained at once.
  """
  stacked = stacked_specs(example_client_inputs, num_clients)
  return compiled_memory(client_lib.vmap_backend(spec), base_params, *stacked)


def plan_chunk_size(spec: client_lib.LocalSpec, base_params: Any, example_client_inputs: tuple,
                    device_memory_bytes: int, *, num_clients: int | None = None,
                    headroom: float = 0.9) -> int:
  """The largest number of clients per chunk whose round fits in device memory.

  Args:
    spec, base_params, example_client_inputs: as in :func:`cohort_memory`.
    device_memory_bytes: memory of one device (e.g. ``device.memory_stats()
      ['bytes_limit']`` on GPU/TPU).
    num_clients: the cohort size ``K``; caps the chunk at ``K`` and counts
      the other clients' resident inputs and outputs. ``None``: plan the
      chunk program alone (no cap).
    headroom: use this fraction of ``device_memory_bytes``.

  Returns:
    ``chunk_size >= 1`` for :func:`hetlora.parallel.chunked_backend`.

  Raises:
    ValueError: not even one client fits.
  """
  budget = int(device_memory_bytes * headroom)
  m1 = cohort_memory(spec, base_params, example_client_inputs, 1)
  m2 = cohort_memory(spec, base_params, example_client_inputs, 2)
  per_client = max(m2.total - m1.total, 1)
  fixed = m1.total - per_client
  io = _nbytes(example_client_inputs) * 2  # inputs + outputs of one waiting client, roughly

  def round_bytes(c: int, chunk_total: int) -> int:
    return chunk_total + (0 if num_clients is None else (num_clients - c) * io)

  cap = num_clients if num_clients is not None else 1 << 30
  if round_bytes(1, m1.total) > budget:
    raise ValueError(f"one client needs {m1.total / 2**20:.1f} MiB (+ resident cohort data) but the "
                     f"budget is {budget / 2**20:.1f} MiB; set a smaller config.client.batch_size or "
                     "config.model.max_len, or use more devices (config.client.backend='sharded').")
  # Largest c with fixed + c * per_client + (K - c) * io <= budget.
  slope = per_client - (io if num_clients is not None else 0)
  c = cap if slope <= 0 else int((budget - fixed - (0 if num_clients is None else num_clients * io))
                                 // slope)
  c = max(1, min(c, cap))
  # The line is an estimate: check by compiling, shrink until the real program fits.
  while c > 1:
    real = cohort_memory(spec, base_params, example_client_inputs, c).total
    if round_bytes(c, real) <= budget:
      break
    c = max(1, min(c - 1, int(c * budget / round_bytes(c, real))))
  return c
