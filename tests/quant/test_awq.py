"""AWQ scaling: the output is unchanged, and the scaled Hessian from the stored H equals the
Hessian of the scaled activations (eq. 6), in float64 against explicit X."""

from __future__ import annotations

import numpy as np
import pytest

from mpq_jax.quant.awq import DEFAULT_ALPHA_GRID, channel_scales, scale_weight, scaled_hessian, unscale_weight


def activations(seed, n_in=48, tokens=300):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_in, tokens)) * rng.uniform(0.1, 10, (n_in, 1))
    x[3] = 0.0  # a channel that never fires
    return rng.standard_normal((16, n_in)), x


@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.95])
def test_scaled_hessian_identity_and_unchanged_output(alpha):
    w, x = activations(int(alpha * 100))
    s = channel_scales(np.mean(np.abs(x), axis=1), alpha)
    x_s = x / s[:, None]
    h = 2 * x @ x.T / x.shape[1]
    np.testing.assert_allclose(scaled_hessian(h, s), 2 * x_s @ x_s.T / x.shape[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scale_weight(w, s) @ x_s, w @ x, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(unscale_weight(scale_weight(w, s), s), w, rtol=1e-12)


def test_scales_normalised_and_dead_channels_kept():
    _, x = activations(1)
    mean_abs = np.mean(np.abs(x), axis=1)
    s = channel_scales(mean_abs, 0.5)
    live = mean_abs > 0
    assert s[3] == 1.0 and np.exp(np.mean(np.log(s[live]))) == pytest.approx(1.0)
    ratio = s[live] / np.sqrt(mean_abs[live])
    np.testing.assert_allclose(ratio, ratio[0])  # s ∝ S_x^α on live channels
    np.testing.assert_array_equal(channel_scales(mean_abs, 0.0), np.ones_like(mean_abs))
    assert len(DEFAULT_ALPHA_GRID) == 20 and DEFAULT_ALPHA_GRID[0] == 0.0
    with pytest.raises(ValueError, match="alpha"):
        channel_scales(mean_abs, 1.5)
