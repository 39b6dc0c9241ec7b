"""The decoder's numerical pieces against float64 numpy references on fresh random inputs.

Tolerances, with unit roundoffs u32 = 2**-24 (float32) and u16 = 2**-8 (bfloat16, 8 significant
bits):
  * attention, float32: a score q·k/sqrt(hd) over hd=16 products of N(0, 1) values is off by
    at most ~hd·u32·max|q_i k_i| ≈ 16·6e-8·20 ≈ 2e-5; a score error δ moves the softmax
    weights by a relative δ, so an output (a convex combination of |v| ≲ 5) moves by
    ≲ 5·2e-5 = 1e-4. A wrong mask, head grouping or chunk boundary errs by O(0.1..1).
  * rms_norm, float32: a mean of 64 squares and an rsqrt, relative error ≲ 70·u32 ≈ 4e-6,
    so rtol 1e-5. bfloat16: statistics run in float32, then the normed value and the
    product with the weight are each rounded once to bf16, relative error ≤ (1+u16)² - 1
    ≈ 2·u16 = 2**-7 (bf16 has float32's exponent range, so no underflow: the bound is
    purely relative).
  * RoPE tables: the angle pos·f is one float32 product (relative u32), so at positions
    < 64 an angle is off by ≤ 64·u32 ≈ 4e-6 and cos/sin by as much; an output of
    |x| ≲ 5 moves by ≤ 2·5·4e-6 = 4e-5, so atol 1e-4. The wrong pairing (interleaved
    instead of halves) errs by O(1).
  * inverse frequencies: computed in float32 on purpose (bitwise like transformers);
    theta**(2i/d) with a float32-rounded exponent is off relatively by ≲ ln(theta)·u32
    ≈ 13·6e-8 ≈ 1e-6 for theta ≤ 5e5, so rtol 1e-5.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mpq_jax.models.decoder import (
    ATTENTION_CHUNK,
    apply_rope,
    causal_attention,
    forward,
    rms_norm,
    rope_inverse_frequencies,
    rope_tables,
)
from mpq_jax.models.spec import BLOCK_LINEARS, spec_from_hf_config


# --- attention ---------------------------------------------------------------------------


def reference_causal_attention(q, k, v):
    """float64 GQA attention. q: [B, T, H, hd]; k, v: [B, T, KV, hd]; head h reads kv head h // (H/KV)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    seq, heads, hd = q.shape[1:]
    group = heads // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # [B, T, H, hd]
    scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.mark.parametrize("seq", [300, 5], ids=["two-chunks", "one-short-chunk"])
def test_causal_attention_matches_float64_reference(seq):
    if seq == 300:  # the second chunk must exist and be shorter than a full one
        assert ATTENTION_CHUNK < seq < 2 * ATTENTION_CHUNK
    rng = np.random.default_rng(seq)
    batch, heads, kv_heads, hd = 2, 6, 2, 16
    q = rng.standard_normal((batch, seq, heads, hd)).astype(np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, hd)).astype(np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, hd)).astype(np.float32)
    got = np.asarray(causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    assert got.shape == (batch, seq, heads, hd) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_causal_attention(q, k, v), rtol=0, atol=1e-4)


# --- rms_norm ----------------------------------------------------------------------------


def reference_rms_norm(x, weight, eps):
    x = np.asarray(x, np.float64)
    return np.asarray(weight, np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize(
    "dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2**-7 + 1e-5)], ids=["float32", "bfloat16"]
)
def test_rms_norm_matches_float64_reference(dtype, rtol):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 7, 64)) * 3.0, dtype)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, 64), dtype)
    got = rms_norm(x, weight, 1e-6)
    assert got.dtype == dtype
    # The reference starts from the same (already rounded) inputs, so only the function's
    # own roundings are measured.
    expected = reference_rms_norm(np.asarray(x.astype(jnp.float32)), np.asarray(weight.astype(jnp.float32)), 1e-6)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), expected, rtol=rtol, atol=0)


# --- RoPE --------------------------------------------------------------------------------


def make_spec(head_dim=16, heads=2, rope_theta=10000.0, rope_scaling=None):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": heads * head_dim,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "rope_theta": rope_theta,
    }
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return spec_from_hf_config(config)


