"""A QAT run (both stages) on the tiny model, for the kill-and-resume test.

    python -m tests.qat.resume_worker MODEL_DIR CHECKPOINTS_DIR RESULT.npz

Each checkpoint is followed by a short sleep, so that the test can kill the process between
steps of a stage; the training itself is the library's.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import jax
import numpy as np

from mpq_jax.config import QatBlockConfig, QatConfig, QatE2eConfig
from mpq_jax.models import load_model
from mpq_jax.qat import loop
from mpq_jax.qat.stages import block_stage, e2e_stage
from mpq_jax.quant.rtn_model import quantize_model_rtn

QAT = QatConfig(
    enabled=True,
    seq_len=16,
    checkpoint_every=1,
    block=QatBlockConfig(samples=8, epochs=2, batch_size=2, lr_weight=1e-2, lr_quant=1e-2),
    e2e=QatE2eConfig(samples=8, epochs=2, batch_size=2, effective_batch=4, lr=1e-2, warmup=0.25),
)


def main(model_dir: str, checkpoints: str, result: str) -> None:
    save = loop.TrainCheckpoints.save

    def slow_save(self, state, final=False):
        save(self, state, final)
        time.sleep(0.3)

    loop.TrainCheckpoints.save = slow_save
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model = load_model(model_dir, with_tokenizer=False)
    packed = quantize_model_rtn(model.params, 2, 16)
    tokens = np.random.default_rng(0).integers(0, model.spec.vocab_size, (8, 16)).astype(np.int32)
    root = Path(checkpoints)
    after_block, _ = block_stage(model.params, packed, model.spec, tokens, QAT, root, "resume-test", progress=False)
    after_e2e, note = e2e_stage(after_block, model.spec, tokens, QAT, root, "resume-test", progress=False)
    leaves = {f"{i:04d}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(after_e2e))}
    np.savez(result, losses=np.asarray(note.losses["e2e"]), **leaves)


if __name__ == "__main__":
    main(*sys.argv[1:4])
