"""Plain float64 numpy GPTQ, straight from Algorithm 1 of Frantar et al. (2022).

Column by column, no lazy batching: after each column its error is applied to every later
column at once. Same conventions as `mpq_jax.quant.gptq`: dead inputs pinned, relative
damping with 10x retries, column order (perm > act-order > identity), per-group bits in
processing order (16 = kept dense in fp16) with grids from the error-updated columns, or
(static_groups, as the GPTQ reference code) groups of consecutive ORIGINAL columns with
grids from the original W, bits indexed by original group, or (runs) groups inside runs of
processed columns, each run with one bit width and cut into groups from its own first
column, the last of a run shorter; scales rounded to fp16 before quantizing. No JAX here.
"""

from __future__ import annotations

import math

import numpy as np

FP16 = np.finfo(np.float16)


def raw_grid(w, bits, symmetric):
    """GPTQ min-max grid per row of w [out, n] before rounding: (xmin, scale, flat rows)."""
    maxq = 2**bits - 1
    xmin = np.minimum(w.min(axis=1), 0)
    xmax = np.maximum(w.max(axis=1), 0)
    if symmetric:
        xmax = np.maximum(-xmin, xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = np.where(flat, -1, xmin), np.where(flat, 1, xmax)
    return xmin, (xmax - xmin) / maxq, flat


def grid_params(w, bits, symmetric):
    """(scale rounded to its fp16 storage value, zero) per row of w [out, n]."""
    xmin, scale, _ = raw_grid(w, bits, symmetric)
    zero = np.full_like(scale, 2 ** (bits - 1)) if symmetric else np.round(-xmin / scale)
    scale = np.clip(scale, FP16.tiny, FP16.max).astype(np.float16).astype(np.float64)
    return scale, zero


def tie_margin(x):
    """Distance of x from the nearest rounding tie (k + 0.5); small = float noise may flip it."""
    return np.abs(np.abs(x - np.floor(x)) - 0.5)


def fp16_margin(scale):
    """Distance, in fp16 ulps, of scale from a tie between two fp16 values."""
    s16 = np.clip(scale, FP16.tiny, FP16.max).astype(np.float16)
    return np.abs(np.abs(scale - s16.astype(np.float64)) / np.spacing(s16).astype(np.float64) - 0.5)


def reference_gptq(w, hessian, group_bits, group_size, *, perm=None, act_order=False, static_groups=False,
                   symmetric=False, percdamp=0.01, max_retries=4, runs=None):
    """runs: (n_cols, bits) runs of processed columns, instead of group_bits (see the
    module docstring). Returns (Ŵ [out, in] original order, loss, damping, err, margin), the last two
    [out, in] in processing (permuted) order:

    err[:, j] = updated W[:, j] - Q[:, j], the quantization error of processed column j;
    margin[:, j] = how far column j's rounding decisions were from a tie (where an
    implementation in lower precision may legitimately round the other way): its code, and
    its group's zero-point and fp16 scale, which every column of the group carries because
    they show in Ŵ only where a code differs from the zero-point; inf for 16-bit columns.
    """
    W = np.array(w, np.float64)
    H = np.array(hessian, np.float64)
    n_in = W.shape[1]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = {}
    if static_groups:  # grid of each original group, from the original W, fixed up front
        for g in range(math.ceil(n_in / group_size)):
            cols = W[:, g * group_size : (g + 1) * group_size]
            if group_bits[g] != 16:
                static[g] = grid_params(cols, int(group_bits[g]), symmetric), group_margin(cols, int(group_bits[g]), symmetric)
    perm = processing_order(H, perm, act_order)
    W, H = W[:, perm], H[np.ix_(perm, perm)]

    damping = percdamp
    for _ in range(max_retries + 1):
        try:
            Hd = H + damping * np.mean(np.diag(H)) * np.eye(n_in)
            Hinv = np.linalg.cholesky(np.linalg.inv(Hd)).T  # upper: U^T U = H^-1
            break
        except np.linalg.LinAlgError:
            damping *= 10
    else:
        raise ValueError("no Cholesky factor")

    if runs is None:
        runs = [(min(group_size, n_in - g0), int(b)) for g0, b in zip(range(0, n_in, group_size), group_bits)]
    # (first column, stop column, bits) of each processed column's group, without static groups
    group_of = [group for group in run_groups(runs, group_size) for _ in range(group[1] - group[0])]

    Q = np.zeros_like(W)
    err = np.zeros_like(W)
    margin = np.full_like(W, np.inf)
    for j in range(n_in):
        if static_groups:
            g = perm[j] // group_size
            bits = int(group_bits[g])
        else:
            g0, g1, bits = group_of[j]
        if bits == 16:
            q = W[:, j].astype(np.float16).astype(np.float64)
        else:
            if static_groups:
                (scale, zero), grid_margin = static[g]
            elif j == g0:
                scale, zero = grid_params(W[:, g0:g1], bits, symmetric)
                grid_margin = group_margin(W[:, g0:g1], bits, symmetric)
            codes = np.clip(np.round(W[:, j] / scale) + zero, 0, 2**bits - 1)
            margin[:, j] = np.minimum(grid_margin, tie_margin(W[:, j] / scale))
            q = (codes - zero) * scale
        err[:, j] = W[:, j] - q
        Q[:, j] = q
        # Algorithm 1: W[:, j:] -= (w - q) / [H^-1]_jj * [H^-1]_{j, j:}
        W[:, j:] -= np.outer(err[:, j] / Hinv[j, j], Hinv[j, j:])

    w_hat = np.empty_like(Q)
    w_hat[:, perm] = Q
    D = np.asarray(w, np.float64) - w_hat
    loss = float(np.sum((D @ np.asarray(hessian, np.float64)) * D))
    return w_hat, loss, damping, err, margin


def run_groups(runs, group_size):
    """(first column, stop column, bits) of each group of (n_cols, bits) runs, in order."""
    groups, start = [], 0
    for n_cols, bits in runs:
        groups += [(g0, min(g0 + group_size, start + n_cols), bits) for g0 in range(start, start + n_cols, group_size)]
        start += n_cols
    return groups


def processing_order(hessian, perm=None, act_order=False):
    """The column order [in]: perm, else (act-order) descending diag(H) with dead inputs
    pinned to 1, else the identity: the order of `reference_gptq`'s err and margin."""
    if perm is not None:
        return np.asarray(perm)
    diag = np.diag(np.asarray(hessian, np.float64)).copy()
    diag[diag == 0] = 1
    return np.argsort(-diag, kind="stable") if act_order else np.arange(len(diag))


def group_margin(w, bits, symmetric):
    """Tie margin of a group's zero-point rounding and of its scale's fp16 rounding, per row.

    Flat (all-zero) rows get a fixed grid with no noise to flip, hence an infinite margin.
    """
    xmin, scale, flat = raw_grid(w, bits, symmetric)
    zero_margin = np.full_like(scale, np.inf) if symmetric else tie_margin(-xmin / scale)
    return np.where(flat, np.inf, np.minimum(zero_margin, fp16_margin(scale)))
