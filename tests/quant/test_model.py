"""Model-level quantization helpers: which layers are touched, dequantized evaluation form,
and per-layer statistics, checked against direct float64 computations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mpq_jax.models import forward
from mpq_jax.packed.qlinear import QuantizedLinear, storage_bits
from mpq_jax.packed.params import dequantized_params
from mpq_jax.quant.model import (
    average_bits_per_weight,
    iter_block_linears,
    linear_stats,
)
from mpq_jax.quant.rtn_model import quantize_model_rtn


@pytest.fixture(scope="module")
def tiny(load_tiny_model):
    return load_tiny_model("qwen2")


def test_rtn_touches_exactly_the_block_linears(tiny):
    quantized = quantize_model_rtn(tiny.params, 4, 32)
    linears = list(iter_block_linears(quantized))
    assert len(linears) == 7 * tiny.spec.num_layers
    assert all(isinstance(layer, QuantizedLinear) for *_, layer in linears)
    # embeddings and norms are untouched (the same arrays)
    assert quantized["embed_tokens"] is tiny.params["embed_tokens"]
    assert quantized["layers"][0]["input_layernorm"]["weight"] is tiny.params["layers"][0]["input_layernorm"]["weight"]
    # q/k/v biases of Qwen2 travel into the QuantizedLinear (stored fp16)
    q_proj = quantized["layers"][0]["self_attn"]["q_proj"]
    np.testing.assert_allclose(
        np.asarray(q_proj.bias, np.float32), np.asarray(tiny.params["layers"][0]["self_attn"]["q_proj"]["bias"]), rtol=2**-10
    )


def test_dequantized_params_compute_the_same_function(tiny):
    quantized = quantize_model_rtn(tiny.params, 3, 16)
    dense = dequantized_params(quantized)
    for (_, _, _, _, ql), (_, _, _, _, d) in zip(iter_block_linears(quantized), iter_block_linears(dense)):
        np.testing.assert_array_equal(np.asarray(d["weight"]), np.asarray(ql.effective_weight()))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, tiny.spec.vocab_size, (1, 24)))
    a, b = np.asarray(forward(quantized, tiny.spec, tokens)), np.asarray(forward(dense, tiny.spec, tokens))
    # Same weights; only float32 summation order differs (bias add, matmul association).
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_stats_match_direct_computation(tiny):
    quantized = quantize_model_rtn(tiny.params, 2, 32)
    stats = linear_stats(tiny.params, quantized)
    total_bits = total_weights = 0
    for stat, (_, _, _, _, dense), (_, _, _, _, ql) in zip(stats, iter_block_linears(tiny.params), iter_block_linears(quantized)):
        w = np.asarray(dense["weight"], np.float64)
        w_hat = np.asarray(ql.dequantize(), np.float64)
        assert stat.relative_weight_error == pytest.approx(np.linalg.norm(w - w_hat) / np.linalg.norm(w), rel=1e-9)
        assert stat.bits_per_weight == storage_bits(ql) / w.size
        total_bits += storage_bits(ql)
        total_weights += w.size
    assert average_bits_per_weight(stats) == pytest.approx(total_bits / total_weights, rel=1e-12)
    # more bits never raise the weight error on the same matrices
    finer = linear_stats(tiny.params, quantize_model_rtn(tiny.params, 4, 32))
    assert all(f.relative_weight_error <= s.relative_weight_error for f, s in zip(finer, stats))
