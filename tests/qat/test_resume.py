"""A QAT run killed with SIGKILL in the middle of stage 1 and again in the middle of stage 2,
started again each time, ends with exactly the parameters (and stage-2 losses) of a run that
was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _start(model_dir, checkpoints, result, log: Path):
    """The worker, logging into `log` (a file: orbax logs more than a pipe holds unread)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.qat.resume_worker", str(model_dir), str(checkpoints), str(result)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )
    process.log = log
    return process


def _steps_saved(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]


def _kill_when(process, condition, timeout=300.0) -> str:
    """Kill the run with SIGKILL once `condition()` holds; returns what it logged."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {process.log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the run never reached the point to kill it at")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return process.log.read_text()


@pytest.mark.slow
def test_killed_twice_and_resumed_ends_with_the_uninterrupted_parameters(tmp_path):
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    model_dir = tmp_path / "model"
    tiny_checkpoints.write_tiny_checkpoint("llama", model_dir, sharded=False)

    reference = _start(model_dir, tmp_path / "ref_ckpt", tmp_path / "ref.npz", tmp_path / "ref.log")
    checkpoints = tmp_path / "ckpt"
    run = _start(model_dir, checkpoints, tmp_path / "resumed.npz", tmp_path / "run1.log")
    # Block 0 finished and stored; block 1 part way through its steps.
    _kill_when(run, lambda: max(_steps_saved(checkpoints / "block_state" / "001"), default=0) >= 3)
    assert (checkpoints / "blocks" / "block_000").is_dir()
    run = _start(model_dir, checkpoints, tmp_path / "resumed.npz", tmp_path / "run2.log")
    logged = _kill_when(run, lambda: max(_steps_saved(checkpoints / "e2e_state"), default=0) >= 3)
    assert "block_state/001 step" in logged and "through 1 finished blocks" in logged  # resumed, not restarted
    assert not (checkpoints / "block_state" / "001").exists()  # spent once block 1 was stored
    run = _start(model_dir, checkpoints, tmp_path / "resumed.npz", tmp_path / "run3.log")
    for process in (run, reference):
        assert process.wait(timeout=300) == 0, process.log.read_text()[-2000:]
    assert "e2e_state step" in run.log.read_text()

    with np.load(tmp_path / "ref.npz") as ref, np.load(tmp_path / "resumed.npz") as resumed:
        assert set(ref.files) == set(resumed.files) and len(ref.files) > 10
        for name in ref.files:
            np.testing.assert_array_equal(resumed[name], ref[name], err_msg=name)
        assert np.all(ref["losses"] > 0)
