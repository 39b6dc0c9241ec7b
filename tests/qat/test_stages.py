"""Both QAT stages on a tiny model: the loss falls, lr = 0 changes nothing, only the trainable
set moves, and the trained model comes back in packed form computing what training computed."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mpq_jax.capture import rope_for
from mpq_jax.config import QatBlockConfig, QatConfig, QatE2eConfig
from mpq_jax.models.decoder import decoder_block, final_hidden
from mpq_jax.packed.qlinear import QuantizedLinear
from mpq_jax.qat.stages import block_stage, e2e_stage
from mpq_jax.quant.rtn_model import quantize_model_rtn

SEQ = 16


def _qat(**changes) -> QatConfig:
    block = QatBlockConfig(samples=8, epochs=4, batch_size=2, lr_weight=1e-2, lr_quant=1e-2)
    e2e = QatE2eConfig(samples=8, epochs=2, batch_size=2, effective_batch=4, lr=1e-2, lr_weight=1e-3, warmup=0.0)
    qat = QatConfig(enabled=True, seq_len=SEQ, checkpoint_every=0, block=block, e2e=e2e)
    for section in ("block", "e2e"):
        if section in changes:
            changes[section] = dataclasses.replace(getattr(qat, section), **changes[section])
    return dataclasses.replace(qat, **changes)


@pytest.fixture(scope="module")
def tiny(load_tiny_model):
    model = load_tiny_model("llama")
    packed = quantize_model_rtn(model.params, 2, 16)
    tokens = np.random.default_rng(0).integers(0, model.spec.vocab_size, (8, SEQ)).astype(np.int32)
    return model, packed, tokens


def _linears(params):
    return [leaf for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedLinear)) if isinstance(leaf, QuantizedLinear)]


def _segment_arrays(params, field):
    return [np.asarray(getattr(seg, field)) for ql in _linears(params) for seg in ql.segments if getattr(seg, field) is not None]


def test_block_stage_lowers_every_blocks_loss(tiny, tmp_path):
    model, packed, tokens = tiny
    trained, note = block_stage(model.params, packed, model.spec, tokens, _qat(), tmp_path, "fp", progress=False)
    assert len(note.losses) == model.spec.num_layers
    assert all(len(curve) == 4 * 4 for curve in note.losses.values())
    # Measured on every window, not on the noisy per-batch curve: block 0 (whose input is
    # the embedding for both models) and the whole model's final hidden states.
    h = model.params["embed_tokens"]["weight"][tokens]
    cos, sin = rope_for(model.spec, SEQ)
    target = decoder_block(model.params["layers"][0], model.spec, h, cos, sin)
    before = np.mean(np.square(decoder_block(packed["layers"][0], model.spec, h, cos, sin) - target))
    after = np.mean(np.square(decoder_block(trained["layers"][0], model.spec, h, cos, sin) - target))
    assert after < 0.9 * before
    fp_final = final_hidden(model.params, model.spec, tokens)
    assert np.mean(np.square(final_hidden(trained, model.spec, tokens) - fp_final)) < np.mean(np.square(final_hidden(packed, model.spec, tokens) - fp_final))
    assert all(isinstance(ql, QuantizedLinear) for ql in _linears(trained)) and len(_linears(trained)) == len(_linears(packed))
    changed = [not np.array_equal(a, b) for a, b in zip(_segment_arrays(trained, "codes"), _segment_arrays(packed, "codes"))]
    assert any(changed)
    np.testing.assert_array_equal(np.asarray(trained["layers"][0]["input_layernorm"]["weight"]), np.asarray(packed["layers"][0]["input_layernorm"]["weight"]))


def test_zero_learning_rates_change_nothing(tiny, tmp_path):
    model, packed, tokens = tiny
    qat = _qat(block={"lr_weight": 0.0, "lr_quant": 0.0}, e2e={"lr": 0.0, "lr_weight": 0.0})
    after_block, _ = block_stage(model.params, packed, model.spec, tokens, qat, tmp_path / "a", "zero", progress=False)
    after_e2e, note = e2e_stage(after_block, model.spec, tokens, qat, tmp_path / "b", "zero", progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(after_e2e), jax.tree_util.tree_leaves(packed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert note.trained_parameters > 0


@pytest.mark.parametrize("trainable", ["step_sizes", "paper"])
def test_e2e_moves_only_the_trainable_set_and_lowers_the_loss(tiny, tmp_path, trainable):
    model, packed, tokens = tiny
    trained, note = e2e_stage(packed, model.spec, tokens, _qat(e2e={"trainable": trainable, "epochs": 4}), tmp_path, trainable, progress=False)
    curve = note.losses["e2e"]
    assert np.mean(curve[-4:]) < np.mean(curve[:4])
    # RTN has no 16-bit columns, so both sets are the scales: zeros and codes stay as they were.
    for field in ("zero",):
        for a, b in zip(_segment_arrays(trained, field), _segment_arrays(packed, field)):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_segment_arrays(trained, "scale"), _segment_arrays(packed, "scale")))
    frozen_before = [leaf for leaf in jax.tree_util.tree_leaves({k: v for k, v in packed.items() if k != "layers"})]
    frozen_after = [leaf for leaf in jax.tree_util.tree_leaves({k: v for k, v in trained.items() if k != "layers"})]
    for a, b in zip(frozen_after, frozen_before):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_training_runs_and_returns_the_packed_dtypes(tiny, tmp_path):
    model, packed, tokens = tiny
    qat = _qat(dtype="bfloat16", block={"epochs": 1}, e2e={"epochs": 1})
    trained, note = block_stage(model.params, packed, model.spec, tokens, qat, tmp_path / "a", "bf16", progress=False)
    trained, e2e_note = e2e_stage(trained, model.spec, tokens, qat, tmp_path / "b", "bf16", progress=False)
    assert all(np.isfinite(c).all() for c in note.losses.values()) and np.isfinite(e2e_note.losses["e2e"]).all()
    for a, b in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(packed)):
        assert a.dtype == b.dtype and a.shape == b.shape
