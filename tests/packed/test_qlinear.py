"""QuantizedLinear against a float64 numpy reference built from the unpacked ingredients.

Dequantization multiplies a small integer (q - zero, |.| <= 255) by an fp16 scale: at most
19 significant bits, exact in float32, so `dequantize` must equal the reference exactly.
`apply` sums K = in + r float32 products; recursive summation errs by at most
K * 2**-24 * sum|x||w| per output, which is the tolerance used.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpq_jax.packed.planes import n_blocks
from mpq_jax.packed.qlinear import (
    QuantizedLinear,
    Segment,
    bits_per_weight,
    make_dense_segment,
    make_segment,
    model_bits_per_weight,
    storage_bits,
)


def random_segment(rng, out, start, cols, bits, group_size):
    """A segment plus its float64 reference weights [out, cols] (loop over groups)."""
    n_groups = math.ceil(cols / group_size)
    codes = rng.integers(0, 2**bits, size=(out, cols))
    zero = rng.integers(0, 2**bits, size=(out, n_groups))
    scale = rng.uniform(1e-3, 1e-1, size=(out, n_groups)).astype(np.float16)
    ref = np.zeros((out, cols))
    for g in range(n_groups):
        cs = slice(g * group_size, min((g + 1) * group_size, cols))
        ref[:, cs] = (codes[:, cs] - zero[:, g : g + 1]) * scale[:, g : g + 1].astype(np.float64)
    return make_segment(codes, scale, zero, bits, start, group_size), ref


def mixed_layer(seed, out=24, n_in=576, rank=3, with_bias=True, with_input_scale=False):
    """[16-bit dense 40 cols | 3-bit 200 cols g64 | 2-bit rest g128], random perm, low-rank,
    bias, and optionally an input scale (folded into the returned reference w)."""
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((out, 40)).astype(np.float16)
    seg1, ref1 = random_segment(rng, out, 40, 200, 3, 64)
    seg2, ref2 = random_segment(rng, out, 240, n_in - 240, 2, 128)
    perm = rng.permutation(n_in)
    b = rng.standard_normal((out, rank)).astype(np.float16) if rank else None
    a = rng.standard_normal((rank, n_in)).astype(np.float16) if rank else None
    bias = rng.standard_normal(out).astype(np.float16) if with_bias else None
    input_scale = rng.uniform(0.25, 4.0, n_in).astype(np.float16) if with_input_scale else None
    ql = QuantizedLinear.create(
        [make_dense_segment(dense, 0), seg1, seg2], perm=perm, lowrank_b=b, lowrank_a=a, bias=bias, input_scale=input_scale
    )
    w_perm = np.concatenate([dense.astype(np.float64), ref1, ref2], axis=1)
    w = np.zeros_like(w_perm)
    w[:, perm] = w_perm  # permuted column p is original column perm[p]
    if input_scale is not None:
        w = w * input_scale.astype(np.float64)[None, :]
    return ql, w, b, a, bias


def test_dequantize_matches_reference_exactly():
    ql, w, *_ = mixed_layer(0)
    np.testing.assert_array_equal(np.asarray(ql.dequantize(), np.float64), w)


def test_segment_dequantize_with_short_last_group():
    rng = np.random.default_rng(1)
    seg, ref = random_segment(rng, 5, 0, 576, 4, 128)
    assert seg.n_groups == 5 and seg.scale.shape == (5, 5) and seg.codes.shape == (4, 18, 5)
    np.testing.assert_array_equal(np.asarray(seg.dequantize(), np.float64), ref)


@pytest.mark.parametrize("with_input_scale", [False, True])
def test_apply_matches_reference(with_input_scale):
    ql, w, b, a, bias = mixed_layer(2, with_input_scale=with_input_scale)
    x = np.random.default_rng(3).standard_normal((2, 5, 576)).astype(np.float32)
    x64 = x.astype(np.float64)
    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    ref = x64 @ w.T + (x64 @ a64.T) @ b64.T + bias.astype(np.float64)
    bound = np.abs(x64) @ np.abs(w).T + (np.abs(x64) @ np.abs(a64).T) @ np.abs(b64).T
    y = np.asarray(ql.apply(x), np.float64)
    assert y.shape == (2, 5, 24)
    assert np.all(np.abs(y - ref) <= (576 + 3) * 2**-24 * bound + 1e-6)


def test_effective_weight_includes_lowrank():
    ql, w, b, a, _ = mixed_layer(4)
    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    expected = w + b64 @ a64
    # fp16 x fp16 products are exact in float32; the r - 1 = 2 additions of B @ A and the one
    # of W each round by at most 2**-24 of the magnitudes summed.
    bound = 3 * 2**-24 * (np.abs(w) + np.abs(b64) @ np.abs(a64))
    assert np.all(np.abs(np.asarray(ql.effective_weight(), np.float64) - expected) <= bound)


def test_output_dtype_follows_input():
    ql, *_ = mixed_layer(5, rank=0, with_bias=False)
    x = jnp.ones((3, 576), jnp.bfloat16)
    assert ql.apply(x).dtype == jnp.bfloat16


def test_jit_and_tree_map():
    ql, w, b, a, _ = mixed_layer(6)
    x = np.random.default_rng(7).standard_normal((4, 576)).astype(np.float32)
    jitted = jax.jit(lambda layer, v: layer.apply(v))(ql, x)
    # Two float32 evaluations of the same sums (XLA may fuse or order them differently), each
    # within the module docstring's bound of the exact value (bias rounding: the + 1e-6).
    x64 = x.astype(np.float64)
    bound = (576 + 3) * 2**-24 * (np.abs(x64) @ np.abs(w).T + (np.abs(x64) @ np.abs(a.astype(np.float64)).T) @ np.abs(b.astype(np.float64)).T) + 1e-6
    assert np.all(np.abs(np.asarray(jitted, np.float64) - np.asarray(ql.apply(x), np.float64)) <= 2 * bound)

    copy = jax.tree_util.tree_map(lambda leaf: leaf + 0, ql)
    assert isinstance(copy, QuantizedLinear)
    assert [(s.start, s.stop, s.bits, s.group_size) for s in copy.segments] == [(0, 40, 16, 0), (40, 240, 3, 64), (240, 576, 2, 128)]
    # perm, dense, 3x(codes, scale, zero) x 2 segments, lowrank b and a, bias.
    assert len(jax.tree_util.tree_leaves(ql)) == 1 + 1 + 6 + 2 + 1
    np.testing.assert_array_equal(np.asarray(copy.dequantize()), np.asarray(ql.dequantize()))


def test_bpw_literal_single_group():
    # 4-bit, out=32, in=128, g=128: codes 4 words x 4 blocks per output, one fp16 scale and
    # one uint8 zero per output: 4 + 16/128 + 8/128 = 4.1875.
    rng = np.random.default_rng(8)
    seg, _ = random_segment(rng, 32, 0, 128, 4, 128)
    ql = QuantizedLinear.create([seg])
    assert storage_bits(ql) == 32 * (16 * 32 + 16 + 8)
    assert bits_per_weight(ql) == 4.1875


def test_bpw_literal_smollm_width():
    # SmolLM2's in=576 with g=128 -> 5 groups (last has 64 columns), out=64:
    # 4 + 5*16/576 (fp16 scales) + 5*8/576 (uint8 zeros) = 4.2083...
    seg, _ = random_segment(np.random.default_rng(9), 64, 0, 576, 4, 128)
    ql = QuantizedLinear.create([seg])
    assert storage_bits(ql) == 64 * 576 * 4 + 64 * 5 * 16 + 64 * 5 * 8
    assert bits_per_weight(ql) == pytest.approx(4 + 5 * 16 / 576 + 5 * 8 / 576)


def test_bpw_counts_every_stored_array():
    ql, *_ = mixed_layer(10, out=24, n_in=576, rank=3)
    out = 24
    expected = (
        out * 40 * 16  # dense segment
        + 3 * n_blocks(200) * out * 32 + out * 4 * (16 + 8)  # 3-bit (200 cols padded to 224), 4 groups
        + 2 * n_blocks(336) * out * 32 + out * 3 * (16 + 8)  # 2-bit, 3 groups
        + (out * 3 + 3 * 576) * 16  # low-rank B and A
        + out * 16  # bias
    )
    assert storage_bits(ql) == expected
    assert bits_per_weight(ql) == expected / (out * 576)
    ql2, *_ = mixed_layer(11, out=24, n_in=576, rank=0, with_bias=False)
    assert model_bits_per_weight([ql, ql2]) == (storage_bits(ql) + storage_bits(ql2)) / (2 * out * 576)
    scaled, *_ = mixed_layer(10, out=24, n_in=576, rank=3, with_input_scale=True)
    assert storage_bits(scaled) == expected + 576 * 16  # one fp16 input scale per input


def test_validation_names_the_field():
    rng = np.random.default_rng(12)
    seg_a, _ = random_segment(rng, 4, 0, 64, 4, 32)
    seg_gap, _ = random_segment(rng, 4, 70, 64, 4, 32)
    with pytest.raises(ValueError, match="contiguous"):
        QuantizedLinear.create([seg_a, seg_gap])
    with pytest.raises(ValueError, match="perm"):
        QuantizedLinear.create([seg_a], perm=np.zeros(64, np.int32))
    with pytest.raises(ValueError, match="scale"):
        make_segment(np.zeros((4, 64), int), np.ones((4, 3)), np.zeros((4, 2)), 4, 0, 32)
    with pytest.raises(ValueError, match="lowrank"):
        QuantizedLinear.create([seg_a], lowrank_a=np.ones((2, 64), np.float32))
    bad = Segment(0, 64, 4, 32, codes=seg_a.codes, scale=seg_a.scale.astype(jnp.float32), zero=seg_a.zero)
    with pytest.raises(ValueError, match=r"scale must have dtype float16"):
        bad.validate(4)