def reference_inverse_frequencies(head_dim, theta):
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def test_rope_matches_float64_rotate_half_reference():
    rng = np.random.default_rng(1)
    batch, seq, heads, hd = 2, 64, 3, 16
    inv_freq = rope_inverse_frequencies(make_spec(head_dim=hd))
    np.testing.assert_allclose(inv_freq, reference_inverse_frequencies(hd, 10000.0), rtol=1e-5)
    x = rng.standard_normal((batch, seq, heads, hd)).astype(np.float32)
    cos, sin = rope_tables(jnp.asarray(inv_freq), jnp.arange(seq))
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))

    # Rotate-half: dimension i pairs with i + hd/2, both turned by angle pos * f_i.
    # The reference takes the library's float32 frequencies, so only tables and rotation are tested.
    angles = np.arange(seq, dtype=np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]  # [T, hd/2]
    c, s = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    x1, x2 = x[..., : hd // 2].astype(np.float64), x[..., hd // 2 :].astype(np.float64)
    expected = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def reference_llama3_frequencies(head_dim, theta, factor, low_freq_factor, high_freq_factor, original):
    """Llama 3.1's `apply_scaling`, one frequency at a time, in float64."""
    low_wavelen, high_wavelen = original / low_freq_factor, original / high_freq_factor
    scaled = []
    for freq in reference_inverse_frequencies(head_dim, theta):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            scaled.append(freq)
        elif wavelen > low_wavelen:
            scaled.append(freq / factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            scaled.append((1 - smooth) * freq / factor + smooth * freq)
    return np.asarray(scaled)


@pytest.mark.parametrize(
    "head_dim, theta, factor, low, high, original",
    [(128, 500000.0, 8.0, 1.0, 4.0, 8192), (64, 500000.0, 32.0, 1.0, 4.0, 8192), (32, 10000.0, 4.0, 2.0, 8.0, 256)],
    ids=["llama3.1-8b", "llama3.2-1b", "small"],
)
def test_llama3_inverse_frequencies_match_float64_formula(head_dim, theta, factor, low, high, original):
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
    got = rope_inverse_frequencies(make_spec(head_dim=head_dim, rope_theta=theta, rope_scaling=scaling))
    expected = reference_llama3_frequencies(head_dim, theta, factor, low, high, original)
    # Every band must be exercised. A wavelength sitting on a band edge could fall on either
    # side in float32, but the formula is continuous there (smooth = 0 or 1), so it cannot
    # matter beyond rtol.
    wavelen = 2 * math.pi / reference_inverse_frequencies(head_dim, theta)
    assert (wavelen < original / high).any() and (wavelen > original / low).any()
    assert ((wavelen >= original / high) & (wavelen <= original / low)).any()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=0)


def test_linear_inverse_frequencies_are_divided_by_factor():
    spec = make_spec(head_dim=64, rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    expected = reference_inverse_frequencies(64, 10000.0) / 4.0
    np.testing.assert_allclose(rope_inverse_frequencies(spec), expected, rtol=1e-5, atol=0)


# --- whole decoder: QuantizedLinear in place of dense, bfloat16 ------------------------------

@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """Llama with biases on every linear, so that the fp16 bias of QuantizedLinear is exercised.

    Written by transformers through the parity test's helper (skips without torch).
    """
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    directory = tmp_path_factory.mktemp("tiny-llama-bias")
    tiny_checkpoints.write_tiny_checkpoint("llama-tied-bias", directory, sharded=False)
    return directory


def tokens_for(spec, seq=40):
    return jnp.asarray(np.random.default_rng(2).integers(0, spec.vocab_size, size=(2, seq)))


def test_decoder_runs_quantized_linears_like_their_dense_dequantization(tiny_llama_dir):
    """forward with every block linear a 4-bit QuantizedLinear equals forward with the dense
    {"weight": dequantize(), "bias": fp16-rounded bias}: both are float32 matmuls of the same
    numbers, differing only by XLA reassociation (~1e-6 relative), so 1e-5 of max|logit|."""
    from mpq_jax.models import load_model
    from mpq_jax.packed.qlinear import QuantizedLinear
    from mpq_jax.quant.rtn import rtn_quantize

    loaded = load_model(tiny_llama_dir, with_tokenizer=False)
    spec, params = loaded.spec, loaded.params
    quantized = {**params, "layers": [{k: dict(v) for k, v in layer.items()} for layer in params["layers"]]}
    dense = {**params, "layers": [{k: dict(v) for k, v in layer.items()} for layer in params["layers"]]}
    for q_layer, d_layer in zip(quantized["layers"], dense["layers"]):
        for module, name in BLOCK_LINEARS:
            original = q_layer[module][name]
            assert "bias" in original  # the checkpoint has attention_bias and mlp_bias
            ql = rtn_quantize(original["weight"], 4, 32, bias=original["bias"])
            q_layer[module][name] = ql
            d_layer[module][name] = {
                "weight": ql.dequantize(),
                "bias": original["bias"].astype(jnp.float16).astype(jnp.float32),
            }
    assert isinstance(quantized["layers"][1]["mlp"]["down_proj"], QuantizedLinear)

    tokens = tokens_for(spec)
    got = np.asarray(forward(quantized, spec, tokens))
    expected = np.asarray(forward(dense, spec, tokens))
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-5 * scale
    # The swap really happened: 4-bit weights move the logits far beyond that tolerance.
    assert np.abs(np.asarray(forward(params, spec, tokens)) - expected).max() > 1e-3 * scale


def test_bfloat16_params_run_close_to_float32(tiny_llama_dir):
    """bf16 weights and activations (norm statistics, RoPE angles and softmax stay float32).

    Each bf16 rounding is a relative 2**-8 ≈ 3.9e-3. Along the residual path a block rounds
    about ten times in series (normed input, q/k/v, attention out, o_proj, residual add,
    normed input, gate/up, their product, down, residual add); with two blocks plus the
    embedding, final norm and head that is ~23 roundings, so even if they all added
    coherently the logits would move by ≲ 23·3.9e-3 ≈ 9e-2 of their scale: we allow 1e-1
    (a random walk predicts ~2e-2; ~7e-3 is seen). A real mistake (a dropped bias, a wrong
    rotation) moves them by O(1).
    """
    from mpq_jax.models import load_model

    f32 = load_model(tiny_llama_dir, with_tokenizer=False)
    bf16 = load_model(tiny_llama_dir, dtype="bfloat16", with_tokenizer=False)
    assert bf16.params["layers"][0]["self_attn"]["q_proj"]["weight"].dtype == jnp.bfloat16
    tokens = tokens_for(f32.spec)
    expected = np.asarray(forward(f32.params, f32.spec, tokens))
    got = forward(bf16.params, bf16.spec, tokens)
    assert got.dtype == jnp.float32
    got = np.asarray(got)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-1 * np.abs(expected).max()
