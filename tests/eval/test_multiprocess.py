"""Two processes with jax.distributed on CPU: process 0 drives the harness model, process 1
follows every scoring batch (`follow_batches`) and stops when told; the scores equal a
single-process run's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

REQUESTS = [
    ("Question: Which gas do plants take in from the air?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants take in from the air?\nAnswer:", " A"),
    ("Question: Which gas do plants take in from the air?\nAnswer:", " B"),
    ("The tower is 324 metres tall, about the same height as an 81-storey building, and", " the tallest structure in Paris."),
    ("Robert Boulter is an English film and television actor.", " He had a guest starring role."),
]


def harness_options() -> dict:
    return {"batch_size": 2, "batch_tokens": 64, "max_length": 64, "progress": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_followers_run_every_batch_and_scores_match_one_process(tmp_path):
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    from lm_eval.api.instance import Instance

    from mpq_jax.eval.harness import MpqJaxLM

    checkpoint = tmp_path / "tiny"
    tiny_checkpoints.write_tiny_checkpoint_with_real_tokenizer("llama", checkpoint)
    port = str(_free_port())
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "tests.eval.multiprocess_worker"]
    workers = [
        subprocess.Popen(command + [str(rank), port, str(checkpoint)], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    leader, follower = outputs
    assert leader["batches"] >= 2 and follower["followed"] == leader["batches"]

    lm = MpqJaxLM(path=str(checkpoint), **harness_options())
    alone = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=a, idx=i) for i, a in enumerate(REQUESTS)])
    np.testing.assert_allclose([s[0] for s in leader["scores"]], [s[0] for s in alone], rtol=1e-6)
    assert [s[1] for s in leader["scores"]] == [s[1] for s in alone]
