"""Runs every ``needs_eight_devices`` test in one fresh process with 8 forced host devices.

XLA creates the devices only if ``--xla_force_host_platform_device_count=8``
is set before JAX starts, so the sharded tests of ``test_parallel.py`` and
``test_methods_conformance.py`` run here, in a child pytest, once. A heavy check (about 2
minutes on 2 cores): it runs with ``HETLORA_FULL_TESTS=1`` (CI's second command).
"""

import os
import subprocess
import sys
from pathlib import Path

from conftest import full_tests_only, single_device

FILES = ["test_parallel.py", "test_methods_conformance.py"]


@full_tests_only
@single_device
def test_eight_device_suite():
  flags = "--xla_force_host_platform_device_count=8 " + os.environ.get("XLA_FLAGS", "")
  env = dict(os.environ, HETLORA_EIGHT_DEVICE_CHILD="1", JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8",
             XLA_FLAGS=flags.strip())
  here = Path(__file__).resolve().parent
  proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         *(str(here / f) for f in FILES)], env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]
