"""The straight-through fake quantizer against the float64 surrogate reference.

Finite differences: the reference is piecewise linear in each input (rounding replaced by a
fixed offset, the clamp kept), so away from the clamp kinks its central difference equals
the derivative up to float64 rounding of the quotient, ~1e-16 * |ŵ| / eps. The float32
gradient carries the rounding of w / s and of the products, a few float32 ulps (2**-24)
of |w / s| ≈ maxq times |s|; the tolerance is 1e-5 relative to the largest term, which holds
that with a wide margin and is far below the size of any sign or rule error (O(1) relative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpq_jax.qat.ste import dequantize_fixed_codes, fake_quantize, fake_quantize_reference, stored_zero
from mpq_jax.quant.grid import dequantize_codes, max_code, quantize_codes, round_scale_to_fp16


def _inputs(rng, bits, shape=(6, 40)):
    """Weights spread past both ends of the grid, so that some codes clamp."""
    maxq = max_code(bits)
    scale = rng.uniform(0.01, 0.05, shape).astype(np.float32)
    zero = rng.uniform(0, maxq, shape).astype(np.float32)
    w = (rng.uniform(-0.3, 1.3, shape) * maxq - zero) * scale
    return w.astype(np.float32), scale, zero


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_is_the_grid_of_the_stored_scale_and_zero(bits):
    rng = np.random.default_rng(bits)
    w, scale, zero = _inputs(rng, bits)
    s = round_scale_to_fp16(scale)
    z = stored_zero(zero, bits)
    expected = dequantize_codes(quantize_codes(w, s, z, bits), s, z)
    np.testing.assert_array_equal(np.asarray(fake_quantize(w, scale, zero, bits)), np.asarray(expected))
    np.testing.assert_allclose(fake_quantize_reference(w, scale, zero, bits), np.asarray(expected, np.float64), rtol=1e-6, atol=1e-7)


def _vjp(w, scale, zero, bits, cotangent):
    _, pullback = jax.vjp(lambda a, b, c: fake_quantize(a, b, c, bits), jnp.asarray(w), jnp.asarray(scale), jnp.asarray(zero))
    return [np.asarray(g, np.float64) for g in pullback(jnp.asarray(cotangent))]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gradient_matches_finite_differences_of_the_smoothed_reference(bits):
    rng = np.random.default_rng(10 + bits)
    w, scale, zero = _inputs(rng, bits)
    cotangent = rng.standard_normal(w.shape).astype(np.float32)
    grads = _vjp(w, scale, zero, bits, cotangent)
    s = np.asarray(round_scale_to_fp16(scale), np.float64)
    v = np.round(w / s) + np.asarray(stored_zero(zero, bits))
    off_bounds = (v != 0) & (v != max_code(bits))  # the kinks, tested on their own below
    assert off_bounds.mean() > 0.5 and ((v < 0) | (v > max_code(bits))).any() and ((v > 0) & (v < max_code(bits))).any()
    point = (w, scale, zero)
    eps = 1e-6
    for index, (name, base) in enumerate(zip(("w", "scale", "zero"), point)):
        step = np.zeros_like(base, np.float64)
        step.flat[:] = eps * np.maximum(np.abs(base).ravel(), 1e-3)
        plus = [np.asarray(a, np.float64) for a in point]
        minus = [np.asarray(a, np.float64) for a in point]
        plus[index] = plus[index] + step
        minus[index] = minus[index] - step
        # Elementwise inputs: the derivative of ŵ_ij with respect to input_ij alone.
        numeric = (fake_quantize_reference(*plus, bits, at=point) - fake_quantize_reference(*minus, bits, at=point)) / (2 * step)
        analytic = grads[index] / cotangent
        scale_of_terms = np.max(np.abs(numeric[off_bounds])) + 1e-12
        np.testing.assert_allclose(analytic[off_bounds], numeric[off_bounds], rtol=0, atol=1e-5 * scale_of_terms, err_msg=name)


def test_codes_on_the_bounds_pass_the_gradient_as_inside_the_grid():
    """torch's clamp passes its gradient at min and max inclusively; so does this rule."""
    bits, maxq = 2, 3
    scale = np.full(4, 0.5, np.float32)
    zero = np.full(4, 1.0, np.float32)
    # w/s + z = 0.1 + (-1) + 1 -> v = 0 (lower bound); 2 + 1 = 3 (upper bound); one strictly below, one above.
    w = np.array([-0.45, 1.05, -1.2, 1.8], np.float32)
    v = np.round(w / 0.5) + 1
    assert list(v) == [0, maxq, -1, 5]
    g_w, g_s, g_z = _vjp(w, scale, zero, bits, np.ones(4, np.float32))
    ratio = w.astype(np.float64) / 0.5
    np.testing.assert_allclose(g_w, [1, 1, 0, 0])
    np.testing.assert_allclose(g_s, [np.round(ratio[0]) - ratio[0], np.round(ratio[1]) - ratio[1], 0 - 1, maxq - 1], atol=1e-6)
    np.testing.assert_allclose(g_z, [0, 0, -0.5, -0.5])


