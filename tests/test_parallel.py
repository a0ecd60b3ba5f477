"""Tests of hetlora.parallel and hetlora.memory.

Multi-device tests need 8 CPU devices, which XLA creates only if
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before JAX
starts: ``tests/test_eight_devices.py`` runs them in one subprocess with that
flag; in the parent process they skip.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hetlora import client as client_lib
from hetlora import lora as lora_lib
from hetlora import memory
from hetlora import methods
from hetlora import parallel
from hetlora import server
from hetlora.methods import hetlora as hetlora_method
from hetlora.models import tiny

from conftest import full_tests_only, needs_eight_devices, single_device

K, STEPS, B, D_IN, R_MAX = 11, 3, 4, 6, 8
TOL = 1e-6
NUM_DEVICES = 8


# ----------------------------------------------------------------------------- fixtures


def _problem(pruning: bool = True):
  """Tiny MLP, K=11 clients with mixed ranks and uneven example masks."""
  model = tiny.MLPClassifier(hidden=(16,), num_classes=3)
  base = tiny.init_params(model, jax.random.key(0), D_IN)
  spec = client_lib.LocalSpec(
      loss_fn=tiny.classification_loss(model), optimizer=optax.sgd(0.05, momentum=0.9), alpha=2.0,
      local=hetlora_method.local(lam=1e-2, gamma=0.75, prune=pruning))
  glob = lora_lib.init(jax.random.key(1), base, "(hidden_0|head)/kernel$", R_MAX)
  glob = lora_lib.map_modules(lambda m: {"a": m["a"], "b": 0.1 * jnp.ones_like(m["b"])}, glob)
  ranks = jnp.asarray([1, 2, 3, 4, 5, 6, 7, 8, 2, 8, 5], jnp.int32)
  kx, ky = jax.random.split(jax.random.key(2))
  x = jax.random.normal(kx, (K, STEPS, B, D_IN))
  y = jax.random.randint(ky, (K, STEPS, B), 0, 3)
  mask = np.ones((K, STEPS, B), np.float32)
  mask[3, 2:] = 0          # client 3 has fewer examples: its last step is padding
  mask[5, :, 2:] = 0       # client 5: half-full batches
  data = {"batch": {"x": x, "label": y}, "mask": jnp.asarray(mask)}
  return spec, base, glob, ranks, data


def _assert_close(got, want, tol=TOL):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol, rtol=0)


@pytest.fixture(scope="module")
def problem():
  return _problem()


@pytest.fixture(scope="module")
def reference(problem):
  spec, base, glob, ranks, data = problem
  return client_lib.vmap_backend(spec)(base, lora_lib.truncate(glob, ranks), ranks, data)


_SHARDED: dict = {}


def _sharded(problem, n_dev, chunk):
  """The sharded backend's result on ``problem`` over the first ``n_dev`` devices, computed once
  per ``(n_dev, chunk)`` and shared by the tests that check it (each build re-traces and compiles)."""
  if (n_dev, chunk) not in _SHARDED:
    spec, base, glob, ranks, data = problem
    mesh = parallel.client_mesh(jax.devices()[:n_dev])
    _SHARDED[n_dev, chunk] = parallel.sharded_backend(spec, mesh, chunk_size=chunk)(
        base, lora_lib.truncate(glob, ranks), ranks, data)
  return _SHARDED[n_dev, chunk]


# ----------------------------------------------------------------------------- single device


@single_device
def test_pad_and_take_clients(problem):
  _, _, glob, ranks, data = problem
  lora, r, d = parallel.pad_clients(lora_lib.truncate(glob, ranks), ranks, data, 16)
  assert r.shape == (16,) and r[K:].tolist() == [1] * 5
  assert float(jnp.abs(d["mask"][K:]).sum()) == 0.0
  assert all(x.shape[0] == 16 for x in jax.tree.leaves((lora, d)))
  assert parallel.take_clients(r, K).tolist() == ranks.tolist()
  assert parallel.padded_size(11, 8) == 16 and parallel.padded_size(16, 8) == 16


@single_device
def test_inactive_client_is_unchanged(problem):
  spec, base, glob, ranks, data = problem
  lora, r, d = parallel.pad_clients(lora_lib.truncate(glob, ranks), ranks, data, K + 1)
  res = client_lib.vmap_backend(spec)(base, lora, r, d)
  assert float(res.examples[K]) == 0.0 and int(res.rank[K]) == 1
  _assert_close(jax.tree.map(lambda x: x[K], res.lora), jax.tree.map(lambda x: x[K], lora))
  assert float(sum(jnp.abs(x[K]).sum() for x in jax.tree.leaves(res.lora))) == 0.0


@single_device
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_equals_vmap(problem, reference, chunk):
  spec, base, glob, ranks, data = problem
  got = parallel.chunked_backend(spec, chunk)(base, lora_lib.truncate(glob, ranks), ranks, data)
  _assert_close(got, reference)


@single_device
def test_sequential_equals_vmap(problem, reference):
  spec, base, glob, ranks, data = problem
  got = client_lib.sequential_backend(spec)(base, lora_lib.truncate(glob, ranks), ranks, data)
  _assert_close(got, reference)


@single_device
def test_plan_chunk_size_fits_budget(problem):
  spec, base, glob, ranks, data = problem
  one = (lora_lib.mask(glob, ranks[0]), ranks[0], jax.tree.map(lambda x: x[0], data))
  m = [memory.cohort_memory(spec, base, one, c).total for c in (1, 2, 4)]
  assert m[0] < m[1] < m[2]
  budget = m[2] + (m[2] - m[1]) // 4          # room for 4 clients, not 5
  c = memory.plan_chunk_size(spec, base, one, budget, headroom=1.0)
  assert c == 4
  assert memory.plan_chunk_size(spec, base, one, 1 << 40, num_clients=K) == K
  with pytest.raises(ValueError, match="one client needs"):
    memory.plan_chunk_size(spec, base, one, m[0] // 2, headroom=1.0)


@single_device
def test_maybe_initialize_distributed_single_process(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
              "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(var, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert parallel.maybe_initialize_distributed() is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    parallel.maybe_initialize_distributed()


# ----------------------------------------------------------------------------- 8 devices


@needs_eight_devices
def test_has_eight_devices():
  assert jax.device_count() == NUM_DEVICES
  assert jax.config.jax_threefry_partitionable


@needs_eight_devices
@pytest.mark.parametrize("n_dev,chunk", [(8, None), (3, None), (4, 2)])
def test_sharded_equals_vmap(problem, reference, n_dev, chunk):
  got = _sharded(problem, n_dev, chunk)
  assert got.rank.shape == (K,)
  _assert_close(got, reference)


@needs_eight_devices
def test_sharded_inputs_are_split_over_clients(problem):
  spec, base, glob, ranks, data = problem
  mesh = parallel.client_mesh()
  lora, r, d = parallel.pad_clients(lora_lib.truncate(glob, ranks), ranks, data, 16)
  placed = parallel.put(d["mask"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients")))
  assert {s.data.shape for s in placed.addressable_shards} == {(2, STEPS, B)}
  base_r = parallel.put(base, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  again = parallel.put(base_r, base_r["head"]["kernel"].sharding)
  assert again["head"]["kernel"] is base_r["head"]["kernel"]  # already placed: no copy


SHARED_SIGNATURE = [n for n in methods.names()
                    if list(inspect.signature(methods.module(n).aggregate).parameters)[:4]
                    == ["lora", "ranks", "num_examples", "scales"]]


@needs_eight_devices
@pytest.mark.parametrize("name", SHARED_SIGNATURE)
def test_aggregators_on_sharded_arrays(problem, reference, name):
  """Every method's aggregator gives the same global adapter from sharded inputs."""
  spec, base, glob, ranks, data = problem
  mesh = parallel.client_mesh()
  res = _sharded(problem, NUM_DEVICES, None)   # == parallel.sharded_backend(spec, mesh)(...), built once
  n = jnp.arange(1.0, K + 1.0)
  s = lora_lib.scale(res.rank, spec.alpha, spec.scale_rule, R_MAX)
  agg = methods.module(name).aggregate
  want = agg(reference.lora, reference.rank, n, s)
  _assert_close(agg(res.lora, res.rank, n, s), want)
  # Evenly sharded inputs (K_pad = 16 with zero-weight inactive clients): a reduction over devices.
  lora16, r16, _ = parallel.pad_clients(res.lora, res.rank, data, 16)
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("clients"))
  lora16 = parallel.put(jax.device_get(lora16), shard)
  if name in ("homlora", "zero_pad", "hetlora", "ffa_lora"):  # padding with n_k = 0 leaves these unchanged
    n16 = parallel.put(jnp.concatenate([n, jnp.zeros(5)]), shard)
    s16 = parallel.put(jnp.concatenate([s, jnp.ones(5)]), shard)
    r16 = parallel.put(r16, shard)
    _assert_close(agg(lora16, r16, n16, s16), want)
    hlo = jax.jit(agg).lower(lora16, r16, n16, s16).compile().as_text()
    assert "all-reduce" in hlo  # partial sums per device, then one all-reduce


