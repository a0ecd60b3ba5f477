"""Client-parallel execution: a ``clients`` mesh axis, chunked rounds, multi-host set-up.

A round trains ``K`` equal-shaped clients (``lora: [K, d_in, r_max]``,
``ranks: int32[K]``, ``data: [K, steps, B, ...]``) with one per-client function,
:func:`hetlora.client.local_train`. The backends here only decide *where* and
*how many at a time* the clients run; every one has the signature of
:func:`hetlora.client.vmap_backend`::

    train(base_params, lora [K, ...], ranks int32[K], data [K, steps, B, ...]) -> ClientResult [K]

and gives the same numbers:

- :func:`sharded_backend`: the client axis is split over the devices of a
  1-D :class:`jax.sharding.Mesh` named ``'clients'``
  (``NamedSharding(mesh, P('clients'))``); base weights are replicated
  (``P()``), never copied per client. Each device runs the vmap of its
  ``K_pad / n_devices`` clients under ``shard_map`` (no collectives in
  training). ``K`` is padded to a multiple of the device count with
  *inactive* clients (zero factors, rank 1, ``mask == 0`` so every step is
  skipped) that are dropped from the result.
- :func:`chunked_backend`: ``lax.map`` over chunks of ``chunk_size`` clients,
  each chunk a vmap, so only one chunk's activations and optimizer state are
  live: memory ``base + K * (inputs + outputs) + chunk * (temporaries)``.

Aggregators (:mod:`hetlora.aggregation`) are jitted reductions over the
leading client axis and run unchanged on sharded results: XLA turns the
``sum_k w_k a_k`` into per-device partial sums plus an all-reduce.

Multi-host runs use JAX's multi-controller runtime: every process calls
:func:`maybe_initialize_distributed` first, builds the same global
:func:`client_mesh` and packs the same host data; :func:`put` then places
each process's addressable shards. No other code changes.

Example:
  >>> mesh = client_mesh()                                   # all devices
  >>> train = sharded_backend(spec, mesh)                    # doctest: +SKIP
  >>> round_fn = server.make_round(spec, method, train)          # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hetlora import client as client_lib
from hetlora import dense as dense_lib

CLIENTS = "clients"
Train = Callable[..., client_lib.ClientResult]


def client_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = CLIENTS) -> Mesh:
  """A 1-D mesh ``{axis_name: len(devices)}`` over ``devices`` (default: all global devices).

  >>> client_mesh().axis_names
  ('clients',)
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("client_mesh needs at least one device.")
  return Mesh(np.asarray(devices), (axis_name,))


