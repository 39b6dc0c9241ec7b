"""The uniform grid against a float64 numpy reference of the GPTQ min-max convention.

Tolerances: the implementation runs in float32. `scale` is one subtraction and one division
(< 2 ulp, so rtol 1e-6 holds). Codes may legitimately differ from the float64 reference only
where w / scale lies within float32 noise of a rounding tie (x.5); those elements are
excluded from exact comparison and must still be within one code.
"""

import numpy as np
import pytest

from mpq_jax.quant.grid import dequantize_codes, max_code, min_max_params, quantize_codes

TIE_WINDOW = 1e-4  # |frac(w / scale) - 0.5| below this counts as a rounding tie


def reference_params(w, bits, symmetric):
    w = w.astype(np.float64)
    maxq = 2**bits - 1
    xmin = np.minimum(w.min(axis=-1), 0)
    xmax = np.maximum(w.max(axis=-1), 0)
    if symmetric:
        xmax = np.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(flat, -1, xmin), np.where(flat, 1, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, 2 ** (bits - 1)) if symmetric else np.round(-xmin / scale)
    return scale, zero


def near_tie(x):
    return np.abs(np.abs(x - np.floor(x)) - 0.5) < TIE_WINDOW


def random_rows(seed, shape=(16, 64)):
    rng = np.random.default_rng(seed)
    # Rows with an offset exercise the clamp of min <= 0 <= max on both sides.
    return (rng.standard_normal(shape) * rng.uniform(0.01, 2, (shape[0], 1)) + rng.uniform(-1, 1, (shape[0], 1))).astype(
        np.float32
    )


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_params_match_reference(bits, symmetric):
    w = random_rows(bits + 10 * symmetric)
    scale, zero = min_max_params(w, bits, symmetric)
    ref_scale, ref_zero = reference_params(w, bits, symmetric)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
    zero = np.asarray(zero)
    assert np.all((zero >= 0) & (zero <= max_code(bits)))
    ties = near_tie(-np.minimum(w.min(-1), 0) / ref_scale)
    np.testing.assert_array_equal(zero[~ties], ref_zero[~ties])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_match_reference(bits):
    w = random_rows(100 + bits)
    scale, zero = (np.asarray(a) for a in min_max_params(w, bits, False))
    q = np.asarray(quantize_codes(w, scale[:, None], zero[:, None], bits))
    ratio = w.astype(np.float64) / scale[:, None].astype(np.float64)
    ref_q = np.clip(np.round(ratio) + zero[:, None], 0, max_code(bits))
    ties = near_tie(ratio)
    np.testing.assert_array_equal(q[~ties], ref_q[~ties])
    assert np.all(np.abs(q - ref_q) <= 1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_rows_have_positive_scale_and_stay_zero(symmetric):
    w = np.zeros((3, 10), np.float32)
    scale, zero = min_max_params(w, 3, symmetric)
    assert np.all(np.asarray(scale) > 0)
    q = quantize_codes(w, scale[:, None], zero[:, None], 3)
    np.testing.assert_array_equal(np.asarray(dequantize_codes(q, scale[:, None], zero[:, None])), 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantized_values_are_a_fixed_point(bits, symmetric):
    w = random_rows(200 + bits)
    scale, zero = min_max_params(w, bits, symmetric)
    s, z = scale[:, None], zero[:, None]
    on_grid = dequantize_codes(quantize_codes(w, s, z, bits), s, z)
    again = dequantize_codes(quantize_codes(on_grid, s, z, bits), s, z)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(on_grid))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_at_most_half_a_step_inside_range(bits):
    w = random_rows(300 + bits)
    scale, zero = (np.asarray(a)[:, None] for a in min_max_params(w, bits, False))
    deq = np.asarray(dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero))
    lo, hi = -zero * scale, (max_code(bits) - zero) * scale
    inside = (w >= lo) & (w <= hi)
    # Asymmetric min-max with rounded zero still covers all but a sliver at one end.
    assert inside.mean() > 0.95
    # 1e-5 relative slack absorbs float32 rounding of w / scale and of the product.
    bound = np.broadcast_to(scale / 2 * (1 + 1e-5), w.shape)
    assert np.all(np.abs(deq - w)[inside] <= bound[inside])


@pytest.mark.parametrize("symmetric", [False, True])
def test_more_bits_never_raise_mse(symmetric):
    w = random_rows(400, shape=(32, 128))
    mses = []
    for bits in range(2, 9):
        scale, zero = (a[:, None] for a in min_max_params(w, bits, symmetric))
        deq = dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero)
        mses.append(float(np.mean((np.asarray(deq) - w) ** 2)))
    assert all(b <= a for a, b in zip(mses, mses[1:])), mses