def test_group_parameters_receive_the_sum_over_their_columns():
    rng = np.random.default_rng(3)
    w, scale, zero = _inputs(rng, 3, shape=(5, 12))
    group_of_col = np.arange(12) // 4
    group_scale, group_zero = scale[:, ::4], zero[:, ::4]
    cotangent = rng.standard_normal(w.shape).astype(np.float32)

    def by_group(a, b, c):
        return fake_quantize(a, b[:, group_of_col], c[:, group_of_col], 3)

    _, pullback = jax.vjp(by_group, jnp.asarray(w), jnp.asarray(group_scale), jnp.asarray(group_zero))
    _, g_s, g_z = pullback(jnp.asarray(cotangent))
    _, g_s_cols, g_z_cols = _vjp(w, group_scale[:, group_of_col], group_zero[:, group_of_col], 3, cotangent)
    np.testing.assert_allclose(np.asarray(g_s), g_s_cols.reshape(5, 3, 4).sum(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_z), g_z_cols.reshape(5, 3, 4).sum(-1), rtol=1e-6, atol=1e-6)


def test_broadcast_scale_gets_its_gradient_summed():
    rng = np.random.default_rng(4)
    w, scale, zero = _inputs(rng, 4, shape=(3, 8))
    cotangent = rng.standard_normal(w.shape).astype(np.float32)
    _, g_s, g_z = _vjp(w, scale[:, :1], zero[:, :1], 4, cotangent)
    _, g_s_full, g_z_full = _vjp(w, np.repeat(scale[:, :1], 8, 1), np.repeat(zero[:, :1], 8, 1), 4, cotangent)
    assert g_s.shape == (3, 1)
    np.testing.assert_allclose(g_s[:, 0], g_s_full.sum(1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_z[:, 0], g_z_full.sum(1), rtol=1e-6, atol=1e-6)


def test_bfloat16_master_weights_get_bfloat16_gradients():
    rng = np.random.default_rng(5)
    w, scale, zero = _inputs(rng, 2, shape=(4, 8))
    out, pullback = jax.vjp(lambda a: fake_quantize(a, jnp.asarray(scale), jnp.asarray(zero), 2), jnp.asarray(w, jnp.bfloat16))
    (g,) = pullback(jnp.ones_like(out))
    assert out.dtype == jnp.float32 and g.dtype == jnp.bfloat16


def test_fixed_codes_give_step_sizes_the_gradient_q_minus_z():
    """E2E-QP: with the codes fixed, ŵ = (q - z)·s is linear in s; its exact gradients."""
    rng = np.random.default_rng(6)
    bits = 2
    codes = rng.integers(0, 4, (4, 6)).astype(np.int32)
    scale = rng.uniform(0.01, 0.05, (4, 6)).astype(np.float32)
    zero = rng.integers(0, 4, (4, 6)).astype(np.float32)
    out, pullback = jax.vjp(lambda s, z: dequantize_fixed_codes(jnp.asarray(codes), s, z, bits), jnp.asarray(scale), jnp.asarray(zero))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize_codes(codes, round_scale_to_fp16(scale), zero)))
    g_s, g_z = pullback(jnp.ones_like(out))
    np.testing.assert_array_equal(np.asarray(g_s), codes - zero)
    np.testing.assert_allclose(np.asarray(g_z), -np.asarray(round_scale_to_fp16(scale)))
