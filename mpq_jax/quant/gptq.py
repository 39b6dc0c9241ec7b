"""GPTQ (Frantar et al. 2022, Algorithm 1) producing a `QuantizedLinear`.

Columns of W [out, in] are quantized one at a time in a chosen order; the error of each is
spread over the not-yet-quantized columns through the upper Cholesky factor of H^-1
(H = 2 X X^T / N), with the paper's lazy batch updates over blocks of `block_size` columns.

What callers choose, so that later methods reuse this core unchanged:
  - the column order (`perm`, or act-order by descending diag(H), or the identity);
  - a bit width per group (2..8, or 16 for columns kept dense in fp16 that still pass their
    successors' errors along);
  - what a group is: `group_size` consecutive columns *in the processing order*, with grid
    parameters found on the fly from the error-updated columns when the group starts (the
    paper), or the same inside `runs` of any length, each with one bit width and split
    into groups from its own first column, the last group of a run shorter (TAMMP's
    column classes, permuted to be contiguous, whose sizes are not multiples of the
    group size; one stored segment per run), or
    (`static_groups`, the GPTQ reference code's option, llm-compressor's act-order
    "static") consecutive columns *in the original order*, with parameters fixed up front
    from the original W while the columns are still processed in act-order. The stored
    layer then keeps the original column order (identity perm), so no group index is
    needed. This is the grouping that matched llm-compressor's GPTQ layer for layer
    (tests/quant/test_gptq.py, where the compare extra is installed).

The column loop is one jitted program of `lax.fori_loop`s with static shapes (W padded to
a whole number of blocks), so its compile time does not depend on the layer width, and it
is recompiled only per (out, padded in, group_size, block_size, flags, runs or not). Host
side: input checks, dead-input handling, damping retries, packing into segments, the loss.

Not here: collecting H from activations (calibration), choosing bits or orders (AMLQ,
TAMMP), low-rank error reconstruction.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mpq_jax.packed.planes import MAX_BITS, MIN_BITS
from mpq_jax.packed.qlinear import DENSE_BITS, QuantizedLinear, make_dense_segment, make_segment
from mpq_jax.quant.grid import dequantize_codes, min_max_params, quantize_codes, round_scale_to_fp16

logger = logging.getLogger(__name__)

MAX_DAMPING_RETRIES = 4  # each retry multiplies the relative damping by 10


@dataclasses.dataclass(frozen=True)
class GPTQResult:
    qlinear: QuantizedLinear  # the packed layer; perm is the processing order (identity with static groups)
    loss: float  # trace((W - Ŵ) H (W - Ŵ)^T) with the undamped H passed in, in float64
    damping: float  # relative damping actually used (percdamp, or larger after retries)


def gptq_quantize(
    w,
    hessian,
    group_bits,
    group_size: int,
    *,
    perm=None,
    act_order: bool = False,
    static_groups: bool = False,
    symmetric: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    bias=None,
    factor: "InverseFactor | None" = None,
    with_loss: bool = True,
    runs: Sequence[tuple[int, int]] | None = None,
) -> GPTQResult:
    """Quantize w [out, in] with GPTQ given hessian [in, in]; see the module docstring.

    group_bits: [ceil(in / group_size)] bit width per group: of consecutive permuted columns,
    or of consecutive original columns with static_groups.
    perm: [in] processing order (permuted column p is original column perm[p]); overrides
    act_order. factor: `inverse_factor(hessian, perm, percdamp)` computed once by a caller
    that quantizes the same (H, order) several times (AMLQ's presets); it must match
    hessian, perm and percdamp. with_loss=False skips the float64 loss (reported as nan).
    runs: instead of group_bits (then None), consecutive (n_cols, bits) runs of permuted
    columns summing to in; needs perm, and static_groups=False. A run with bits < 16 is
    split into groups of group_size from its first column, the last one shorter; the layer
    stores one segment per run.
    Raises ValueError naming the argument for inconsistent inputs.
    """
    perm, Q, codes, scale, zero, damping = _quantize_columns(
        w, hessian, group_bits, group_size, perm, act_order, static_groups, symmetric, percdamp, block_size, factor,
        runs,
    )
    if runs is None:
        runs = _bit_runs(np.asarray(group_bits), group_size, Q.shape[1])
    w_hat = np.empty_like(Q)
    w_hat[:, perm] = Q
    if static_groups:  # groups live in the original order: store it, with no permutation
        codes_orig = np.empty_like(codes)
        codes_orig[:, perm] = codes
        segments = _segments(w_hat, codes_orig, scale, zero, runs, group_size)
        qlinear = QuantizedLinear.create(segments, bias=bias)
    else:
        segments = _segments(Q, codes, scale, zero, runs, group_size)
        qlinear = QuantizedLinear.create(segments, perm=perm, bias=bias)
    loss = layer_loss(w, w_hat, hessian) if with_loss else float("nan")
    return GPTQResult(qlinear=qlinear, loss=loss, damping=damping)


@dataclasses.dataclass(frozen=True)
class InverseFactor:
    """Upper Cholesky factor of the damped H⁻¹ in a processing order, reusable across bit widths."""

    perm: np.ndarray  # [in] int32
    upper: np.ndarray  # [in, in] float32
    damping: float


def inverse_factor(hessian, perm, percdamp: float = 0.01) -> InverseFactor:
    """The factor GPTQ uses for `hessian` processed in order `perm` (dead inputs pinned)."""
    H = np.array(hessian, dtype=np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    perm = np.asarray(perm).astype(np.int32)
    upper, damping = _damped_inverse_cholesky(H[np.ix_(perm, perm)], percdamp)
    return InverseFactor(perm, upper, damping)


def _quantize_columns(
    w, hessian, group_bits, group_size, perm, act_order, static_groups, symmetric, percdamp, block_size, factor=None,
    runs=None,
):
    """Host preparation and the column loop, before packing.

    Returns perm [in], Q f32 [out, in] (the Ŵ the loop produced, permuted order), codes
    int32 [out, in], scale/zero f32 [out, n_groups], and the relative damping used.
    n_groups counts ceil(n_cols / group_size) per run with runs (dense runs' entries unused).
    """
    W = np.array(w, dtype=np.float32)  # [out, in], a copy: dead columns are zeroed below
    H = np.array(hessian, dtype=np.float64)  # [in, in]
    _validate(W, H, group_size, block_size, percdamp)
    n_out, n_in = W.shape
    if runs is None:
        _validate_bits(np.asarray(group_bits), math.ceil(n_in / group_size))
    else:
        runs = _validate_runs(runs, n_in, group_bits, perm, static_groups)

    # Inputs that never fire carry no information: pin them so H stays invertible (as the
    # reference implementation does); their weights are dropped to 0.
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    if perm is not None:
        perm = np.asarray(perm)
        if perm.shape != (n_in,) or not np.array_equal(np.sort(perm), np.arange(n_in)):
            raise ValueError(f"perm must be a permutation of 0..{n_in - 1}, got shape {perm.shape}")
    elif act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
    else:
        perm = np.arange(n_in)
    perm = perm.astype(np.int32)

    if factor is not None:
        if not np.array_equal(factor.perm, perm):
            raise ValueError("factor: computed for another column order than perm")
        Hinv, damping = factor.upper, factor.damping
    else:
        Hinv, damping = _damped_inverse_cholesky(H[np.ix_(perm, perm)], percdamp)

    if runs is None:
        n_pad, n_groups, bits_pad, col_group, group_bounds = _regular_layout(
            np.asarray(group_bits), group_size, block_size, perm, static_groups
        )
    else:
        n_pad, n_groups, bits_pad, col_group, group_bounds = _runs_layout(runs, group_size, block_size)
    W_pad = np.zeros((n_out, n_pad), np.float32)
    W_pad[:, :n_in] = W[:, perm]
    # Padded columns get an identity block: no error flows into or out of them.
    U = np.eye(n_pad, dtype=np.float32)
    U[:n_in, :n_in] = Hinv
    n_slots = len(bits_pad)
    if static_groups:
        scale0, zero0 = _static_group_params(W, bits_pad, group_size, symmetric)
    else:
        scale0 = zero0 = np.zeros((n_out, n_slots), np.float32)  # found when each group starts
    Q, codes, scale, zero = _gptq_loop(
        jnp.asarray(W_pad),
        jnp.asarray(U),
        jnp.asarray(bits_pad),
        jnp.asarray(col_group),
        jnp.asarray(scale0),
        jnp.asarray(zero0),
        None if group_bounds is None else tuple(jnp.asarray(b) for b in group_bounds),
        n_in=n_in,
        group_size=int(group_size),
        block_size=int(block_size),
        symmetric=bool(symmetric),
        static_groups=bool(static_groups),
    )
    Q, codes = np.asarray(Q)[:, :n_in], np.asarray(codes)[:, :n_in]
    return perm, Q, codes, np.asarray(scale)[:, :n_groups], np.asarray(zero)[:, :n_groups], damping


def _regular_layout(bits, group_size: int, block_size: int, perm, static_groups: bool):
    """Group slots of groups of group_size columns from column 0, bits [n_groups] per group.

    Returns the padded width, n_groups, int32 bits per slot (slots past the real groups
    dense), int32 [padded width] slot of each processed column (its position's group, or
    with static groups its original column's; padded columns in the last, dense slot), and
    None: the loop's own regular group bounds.
    """
    n_in, n_groups = len(perm), len(bits)
    n_pad = _padded_width(n_groups * group_size, block_size)
    n_slots = n_pad // group_size + 1
    bits_pad = np.full(n_slots, DENSE_BITS, np.int32)
    bits_pad[:n_groups] = bits
    col_group = np.full(n_pad, n_slots - 1, np.int32)
    col_group[:n_in] = (perm if static_groups else np.arange(n_in)) // group_size
    return n_pad, n_groups, bits_pad, col_group, None


def _runs_layout(runs, group_size: int, block_size: int):
    """Group slots of (n_cols, bits) runs of processed columns, as `_regular_layout`.

    Each run is cut into groups of group_size from its first column, the last shorter; one
    slot per group, dense runs' included (so `_segments` counts slots alike for both
    layouts), then one dense slot for the padding. The bounds are int32 [slots] start and
    stop columns of each slot (the padding slot's both at the padded width).
    """
    groups = [
        (g0, min(g0 + group_size, start + n_cols), bits)
        for (n_cols, bits), start in zip(runs, itertools.accumulate([0] + [n for n, _ in runs]))
        for g0 in range(start, start + n_cols, group_size)
    ]
    start, stop, bits = (np.array(column, np.int32) for column in zip(*groups))
    # The loop reads group_size columns from each group's start (a window lax.dynamic_slice
    # would otherwise shift back by clamping): pad past the last one. For runs that are
    # whole groups this is the regular layout's width.
    n_pad = _padded_width(int(start[-1]) + group_size, block_size)
    col_group = np.full(n_pad, len(groups), np.int32)
    col_group[: stop[-1]] = np.repeat(np.arange(len(groups), dtype=np.int32), stop - start)
    pad = np.array([n_pad], np.int32)
    bounds = (np.concatenate([start, pad]), np.concatenate([stop, pad]))
    return n_pad, len(groups), np.append(bits, np.int32(DENSE_BITS)), col_group, bounds


def layer_loss(w, w_hat, hessian) -> float:
    """trace((W - Ŵ) H (W - Ŵ)^T) in float64: ‖WX − ŴX‖² up to H's normalisation."""
    D = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)  # [out, in]
    return float(np.sum((D @ np.asarray(hessian, np.float64)) * D))


def _validate(W, H, group_size, block_size, percdamp) -> None:
    if W.ndim != 2:
        raise ValueError(f"w must be [out, in], got shape {W.shape}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"hessian must be [in, in] = {(W.shape[1],) * 2}, got shape {H.shape}")
    if not np.all(np.isfinite(H)) or not np.all(np.isfinite(W)):
        raise ValueError("w and hessian must be finite")
    for name, value in (("group_size", group_size), ("block_size", block_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not percdamp > 0:
        raise ValueError(f"percdamp must be > 0, got {percdamp}")


def _validate_bits(bits, n_groups: int) -> None:
    if bits.shape != (n_groups,):
        raise ValueError(f"group_bits must have one entry per group: {n_groups}, got shape {bits.shape}")
    if not np.issubdtype(bits.dtype, np.integer):
        raise ValueError(f"group_bits must be integers, got dtype {bits.dtype}")
    ok = ((bits >= MIN_BITS) & (bits <= MAX_BITS)) | (bits == DENSE_BITS)
    if not np.all(ok):
        raise ValueError(f"group_bits must be in {MIN_BITS}..{MAX_BITS} or {DENSE_BITS}, got {sorted(set(bits[~ok]))}")


def _validate_runs(runs, n_in: int, group_bits, perm, static_groups: bool) -> list[tuple[int, int]]:
    if group_bits is not None:
        raise ValueError("group_bits must be None when runs is given: the runs carry the bit widths")
    if perm is None:
        raise ValueError("runs needs perm: runs are of permuted columns, in the order perm gives")
    if static_groups:
        raise ValueError("runs needs static_groups=False: their grids come from the error-updated columns")
    try:
        runs = [(operator.index(n_cols), operator.index(bits)) for n_cols, bits in runs]
    except (TypeError, ValueError):
        raise ValueError(f"runs must be a sequence of (n_cols, bits) integer pairs, got {runs!r}") from None
    bad = [(n, b) for n, b in runs if n < 1 or not (MIN_BITS <= b <= MAX_BITS or b == DENSE_BITS)]
    if bad:
        raise ValueError(f"runs need n_cols >= 1 and bits in {MIN_BITS}..{MAX_BITS} or {DENSE_BITS}, got {bad}")
    if sum(n for n, _ in runs) != n_in:
        raise ValueError(f"runs must cover the {n_in} input columns, their n_cols sum to {sum(n for n, _ in runs)}")
    return runs


def _padded_width(n: int, block_size: int) -> int:
    return math.ceil(n / block_size) * block_size


def _damped_inverse_cholesky(H, percdamp: float):
    """Upper Cholesky factor of (H + λ mean(diag H) I)^-1, float32 [in, in], and λ used.

    A factor that is not finite (H not positive definite at float32 precision) is retried
    with 10x the damping, as the paper's remedy for ill-conditioned H.
    """
    damping = percdamp
    mean_diag = float(np.mean(np.diag(H)))
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        damped = H + damping * mean_diag * np.eye(H.shape[0])
        U = np.asarray(_inverse_cholesky_upper(jnp.asarray(damped, jnp.float32)))
        if np.all(np.isfinite(U)):
            return U, damping
        if attempt < MAX_DAMPING_RETRIES:
            logger.warning("GPTQ: Cholesky of H^-1 not finite at damping %g; retrying with %g", damping, damping * 10)
            damping *= 10
    raise ValueError(
        f"hessian: no finite Cholesky factor of H^-1 up to damping {damping:g}; check the calibration data"
    )


@jax.jit
def _inverse_cholesky_upper(H):
    """H [n, n] SPD -> upper U with U^T U = H^-1 (paper §4, 'Cholesky reformulation')."""
    L = jnp.linalg.cholesky(H)
    L_inv = jax.scipy.linalg.solve_triangular(L, jnp.eye(H.shape[0], dtype=H.dtype), lower=True)
    return jnp.triu(jnp.linalg.cholesky(L_inv.T @ L_inv).T)


def _static_group_params(W, bits_pad, group_size: int, symmetric: bool):
    """Grids of consecutive original columns of W [out, in], one per group slot (host side)."""
    n_out, n_in = W.shape
    n_slots = len(bits_pad)
    padded = np.zeros((n_out, n_slots * group_size), np.float32)
    padded[:, :n_in] = W
    real = (np.arange(n_slots * group_size) < n_in).reshape(n_slots, group_size)
    # Dense slots get a throwaway 8-bit grid (never used); 16 is not a valid grid width.
    grid_bits = np.where(bits_pad == DENSE_BITS, 8, bits_pad)
    scale, zero = _group_params(padded.reshape(n_out, n_slots, group_size), real, jnp.asarray(grid_bits), symmetric)
    return np.asarray(scale), np.asarray(zero)


def _group_params(w_cols, real, bits, symmetric: bool):
    """(scale rounded to fp16, zero) of grid over the `real` columns of w_cols [..., n].

    Masked entries are set to 0, which min_max_params always includes in [xmin, xmax], so
    they cannot move the grid.
    """
    scale, zero = min_max_params(jnp.where(real, w_cols, 0.0), bits, symmetric)
    return round_scale_to_fp16(scale), zero


@functools.partial(
    jax.jit, static_argnames=("n_in", "group_size", "block_size", "symmetric", "static_groups")
)
def _gptq_loop(
    W, U, group_bits, col_group, scales0, zeros0, group_bounds=None, *, n_in, group_size, block_size, symmetric,
    static_groups,
):
    """The column loop over W [out, P] (permuted, P a multiple of block_size).

    U: [P, P] upper Cholesky factor of H^-1; group_bits: int32 [slots] (16 = dense);
    col_group: int32 [P] group slot of each processed column; scales0/zeros0 [out, slots]:
    the static groups' parameters (ignored, and found on the fly, without static groups).
    group_bounds: None for groups of group_size columns from column 0 (cut at n_in), or
    (start, stop) int32 [slots], the columns [start, stop) of each slot, for groups of any
    length; P must then leave group_size columns after every start.
    Returns Q f32 [out, P], codes int32 [out, P], scale/zero f32 [out, slots].
    """
    n_out, P = W.shape
    B = block_size
    cols = jnp.arange(P)
    col_bits = group_bits[col_group]  # [P]; padded columns count as dense
    col_dense = (col_bits == DENSE_BITS) | (cols >= n_in)
    if group_bounds is None:
        starts_group = (cols % group_size == 0) & ~col_dense
    else:
        group_start, group_stop = group_bounds
        starts_group = (cols == group_start[col_group]) & ~col_dense

    def column(i, carry, i1, W_block_start):
        W1, Err1, Q1, C1, scales, zeros = carry
        col = i1 + i
        g = col_group[col]

        def fresh_params(sz):
            # The group's columns as fully updated so far: the block-start W minus the lazy
            # update this block has accumulated (equal to W1 inside the block).
            window = lax.dynamic_slice(W_block_start, (0, col), (n_out, group_size))
            window = window - Err1 @ lax.dynamic_slice(U, (i1, col), (B, group_size))
            # Only the group's own columns: the window may reach into the padding, or (runs)
            # into the next group.
            real = col + jnp.arange(group_size) < (n_in if group_bounds is None else group_stop[g])
            s, z = _group_params(window, real, col_bits[col], symmetric)
            return sz[0].at[:, g].set(s), sz[1].at[:, g].set(z)

        if not static_groups:
            scales, zeros = lax.cond(starts_group[col], fresh_params, lambda sz: sz, (scales, zeros))
        w = W1[:, i]
        d = U[col, col]
        s, z = scales[:, g], zeros[:, g]
        c = quantize_codes(w, s, z, col_bits[col])
        q = jnp.where(col_dense[col], w.astype(jnp.float16).astype(jnp.float32), dequantize_codes(c, s, z))
        c = jnp.where(col_dense[col], 0, c)
        err = (w - q) / d  # Algorithm 1: E[:, j] = (W[:, j] - Q[:, j]) / [H^-1]_jj
        W1 = W1 - err[:, None] * lax.dynamic_slice(U, (col, i1), (1, B))
        return W1, Err1.at[:, i].set(err), Q1.at[:, i].set(q), C1.at[:, i].set(c), scales, zeros

    def block(b, carry):
        W, Q, C, scales, zeros = carry
        i1 = b * B
        W1 = lax.dynamic_slice(W, (0, i1), (n_out, B))
        init = (W1, jnp.zeros_like(W1), jnp.zeros_like(W1), jnp.zeros(W1.shape, jnp.int32), scales, zeros)
        _, Err1, Q1, C1, scales, zeros = lax.fori_loop(
            0, B, functools.partial(column, i1=i1, W_block_start=W), init
        )
        # Lazy batch update: all later columns at once. U is upper triangular, so columns
        # before this block are untouched; this block's own columns are overwritten by Q.
        W = W - Err1 @ lax.dynamic_slice(U, (i1, 0), (B, P))
        Q = lax.dynamic_update_slice(Q, Q1, (0, i1))
        C = lax.dynamic_update_slice(C, C1, (0, i1))
        return W, Q, C, scales, zeros

    init = (W, jnp.zeros_like(W), jnp.zeros(W.shape, jnp.int32), scales0, zeros0)
    _, Q, C, scales, zeros = lax.fori_loop(0, P // B, block, init)
    return Q, C, scales, zeros


def _segments(Q, codes, scale, zero, runs, group_size: int):
    """One packed segment per (n_cols, bits) run of the columns of Q / codes [out, in]
    (host side); scale/zero [out, n_groups] hold ceil(n_cols / group_size) slots per run."""
    segments, start, g0 = [], 0, 0
    for n_cols, bits in runs:
        stop, g1 = start + n_cols, g0 + math.ceil(n_cols / group_size)
        if bits == DENSE_BITS:
            segments.append(make_dense_segment(Q[:, start:stop], start))
        else:
            segments.append(
                make_segment(codes[:, start:stop], scale[:, g0:g1], zero[:, g0:g1], int(bits), start, group_size)
            )
        start, g0 = stop, g1
    return segments


def _bit_runs(bits, group_size: int, n_in: int) -> list[tuple[int, int]]:
    """Maximal runs of equal-bit groups of group_size columns, as (n_cols, bits) runs."""
    runs, g0 = [], 0
    for b, same in itertools.groupby(bits.tolist()):
        g1 = g0 + len(list(same))
        runs.append((min(g1 * group_size, n_in) - g0 * group_size, int(b)))
        g0 = g1
    return runs
