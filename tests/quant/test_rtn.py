"""RTN against a float64 numpy reference that loops over groups.

The stored scale is fp16; the reference rounds its float64 scale to fp16 too, and the two
may differ by one fp16 ulp when float32 noise crosses a rounding boundary, so scales are
compared at rtol 2**-10. Codes are then recomputed in float64 from the stored scale and zero
and must match exactly except at rounding ties (see test_grid). The dequantized product
(small integer) * fp16 is exact in float32, so matching codes give matching weights.
"""

import numpy as np
import pytest

from mpq_jax.quant.grid import FP16_TINY
from mpq_jax.quant.rtn import rtn_quantize
from tests.quant.test_grid import reference_params

TIE_WINDOW = 1e-4


def reference_rtn_params(w, bits, group_size, symmetric):
    """float64 (scale, zero) per group, the scale rounded to fp16 as it is stored."""
    scales, zeros = [], []
    for g0 in range(0, w.shape[1], group_size):
        scale, zero = reference_params(w[:, g0 : g0 + group_size], bits, symmetric)
        zeros.append(zero)
        scales.append(np.maximum(scale, FP16_TINY).astype(np.float16).astype(np.float64))
    return np.stack(scales, 1), np.stack(zeros, 1)


def stored_params(ql):
    seg = ql.segments[0]
    scale = np.asarray(seg.scale, np.float64).T  # stored [groups, out]
    zero = np.asarray(seg.zero_points(), np.float64)
    return scale, zero


def expand(per_group, group_size, n_in):
    return np.repeat(per_group, group_size, axis=1)[:, :n_in]


def near_tie(x):
    return np.abs(np.abs(x - np.floor(x)) - 0.5) < TIE_WINDOW


def random_weight(seed, shape):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 0.05 + rng.uniform(-0.02, 0.02, (shape[0], 1))).astype(np.float32)


CASES = [(2, 64, False), (3, 128, False), (4, 128, True), (4, 32, False), (8, 128, False)]


@pytest.mark.parametrize("bits,group_size,symmetric", CASES)
def test_matches_float64_reference(bits, group_size, symmetric):
    w = random_weight(bits * 7 + group_size, (12, 576))  # 576 = 4*128 + 64: short last group
    ql = rtn_quantize(w, bits, group_size, symmetric)
    ref_scale, ref_zero = reference_rtn_params(w, bits, group_size, symmetric)
    scale, zero = stored_params(ql)
    np.testing.assert_allclose(scale, ref_scale, rtol=2**-10)
    if symmetric:
        np.testing.assert_array_equal(zero, ref_zero)
    else:
        assert np.mean(zero == ref_zero) > 0.99 and np.all(np.abs(zero - ref_zero) <= 1)

    s, z = expand(scale, group_size, 576), expand(zero, group_size, 576)
    ratio = w.astype(np.float64) / s
    ref_deq = (np.clip(np.round(ratio) + z, 0, 2**bits - 1) - z) * s
    deq = np.asarray(ql.dequantize(), np.float64)
    ties = near_tie(ratio)
    np.testing.assert_array_equal(deq[~ties], ref_deq[~ties])
    assert np.all(np.abs(deq - ref_deq) <= s * (1 + 1e-6))


@pytest.mark.parametrize("bits,group_size,symmetric", CASES)
def test_values_on_grid_and_within_half_step(bits, group_size, symmetric):
    w = random_weight(1000 + bits, (8, 576))
    ql = rtn_quantize(w, bits, group_size, symmetric)
    scale, zero = stored_params(ql)
    s, z = expand(scale, group_size, 576), expand(zero, group_size, 576)
    deq = np.asarray(ql.dequantize(), np.float64)
    code = deq / s + z
    np.testing.assert_array_equal(code, np.round(code))  # exact: integer * fp16 in float32
    assert code.min() >= 0 and code.max() <= 2**bits - 1
    inside = (w >= -z * s) & (w <= (2**bits - 1 - z) * s)
    err = np.abs(deq - w)
    # 1e-5 relative slack: float32 rounding of w / scale.
    assert np.all(err[inside] <= (s / 2 * (1 + 1e-5))[inside])


@pytest.mark.parametrize("symmetric", [False, True])
def test_more_bits_never_raise_mse(symmetric):
    w = random_weight(7, (16, 576))
    mses = [float(np.mean((np.asarray(rtn_quantize(w, b, 128, symmetric).dequantize()) - w) ** 2)) for b in range(2, 9)]
    assert all(b <= a for a, b in zip(mses, mses[1:])), mses


def test_short_last_group_layout():
    ql = rtn_quantize(random_weight(3, (4, 576)), 4, 128)
    seg = ql.segments[0]
    assert (seg.start, seg.stop, seg.n_groups) == (0, 576, 5)
    assert seg.scale.shape == (5, 4)  # [groups, out]
    np.testing.assert_array_equal(np.asarray(ql.perm), np.arange(576))


def test_sixteen_bits_keeps_fp16_weights_and_bias():
    w = random_weight(4, (6, 40))
    bias = np.linspace(-1, 1, 6).astype(np.float32)
    ql = rtn_quantize(w, 16, 128, bias=bias)
    np.testing.assert_array_equal(np.asarray(ql.dequantize()), w.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(ql.bias), bias.astype(np.float16))


def test_group_larger_than_row_is_one_group():
    ql = rtn_quantize(random_weight(5, (3, 50)), 3, 128)
    assert ql.segments[0].n_groups == 1


@pytest.mark.parametrize("bits", [1, 9, 12])
def test_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(np.zeros((2, 8), np.float32), bits, 8)