@needs_eight_devices
def test_round_sharded_equals_vmap(problem):
  """One full server round (mixed ranks, K=11, pruning), sharded evenly and unevenly, equals vmap
  (sequential and chunked equal vmap in the single-device suite)."""
  spec, base, glob, ranks, data = problem
  method = methods.get("hetlora", lam=1e-2, gamma=0.75, prune=True)
  spec = dataclasses.replace(spec, local=method.local)
  state = server.init(glob, ranks, method)
  cohort = jnp.arange(K, dtype=jnp.int32)
  n = jnp.arange(1.0, K + 1.0)
  backends = {
      "vmap": "vmap",
      "sharded8": parallel.sharded_backend(spec, parallel.client_mesh()),
      "sharded3": parallel.sharded_backend(spec, parallel.client_mesh(jax.devices()[:3])),
  }
  out = {name: server.make_round(spec, method, b)(state, base, cohort, data, n)
         for name, b in backends.items()}
  want_state, want_res = out["vmap"]
  assert int((want_res.rank != ranks).sum()) > 0  # self-pruning changed some ranks
  for name, (st, res) in out.items():
    _assert_close(st.method_state, want_state.method_state)
    _assert_close(res, want_res)
    assert st.client_ranks.tolist() == want_state.client_ranks.tolist(), name