def padded_size(num_clients: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is ``>= num_clients``."""
  return -(-num_clients // multiple) * multiple


def pad_clients(lora: Any, ranks: Any, data: Any, num_padded: int) -> tuple[Any, Any, Any]:
  """Appends ``num_padded - K`` inactive clients to a cohort.

  Inactive clients have zero factors, rank 1 and all-zero data (so
  ``mask == 0`` and :func:`hetlora.client.local_train` skips every step).
  numpy inputs stay numpy (host-side padding for multi-host placement).

  Args:
    lora: stacked tree ``[K, ...]``.
    ranks: ``int32[K]``.
    data: ``{'batch': [K, steps, B, ...], 'mask': [K, steps, B]}``.
    num_padded: ``K_pad >= K``.

  Returns:
    ``(lora, ranks, data)`` with leading axis ``K_pad``.
  """
  k = ranks.shape[0]
  if num_padded < k:
    raise ValueError(f"num_padded={num_padded} is below the cohort size K={k}.")

  def pad(x, fill):
    xp = np if isinstance(x, np.ndarray) else jnp
    extra = xp.full((num_padded - k,) + tuple(x.shape[1:]), fill, dtype=x.dtype)
    return xp.concatenate([x, extra], axis=0)

  if num_padded == k:
    return lora, ranks, data
  zeros = lambda t: jax.tree.map(lambda x: pad(x, 0), t)
  return zeros(lora), pad(ranks, 1), zeros(data)


def take_clients(tree: Any, num_clients: int) -> Any:
  """The first ``num_clients`` entries of every leaf's leading axis (drops padding)."""
  return jax.tree.map(lambda x: x[:num_clients], tree)


def put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Places every leaf with ``sharding``; a no-op for leaves already placed so.

  One process: ``jax.device_put``. Several processes: every process holds the
  same full host value and contributes its addressable shards
  (``jax.make_array_from_callback``), so host data needs no scatter.
  """
  def one(x):
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return jax.tree.map(one, tree)


def _cohort_fn(spec: client_lib.LocalSpec, chunk_size: int | None) -> Train:
  """The per-device cohort function: one vmap, or ``lax.map`` over vmapped chunks."""
  if chunk_size is None:
    return client_lib.vmap_backend(spec)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}; set config.client.chunk_size "
                     "(clients per chunk) to a positive int.")

  def train(base_params, lora, ranks, data):
    if chunk_size >= ranks.shape[0]:
      return client_lib.vmap_backend(spec)(base_params, lora, ranks, data)
    # lax.map with batch_size: a scan over vmaps of `chunk_size` clients (+ one remainder vmap).
    return jax.lax.map(lambda xs: client_lib.local_train(spec, base_params, *xs),
                       (lora, ranks, data), batch_size=chunk_size)

  return train


def chunked_backend(spec: client_lib.LocalSpec, chunk_size: int) -> Train:
  """Trains the cohort ``chunk_size`` clients at a time, in one jitted program.

  Same results as :func:`hetlora.client.vmap_backend`; peak memory holds one
  chunk's activations and optimizer state instead of ``K``'s. Choose
  ``chunk_size`` with :func:`hetlora.memory.plan_chunk_size`.

  Returns:
    ``train(base, lora [K, ...], ranks int32[K], data [K, steps, B, ...]) -> ClientResult``.
  """
  return jax.jit(_cohort_fn(spec, chunk_size))


def sharded_backend(spec: client_lib.LocalSpec, mesh: Mesh, axis_name: str = CLIENTS,
                    chunk_size: int | None = None) -> Train:
  """Trains the cohort with its client axis sharded over ``mesh[axis_name]``.

  Inputs are padded to ``K_pad = n_dev * ceil(K / n_dev)`` with inactive
  clients (:func:`pad_clients`), placed with ``NamedSharding(mesh,
  P(axis_name))`` (base weights with ``P()``, placed once and reused while
  they keep that sharding), trained under ``shard_map`` (each device vmaps
  its ``K_pad / n_dev`` clients, optionally in chunks of ``chunk_size``),
  and the padding is dropped. Results do not depend on ``n_dev``.

  When ``K`` is a multiple of ``n_dev`` the result stays sharded over
  ``axis_name`` and an aggregator's ``sum_k`` compiles to per-device partial
  sums plus one all-reduce. Otherwise dropping the padding gathers the
  ``[K]`` result onto every device (an uneven split is not a valid
  ``NamedSharding``); the aggregators then reduce locally.

  Enables ``jax_threefry_partitionable`` so random bits drawn inside sharded
  code do not depend on the sharding.

  Returns:
    ``train(base, lora [K, ...], ranks int32[K], data [K, steps, B, ...]) -> ClientResult [K]``.
  """
  jax.config.update("jax_threefry_partitionable", True)
  if axis_name not in mesh.axis_names:
    raise ValueError(f"mesh has axes {mesh.axis_names}; expected a {axis_name!r} axis (see client_mesh).")
  n_dev = mesh.shape[axis_name]
  clients = NamedSharding(mesh, P(axis_name))
  replicated = NamedSharding(mesh, P())
  cohort = _cohort_fn(spec, chunk_size)

  def device_cohort(base_params, lora, ranks, data):
    # The dense trainables start replicated but train per client: mark them varying over the axis.
    start = jax.tree.map(lambda x: jax.lax.pcast(x, (axis_name,), to="varying"),
                         dense_lib.select(base_params, spec.dense))
    return cohort(dense_lib.overlay(base_params, start), lora, ranks, data)

  per_device = jax.shard_map(device_cohort, mesh=mesh,
                             in_specs=(P(), P(axis_name), P(axis_name), P(axis_name)),
                             out_specs=P(axis_name))

  @jax.jit
  def run(base_params, lora, ranks, data):
    return per_device(base_params, lora, ranks, data)

  def train(base_params, lora, ranks, data):
    k = ranks.shape[0]
    lora, ranks, data = pad_clients(lora, ranks, data, padded_size(k, n_dev))
    result = run(put(base_params, replicated), put(lora, clients), put(ranks, clients),
                 put(data, clients))
    return take_clients(result, k) if ranks.shape[0] != k else result

  return train


def _cluster_size(env: Any) -> int:
  """Processes announced by Slurm (``srun``), Open MPI (``mpirun``) or a TPU pod slice."""
  tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return max(int(env.get("SLURM_NTASKS") or 1), int(env.get("OMPI_COMM_WORLD_SIZE") or 1),
             len(tpu_hosts))


def maybe_initialize_distributed(**overrides) -> bool:
  """Calls ``jax.distributed.initialize()`` when the process is one of several.

  Call it first, before anything touches a device. Reads, in order:

  - ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID`` and optionally ``JAX_LOCAL_DEVICE_IDS`` (``0,1``):
    explicit set-up, e.g. several processes on one host;
  - ``SLURM_NTASKS > 1``, ``OMPI_COMM_WORLD_SIZE > 1``, or more than one
    host in ``TPU_WORKER_HOSTNAMES``: JAX's own cluster auto-detection.

  Keyword ``overrides`` go to ``jax.distributed.initialize``. A second call
  is a no-op.

  Returns:
    True if the distributed runtime is (now) initialised, False for a
    single-process run.
  """
  if jax.distributed.is_initialized():
    return True
  env = os.environ
  kwargs: dict[str, Any] = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    try:
      kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                    num_processes=int(env["JAX_NUM_PROCESSES"]),
                    process_id=int(env["JAX_PROCESS_ID"]))
    except KeyError as e:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {e.args[0]} is not; set "
                       "JAX_NUM_PROCESSES and JAX_PROCESS_ID too.") from None
    if env.get("JAX_LOCAL_DEVICE_IDS"):
      kwargs["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
  elif _cluster_size(env) <= 1 and not overrides:
    return False
  jax.config.update("jax_threefry_partitionable", True)
  jax.distributed.initialize(**{**kwargs, **overrides})
  return True
