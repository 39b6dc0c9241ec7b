"""Sequential capture: the captured tensors are exactly what feeds each linear, Hessians and
moments match a float64 reference, pooling equals capturing all sources at once, and block
i+1 sees the outputs of the (quantized) block i."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from mpq_jax.capture import (
    block_outputs,
    block_statistics,
    embed_tokens,
    rope_for,
    sequential_quantize,
)
from mpq_jax.models.decoder import LINEAR_INPUT_OF, LINEAR_INPUTS, block_forward, linear, rms_norm
from mpq_jax.packed.io import TENSORS_FILE
from mpq_jax.quant.rtn_model import quantize_model_rtn
from mpq_jax.stats import pooled_statistics


@pytest.fixture(scope="module")
def tiny(load_tiny_model):
    return load_tiny_model("qwen3")


def tokens(tiny, n, seq, seed):
    return np.random.default_rng(seed).integers(0, tiny.spec.vocab_size, (n, seq)).astype(np.int32)


def test_captured_inputs_are_what_feeds_each_linear(tiny):
    spec, layer = tiny.spec, tiny.params["layers"][0]
    h = embed_tokens(tiny.params["embed_tokens"]["weight"], jnp.asarray(tokens(tiny, 2, 20, 0)))
    cos, sin = rope_for(spec, 20)
    out, inputs = block_forward(layer, spec, h, cos, sin)
    assert set(inputs) == set(LINEAR_INPUTS) == set(LINEAR_INPUT_OF.values())
    # Rebuild the block from the captured tensors: if any were not the true linear inputs,
    # the residual stream would not close.
    h_mid = h + linear(layer["self_attn"]["o_proj"], inputs["o_proj_in"])
    np.testing.assert_allclose(np.asarray(inputs["mlp_in"]), np.asarray(rms_norm(h_mid, layer["post_attention_layernorm"]["weight"], spec.rms_norm_eps)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(h_mid + linear(layer["mlp"]["down_proj"], inputs["down_proj_in"])), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(inputs["attn_in"]), np.asarray(rms_norm(h, layer["input_layernorm"]["weight"], spec.rms_norm_eps)))


def test_statistics_match_float64_reference_and_ignore_batching(tiny):
    spec, layer = tiny.spec, tiny.params["layers"][1]
    hidden = np.asarray(embed_tokens(tiny.params["embed_tokens"]["weight"], jnp.asarray(tokens(tiny, 5, 16, 1))))
    got = block_statistics(layer, spec, hidden, batch_size=2)
    again = block_statistics(layer, spec, hidden, batch_size=5)
    _, inputs = block_forward(layer, spec, jnp.asarray(hidden), *rope_for(spec, 16))
    for name in LINEAR_INPUTS:
        x = np.asarray(inputs[name], np.float64).reshape(-1, inputs[name].shape[-1])
        references = {"hessian": 2 * x.T @ x / x.shape[0], "mean": x.mean(axis=0), "mean_abs": np.abs(x).mean(axis=0)}
        for field, reference in references.items():
            # float32 sums of 80 terms: relative error ~1e-6 of the largest entry
            scale = np.abs(reference).max()
            assert np.abs(getattr(got[name], field) - reference).max() <= 1e-5 * scale, field
            assert np.abs(getattr(again[name], field) - getattr(got[name], field)).max() <= 1e-5 * scale, field
        np.testing.assert_array_equal(got[name].hessian, got[name].hessian.T)  # symmetric by construction


def test_hessian_is_exactly_symmetric_when_the_gemm_is_not(tiny, monkeypatch):
    """Another CPU's GEMM sums XᵀX in another order, so its two triangles differ in the last
    bits; simulate that with a relative 1e-6 perturbation of one triangle: H must still be
    exactly symmetric (GPTQ's Cholesky and the saliency assume it)."""
    import mpq_jax.capture as capture

    exact = capture._add_moments

    def skewed(sums, x):
        gram, total, total_abs = exact(sums, x)
        return gram * (1 + 1e-6 * jnp.triu(jnp.ones_like(gram), 1)), total, total_abs

    monkeypatch.setattr(capture, "_add_moments", skewed)
    hidden = np.asarray(embed_tokens(tiny.params["embed_tokens"]["weight"], jnp.asarray(tokens(tiny, 2, 16, 1))))
    for name, stats in block_statistics(tiny.params["layers"][0], tiny.spec, hidden).items():
        np.testing.assert_array_equal(stats.hessian, stats.hessian.T, err_msg=name)


def test_pooled_statistics_equal_capturing_all_sources_together(tiny):
    spec, layer = tiny.spec, tiny.params["layers"][0]
    embed = tiny.params["embed_tokens"]["weight"]
    a, b = tokens(tiny, 3, 16, 2), tokens(tiny, 1, 16, 3)
    per_source = {src: block_statistics(layer, spec, np.asarray(embed_tokens(embed, jnp.asarray(t)))) for src, t in (("a", a), ("b", b))}
    pooled = pooled_statistics(per_source, {"a": a.size, "b": b.size})
    together = block_statistics(layer, spec, np.asarray(embed_tokens(embed, jnp.asarray(np.concatenate([a, b])))))
    for name in LINEAR_INPUTS:
        for field in ("hessian", "mean", "mean_abs"):
            want = getattr(together[name], field)
            assert np.abs(getattr(pooled[name], field) - want).max() <= 1e-5 * np.abs(want).max(), field


@pytest.mark.parametrize("propagate_quantized", [True, False])
def test_next_block_sees_the_chosen_outputs(tiny, propagate_quantized):
    spec, params = tiny.spec, tiny.params
    calibration = {"a": tokens(tiny, 2, 12, 4)}
    rtn = quantize_model_rtn(params, 2, 16)
    seen = {}

    def quantize_block(index, layer, hessians):
        seen[index] = hessians
        return rtn["layers"][index]

    result = sequential_quantize(params, spec, calibration, quantize_block, propagate_quantized=propagate_quantized, progress=False)
    assert all(a is b for a, b in zip(result["layers"], rtn["layers"], strict=True))
    assert result["embed_tokens"] is params["embed_tokens"]
    hidden0 = np.asarray(embed_tokens(params["embed_tokens"]["weight"], jnp.asarray(calibration["a"])))
    feed = rtn["layers"][0] if propagate_quantized else params["layers"][0]
    expected = block_statistics(params["layers"][1], spec, block_outputs(feed, spec, hidden0))
    for name in LINEAR_INPUTS:
        np.testing.assert_allclose(seen[1]["a"][name].hessian, expected[name].hessian, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen[1]["a"][name].mean, expected[name].mean, rtol=1e-5, atol=1e-6)


class Interrupted(Exception):
    pass


def test_killed_run_resumes_after_last_finished_block(tiny, tmp_path):
    spec, params = tiny.spec, tiny.params
    calibration = {"a": tokens(tiny, 2, 12, 5)}
    rtn = quantize_model_rtn(params, 3, 16)
    uninterrupted = sequential_quantize(params, spec, calibration, lambda i, layer, h: rtn["layers"][i], progress=False)

    notes = {}

    def dies_at_block_1(index, layer, hessians):
        if index == 1:
            raise Interrupted
        notes[f"block{index}"] = 0.5
        return rtn["layers"][index]

    with pytest.raises(Interrupted):
        sequential_quantize(params, spec, calibration, dies_at_block_1, resume_dir=tmp_path / "ckpt", fingerprint="f1",
                            progress=False, block_notes=notes)
    called, notes_after = [], {}

    def records(index, layer, hessians):
        called.append(index)
        notes_after[f"block{index}"] = 1.5
        return rtn["layers"][index]

    resumed = sequential_quantize(params, spec, calibration, records, resume_dir=tmp_path / "ckpt", fingerprint="f1",
                                  progress=False, block_notes=notes_after)
    assert called == [1]  # block 0 came from the checkpoint
    assert notes_after == {"block0": 0.5, "block1": 1.5}  # the finished block's notes survive the kill
    x = jnp.asarray(tokens(tiny, 1, 10, 6))
    from mpq_jax.models import forward

    np.testing.assert_array_equal(np.asarray(forward(resumed, spec, x)), np.asarray(forward(uninterrupted, spec, x)))
    called.clear()
    sequential_quantize(params, spec, calibration, records, resume_dir=tmp_path / "ckpt", fingerprint="other", progress=False)
    assert called == [0, 1]  # other settings: start over


def test_corrupt_resume_checkpoint_is_moved_aside_and_the_run_starts_over(tiny, tmp_path, caplog):
    spec, params = tiny.spec, tiny.params
    calibration = {"a": tokens(tiny, 2, 12, 7)}
    rtn = quantize_model_rtn(params, 3, 16)
    resume_dir = tmp_path / ".resume"

    def dies_at_block_1(index, layer, hessians):
        if index == 1:
            raise Interrupted
        return rtn["layers"][index]

    with pytest.raises(Interrupted):
        sequential_quantize(params, spec, calibration, dies_at_block_1, resume_dir=resume_dir, fingerprint="f1", progress=False)
    tensors = resume_dir / "block_000" / TENSORS_FILE  # the one finished block, in its own folder
    raw = bytearray(tensors.read_bytes())
    raw[-64:] = bytes(64)  # same size, other bytes: what a disk error leaves
    tensors.write_bytes(bytes(raw))
    called = []

    def records(index, layer, hessians):
        called.append(index)
        return rtn["layers"][index]

    with caplog.at_level(logging.WARNING, logger="mpq_jax.block_store"):
        sequential_quantize(params, spec, calibration, records, resume_dir=resume_dir, fingerprint="f1", progress=False)
    assert called == [0, 1]  # nothing trusted from the broken checkpoint
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".resume.corrupt-")]
    assert len(aside) == 1 and (aside[0] / "block_000" / TENSORS_FILE).read_bytes() == bytes(raw)
    assert str(resume_dir) in caplog.text and str(aside[0]) in caplog.text and "starting over" in caplog.text
    assert all((resume_dir / f"block_{i:03d}" / TENSORS_FILE).is_file() for i in (0, 1))  # the new run checkpointed afresh


