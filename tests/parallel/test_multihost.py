"""Two local processes with jax.distributed (gloo collectives on CPU, two devices each, a
(data 2, model 2) mesh): capture and a few steps of each QAT stage agree with one process;
a two-process run killed (SIGKILL, both processes) in stage 1 and again in stage 2 resumes
from its sharded checkpoints to exactly the uninterrupted two-process result; and the
command line run on two processes (GPTQ capture split over them, QAT sharded, process 0
saving and reporting) matches one process."""

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


CLI_CONFIG = """\
model: {model}
quantization: {{method: gptq, bits: 2, group_size: 16, propagate: fp}}
calibration: {{sources: [wikipedia, code], n_samples: 8, seq_len: 32}}
qat:
  enabled: true
  seq_len: 32
  checkpoint_every: 1
  block: {{samples: 8, epochs: 2, batch_size: 8, lr_weight: 1.0e-3, lr_quant: 1.0e-3}}
  e2e: {{samples: 8, epochs: 2, batch_size: 8, effective_batch: 8, warmup: 0.0, lr: 1.0e-3}}
eval:
  perplexity: {{sets: [wikitext2], max_windows: 1, seq_len: 64}}
  compare_fp: false
parallel: {{enabled: {enabled}, data: 2, model: 2}}
"""


@pytest.mark.slow
def test_quantize_cli_on_two_processes(tmp_path, shared_dir):
    """The command line as every host of a pod runs it: GPTQ's capture split over both
    processes' devices, QAT sharded, process 0 alone saving and reporting; the same losses
    and perplexity as one process on the same statistics."""
    import json

    from tests.tiny_checkpoints import write_tiny_checkpoint_with_real_tokenizer

    from mpq_jax.quantize import main

    model_dir = tmp_path / "tiny"
    write_tiny_checkpoint_with_real_tokenizer("llama", model_dir, intermediate_size=128)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPQ_CACHE_DIR": str(cache), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    config = tmp_path / "two.yaml"
    config.write_text(CLI_CONFIG.format(model=model_dir, enabled="true"))
    port = str(_free_port())
    out = tmp_path / "two"
    processes = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "mpq_jax.quantize", "--config", str(config), "--output", str(out),
                   "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(rank)]
        log = (tmp_path / f"cli{rank}.log").open("w")
        processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    for rank, process in enumerate(processes):
        assert process.wait(timeout=600) == 0, (tmp_path / f"cli{rank}.log").read_text()[-3000:]
    two = json.loads((out / "report.json").read_text())
    assert two["qat"]["mesh"] == {"data": 2, "model": 2}
    assert "report:" in (tmp_path / "cli0.log").read_text() and "report:" not in (tmp_path / "cli1.log").read_text()
    assert not (out / ".qat").exists() and not (out / ".resume").exists()

    os.environ["MPQ_CACHE_DIR"] = str(cache)  # the same statistics, read from the cache
    try:
        alone_config = tmp_path / "one.yaml"
        alone_config.write_text(CLI_CONFIG.format(model=model_dir, enabled="false"))
        assert main(["--config", str(alone_config), "--output", str(tmp_path / "one")]) == 0
    finally:
        del os.environ["MPQ_CACHE_DIR"]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert [row["gptq_loss"] for row in two["layers"]] == [row["gptq_loss"] for row in one["layers"]]
    for stage in ("block", "e2e"):
        for name, curve in one["qat"][stage]["losses"].items():
            np.testing.assert_allclose(two["qat"][stage]["losses"][name], curve, rtol=2e-5, err_msg=f"{stage} {name}")
    assert two["perplexity"]["ppl"] == pytest.approx(one["perplexity"]["ppl"], rel=1e-4)

    # The cached statistics came from both processes' devices: compare with one device's.
    from mpq_jax.capture import HessianCache, fill_hessian_cache
    from mpq_jax.config import load_config
    from mpq_jax.models import load_model
    from mpq_jax.pipeline import calibration_for

    model = load_model(model_dir)
    calibration = calibration_for(model.tokenizer, load_config(config))
    (folder,) = [p for p in (cache / "hessians").iterdir() if p.is_dir()]
    reference = HessianCache(tmp_path / "one_device", "x")
    fill_hessian_cache(model.params, model.spec, calibration, reference, progress=False)
    for index in range(model.spec.num_layers):
        got, want = HessianCache(folder.parent, folder.name).load(index), reference.load(index)
        for src in want:
            for name, stats in want[src].items():
                scale = np.max(np.abs(stats.hessian))
                np.testing.assert_allclose(got[src][name].hessian, stats.hessian, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{index} {src} {name}")
