"""The GPU (Triton) and TPU (Mosaic) dequant-matmul kernels in Pallas interpret mode on CPU,
against the plain-jnp reference (`QuantizedLinear.apply`) and a float64 numpy reference
built from the unpacked ingredients (codes, scales, zeros), never from our unpacking.

Tolerance: both kernels upcast x to float32, dequantize exactly ((q - z) * fp16 scale has
at most 19 significant bits) and accumulate in float32. Against the float64 result computed
from the same (dtype-rounded) x, recursive summation of K products errs by at most
K * 2**-24 * sum_i |x_i w_i| per output; the final cast to x's dtype adds half an ulp of
that dtype (unit roundoff 2**-8 for bfloat16, 2**-11 for float16, 0 for float32). The bound used
is that sum, doubled for the low-rank and bias terms' own float32 rounding.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.random_layers import random_layer
from pallas_kernels.blocks import KernelBlocks
from pallas_kernels.dispatch import kernel_backend, quantized_matmul
from pallas_kernels import tpu

SMALL_BLOCKS = KernelBlocks(block_n=128, block_k=256)  # several tiles even on small layers
OUTPUT_ULP = {jnp.float32: 0.0, jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}  # unit roundoff


def check(layer, w, b, x, backend, blocks=SMALL_BLOCKS):
    y = quantized_matmul(x, layer, backend=backend, interpret=True, blocks=blocks)
    assert y.dtype == x.dtype and y.shape == x.shape[:-1] + (layer.out_features,)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    ref64 = x64 @ w.T + (0.0 if b is None else b)
    bound = 2 * (w.shape[1] + 1) * 2.0**-24 * (np.abs(x64) @ np.abs(w).T) + OUTPUT_ULP[x.dtype.type] * np.abs(ref64)
    bound = bound + 1e-30
    y64 = np.asarray(y.astype(jnp.float32), np.float64)
    assert np.all(np.abs(y64 - ref64) <= bound), float(np.max(np.abs(y64 - ref64) / bound))
    # Same numbers as the plain-jnp reference within the same bound (it is float32 too).
    ref32 = np.asarray(layer.apply(x.astype(jnp.float32)), np.float64)
    assert np.all(np.abs(y64 - ref32) <= 2 * bound)


BACKENDS = ["gpu", "tpu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_uniform_bit_widths(backend, bits):
    rng = np.random.default_rng(bits)
    # 352 inputs (11 pack blocks, not a multiple of block_k) and 200 outputs (not of block_n).
    layer, w, b = random_layer(rng, 200, [(bits, 352, 32 if bits % 2 else 64)])
    check(layer, w, b, jnp.asarray(rng.standard_normal((3, 352)), jnp.float32), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 3, 16, 128])
def test_mixed_segments_over_token_counts(backend, tokens):
    rng = np.random.default_rng(100 + tokens)
    # dense | 3-bit ragged (100 cols: short last group, padded pack block) | 2-bit | 4-bit | 8-bit
    plan = [(16, 12, 0), (3, 100, 64), (2, 256, 128), (4, 96, 32), (8, 64, 64)]
    layer, w, b = random_layer(rng, 136, plan, rank=4, bias=True, input_scale=True)
    check(layer, w, b, jnp.asarray(rng.standard_normal((tokens, layer.in_features)), jnp.float32), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("extras", [(0, False), (8, True)], ids=["plain", "lowrank+bias"])
def test_activation_dtypes_with_and_without_lowrank_and_bias(backend, dtype, extras):
    rng = np.random.default_rng(7)
    rank, bias = extras
    layer, w, b = random_layer(rng, 160, [(4, 160, 64), (2, 288, 96), (16, 8, 0)], rank=rank, bias=bias)
    x = jnp.asarray(rng.standard_normal((2, 3, layer.in_features)), dtype)  # leading batch axes kept
    check(layer, w, b, x, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_blocks_and_group_that_straddles_pack_blocks(backend):
    rng = np.random.default_rng(11)
    # group 48 is not a multiple of 32: that segment takes the reference path inside dispatch.
    layer, w, b = random_layer(rng, 384, [(4, 1024, 128), (3, 144, 48)], bias=True)
    check(layer, w, b, jnp.asarray(rng.standard_normal((5, layer.in_features)), jnp.float32), backend, blocks=None)


def test_dispatch_chooses_by_backend():
    assert kernel_backend("gpu") == "gpu" and kernel_backend("cuda") == "gpu" and kernel_backend("tpu") == "tpu"
    assert kernel_backend("cpu") is None
    rng = np.random.default_rng(3)
    layer, *_ = random_layer(rng, 64, [(4, 128, 64)])
    x = jnp.asarray(rng.standard_normal((2, 128)), jnp.float32)
    if jax.default_backend() == "cpu":  # on CPU the dispatch is the reference itself
        np.testing.assert_array_equal(np.asarray(quantized_matmul(x, layer)), np.asarray(layer.apply(x)))


def test_tpu_k_tiles_are_sublane_aligned_or_whole():
    blocks = KernelBlocks(block_n=256, block_k=1024)
    assert tpu.k_tile_blocks(344, blocks) == 8  # 11008 inputs: 344 blocks = 8 x 43
    assert tpu.k_tile_blocks(128, blocks) == 32  # 4096 inputs: 1024-column tiles
    assert tpu.k_tile_blocks(18, blocks) == 18  # 576 inputs: no multiple of 8 divides 18 -> whole


@pytest.mark.parametrize("backend,platform", [("gpu", "cuda"), ("tpu", "tpu")])
def test_kernels_lower_for_their_hardware(backend, platform):
    """The Triton / Mosaic lowering runs on CPU through jax.export: catches unsupported ops
    and block shapes without a GPU or TPU (compiling the lowered kernel still needs one)."""
    from jax import export

    from pallas_kernels.dispatch import segment_matmul

    rng = np.random.default_rng(5)
    layer, *_ = random_layer(rng, 512, [(3, 1024, 128), (4, 512, 64)])
    for segment in layer.segments:
        for tokens in (1, 16):
            x = jnp.zeros((tokens, segment.n_cols), jnp.bfloat16)
            fn = jax.jit(lambda x, segment=segment: segment_matmul(x, segment, backend))
            checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if backend == "gpu" else []
            exported = export.export(fn, platforms=[platform], disabled_checks=checks)(x)
            assert "mpq_dequant_matmul" in exported.mlir_module()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (the interpret-mode tests cover CPU)")
def test_gpu_kernel_compiled_on_gpu():
    rng = np.random.default_rng(21)
    layer, w, b = random_layer(rng, 1024, [(4, 1024, 128), (3, 512, 64), (2, 512, 64)], bias=True)
    x = jnp.asarray(rng.standard_normal((4, layer.in_features)), jnp.float32)
    y = quantized_matmul(x, layer)
    x64 = np.asarray(x, np.float64)
    ref64 = x64 @ w.T + b
    bound = 2 * (w.shape[1] + 1) * 2.0**-24 * (np.abs(x64) @ np.abs(w).T)
    assert np.all(np.abs(np.asarray(y, np.float64) - ref64) <= bound + 1e-30)