def test_hessian_cache_serves_fp_propagation_without_forward_passes(tiny, tmp_path, monkeypatch):
    import mpq_jax.capture as capture

    spec, params = tiny.spec, tiny.params
    calibration = {"a": tokens(tiny, 2, 12, 7), "b": tokens(tiny, 1, 12, 8)}
    rtn = quantize_model_rtn(params, 4, 16)

    def recorder(seen: dict):
        def quantize_block(index, layer, hessians):
            seen[index] = hessians
            return rtn["layers"][index]

        return quantize_block

    direct = {}
    sequential_quantize(params, spec, calibration, recorder(direct), propagate_quantized=False, progress=False)

    cache = capture.HessianCache(tmp_path, "calib-fingerprint")
    cached = {}
    sequential_quantize(params, spec, calibration, recorder(cached), propagate_quantized=False, hessian_cache=cache, progress=False)
    assert cache.complete(spec.num_layers)
    for index in direct:
        for src in calibration:
            for name in direct[index][src]:
                for field in ("hessian", "mean", "mean_abs"):
                    np.testing.assert_array_equal(getattr(cached[index][src][name], field), getattr(direct[index][src][name], field))

    # A second run with a complete cache runs no block forward at all.
    def no_forward(*args, **kwargs):
        raise AssertionError("forward pass despite a complete cache")

    monkeypatch.setattr(capture, "block_statistics", no_forward)
    monkeypatch.setattr(capture, "block_outputs", no_forward)
    again = {}
    sequential_quantize(params, spec, calibration, recorder(again), propagate_quantized=False, hessian_cache=cache, progress=False)
    np.testing.assert_array_equal(again[1]["b"]["mlp_in"].hessian, direct[1]["b"]["mlp_in"].hessian)
    with pytest.raises(ValueError, match="propagate_quantized=False"):
        sequential_quantize(params, spec, calibration, lambda i, layer, h: layer, hessian_cache=cache, progress=False)
