"""Two local processes with jax.distributed (gloo collectives on CPU, two devices each, a
(data 2, model 2) mesh): capture and a few steps of each QAT stage agree with one process,
and a two-process run killed (SIGKILL, both processes) in stage 1 and again in stage 2
resumes from its sharded checkpoints to exactly the uninterrupted two-process result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.parallel.common import QAT, tiny_problem, write_checkpoint
from tests.qat.test_resume import _kill_when, _steps_saved

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class _Pair:
    """The two worker processes of one run."""

    def __init__(self, model_dir: Path, checkpoints: Path, result: Path, logs: Path):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        port = str(_free_port())
        command = [sys.executable, "-m", "tests.parallel.multihost_worker"]
        self.processes = []
        for rank in (0, 1):
            log = Path(f"{logs}.rank{rank}.log")
            process = subprocess.Popen(
                command + [str(rank), port, str(model_dir), str(checkpoints), str(result)],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
            )
            process.log = log
            self.processes.append(process)

    def wait(self) -> None:
        for process in self.processes:
            assert process.wait(timeout=400) == 0, process.log.read_text()[-3000:]

    def kill_when(self, condition) -> str:
        leader, follower = self.processes
        logged = _kill_when(leader, condition)
        follower.kill()
        follower.wait()
        return logged


def _load(result: Path, rank: int) -> dict:
    with np.load(f"{result}.rank{rank}.npz") as data:
        return {name: data[name] for name in data.files}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("multihost") / "model"
    write_checkpoint(directory)
    return directory


@pytest.fixture(scope="module")
def uninterrupted(model_dir):
    work = model_dir.parent
    pair = _Pair(model_dir, work / "ckpt_ref", work / "ref", work / "ref")
    pair.wait()
    return _load(work / "ref", 0), _load(work / "ref", 1)


@pytest.mark.slow
def test_two_processes_agree_with_one(model_dir, uninterrupted, tmp_path):
    from mpq_jax.capture import block_statistics, embed_tokens
    from mpq_jax.qat.stages import block_stage, e2e_stage

    leader, follower = uninterrupted
    assert tuple(leader["share"]) == (0, 2) and tuple(follower["share"]) == (1, 2)
    for name in leader:  # both processes end with the same values
        if name != "share":
            np.testing.assert_array_equal(leader[name], follower[name], err_msg=name)

    model, packed, tokens = tiny_problem(model_dir)
    hidden = np.asarray(embed_tokens(model.params["embed_tokens"]["weight"], tokens))
    for name, stats in block_statistics(model.params["layers"][0], model.spec, hidden).items():
        scale = np.max(np.abs(stats.hessian))
        np.testing.assert_allclose(leader[f"hessian/{name}"], stats.hessian, rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    after_block, block_note = block_stage(model.params, packed, model.spec, tokens, QAT, tmp_path, "one", progress=False)
    _, e2e_note = e2e_stage(after_block, model.spec, tokens, QAT, tmp_path, "one", progress=False)
    for name, curve in block_note.losses.items():
        np.testing.assert_allclose(leader[f"block/{name}"], curve, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(leader["e2e"], e2e_note.losses["e2e"], rtol=2e-5)
    assert len(leader["e2e"]) == 3 and leader["e2e"][-1] < leader["e2e"][0]


@pytest.mark.slow
def test_two_processes_killed_twice_resume_from_sharded_checkpoints(model_dir, uninterrupted, tmp_path):
    checkpoints, result = tmp_path / "ckpt", tmp_path / "run"
    pair = _Pair(model_dir, checkpoints, result, tmp_path / "run1")
    pair.kill_when(lambda: max(_steps_saved(checkpoints / "block_state" / "001"), default=0) >= 1)
    assert (checkpoints / "blocks" / "block_000").is_dir()
    pair = _Pair(model_dir, checkpoints, result, tmp_path / "run2")
    logged = pair.kill_when(lambda: max(_steps_saved(checkpoints / "e2e_state"), default=0) >= 1)
    assert "block_state/001 step" in logged and "through 1 finished blocks" in logged
    pair = _Pair(model_dir, checkpoints, result, tmp_path / "run3")
    pair.wait()
    assert "e2e_state step" in pair.processes[0].log.read_text()
    reference, resumed = uninterrupted[0], _load(result, 0)
    assert set(resumed) == set(reference)
    for name in reference:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
