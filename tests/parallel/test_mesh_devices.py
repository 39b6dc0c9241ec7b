"""tests/parallel/test_mesh.py in a process of its own with eight CPU devices: the device
count is fixed when JAX starts, and the rest of the suite runs on one device (with eight,
every test process's XLA client runs eight devices' worth of threads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_mesh_tests_pass_on_eight_cpu_devices():
    # XLA stops reading XLA_FLAGS at a token that is not a flag, so the count goes first.
    flags = ("--xla_force_host_platform_device_count=8 " + os.environ.get("XLA_FLAGS", "")).strip()
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "tests/parallel/test_mesh.py"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1], done.stdout[-2000:]
