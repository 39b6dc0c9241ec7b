"""The tiny problem every mesh test trains: a Llama-shaped checkpoint whose widths divide by
8 (so every rule can shard), 2-bit RTN in groups of 8, and eight random windows."""

from __future__ import annotations

import dataclasses

import numpy as np

from mpq_jax.config import QatBlockConfig, QatConfig, QatE2eConfig

SEQ = 16
WINDOWS = 8
# Full batches: every step sees all windows, so runs that split them differently (one
# process, two processes each permuting its own share) take the same steps.
QAT = QatConfig(
    enabled=True,
    seq_len=SEQ,
    checkpoint_every=1,
    block=QatBlockConfig(samples=WINDOWS, epochs=3, batch_size=WINDOWS, lr_weight=1e-2, lr_quant=1e-2),
    e2e=QatE2eConfig(samples=WINDOWS, epochs=3, batch_size=WINDOWS, effective_batch=WINDOWS, lr=1e-2, lr_weight=1e-3, warmup=0.0),
)
CHECKPOINT = {"vocab_size": 256, "intermediate_size": 128}


def qat_config(**changes) -> QatConfig:
    block = dataclasses.replace(QAT.block, **changes.pop("block", {}))
    e2e = dataclasses.replace(QAT.e2e, **changes.pop("e2e", {}))
    return dataclasses.replace(QAT, block=block, e2e=e2e, **changes)


def write_checkpoint(directory) -> None:
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint("llama", directory, sharded=False, **CHECKPOINT)


def tiny_problem(model_dir):
    """(loaded model, its 2-bit g8 RTN params, int32 windows [8, 16])."""
    from mpq_jax.models import load_model
    from mpq_jax.quant.rtn_model import quantize_model_rtn

    model = load_model(model_dir, with_tokenizer=False)
    packed = quantize_model_rtn(model.params, 2, 8)
    tokens = np.random.default_rng(0).integers(0, model.spec.vocab_size, (WINDOWS, SEQ)).astype(np.int32)
    return model, packed, tokens