# ----------------------------------------------------------------------------- 2 processes


def _distributed_worker(out_path: str) -> None:
  """One of two processes (2 CPU devices each): sharded round over the 4 global devices. Writes the
  result's leaves to ``out_path``; the test compares them with its one-process vmap reference (so the
  children compile only the sharded program)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  assert parallel.maybe_initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 4
  spec, base, glob, ranks, data = _problem()
  data = jax.device_get(data)  # host values, identical in both processes
  got = parallel.sharded_backend(spec, parallel.client_mesh())(
      base, lora_lib.truncate(glob, ranks), ranks, data)
  np.savez(out_path, *[np.asarray(x) for x in jax.tree.leaves(got)])
  print("WROTE", out_path, flush=True)


@full_tests_only
@single_device
def test_two_processes_jax_distributed(reference, tmp_path):
  """The sharded backend under jax.distributed (2 processes x 2 CPU devices) == one-device vmap."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, __file__, "--distributed-worker",
                                   str(tmp_path / f"process{pid}.npz")], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  want = jax.tree.leaves(reference)
  for pid, (p, (out, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, err[-3000:]
    with np.load(tmp_path / f"process{pid}.npz") as got:
      got = [got[f"arr_{i}"] for i in range(len(got.files))]
    assert len(got) == len(want), out
    _assert_close(got, want)


if __name__ == "__main__" and "--distributed-worker" in sys.argv:
  _distributed_worker(sys.argv[sys.argv.index("--distributed-worker") + 1])
