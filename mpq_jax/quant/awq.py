"""AWQ-style activation scaling as AMLQ uses it (§3.1, eqs. 5-6).

Per input channel c, S_x[c] = E|x_c| over the calibration tokens. For a strength α the
weights are scaled up and the inputs down by s = S_x^α, which leaves the layer's output
unchanged (eq. 5):

    W x = (W diag(s)) (diag(s)^-1 x) = W_s x_s

GPTQ then quantizes W_s against the Hessian of x_s, which follows from the stored one
without touching X again (eq. 6):

    H_s = 2 X_s X_sᵀ / N = diag(s)^-1 H diag(s)^-1

and the layer applies Q(W_s) to x / s. Salient input channels (large S_x) get larger weights
before rounding, so their relative rounding error shrinks, at the cost of the others.

s is normalised to geometric mean 1 (the output is unchanged by any overall factor, and this
keeps scaled weights in the range of the originals), and channels that never fire (S_x = 0)
keep s = 1.

Not here: searching α (the AMLQ pipeline evaluates each α's δ), storing 1/s with the layer.
"""

from __future__ import annotations

import numpy as np

DEFAULT_ALPHA_GRID = tuple(np.round(np.linspace(0.0, 0.95, 20), 4))  # 20 points, 0 = no scaling


def channel_scales(mean_abs_x, alpha: float) -> np.ndarray:
    """s = S_x^α per input channel, normalised to geometric mean 1 (float64 [in])."""
    mean_abs_x = np.asarray(mean_abs_x, np.float64)
    if mean_abs_x.ndim != 1 or np.any(mean_abs_x < 0) or not np.all(np.isfinite(mean_abs_x)):
        raise ValueError("mean_abs_x must be a finite, non-negative vector [in]")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    live = mean_abs_x > 0
    s = np.ones_like(mean_abs_x)
    if alpha == 0 or not live.any():
        return s
    s[live] = mean_abs_x[live] ** alpha
    s[live] /= np.exp(np.mean(np.log(s[live])))
    return s


def scale_weight(w, s) -> np.ndarray:
    """W_s = W diag(s): column c of W [out, in] times s[c]."""
    return np.asarray(w, np.float64) * np.asarray(s, np.float64)[None, :]


def scaled_hessian(hessian, s) -> np.ndarray:
    """H_s = diag(s)^-1 H diag(s)^-1 (eq. 6), from the stored H; X is not needed."""
    inv = 1.0 / np.asarray(s, np.float64)
    return np.asarray(hessian, np.float64) * np.outer(inv, inv)


def unscale_weight(w_s_hat, s) -> np.ndarray:
    """The original-space weights a quantized W_s applies: Ŵ = Q(W_s) diag(s)^-1."""
    return np.asarray(w_s_hat, np.float64) / np.asarray(s, np.float64)[None, :]
