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
    paper; TAMMP's column classes use this), or
    (`static_groups`, the GPTQ reference code's option, llm-compressor's act-order
    "static") consecutive columns *in the original order*, with parameters fixed up front
    from the original W while the columns are still processed in act-order. The stored
    layer then keeps the original column order (identity perm), so no group index is
    needed. This is the grouping that matched llm-compressor's GPTQ layer for layer
    (tests/quant/test_gptq.py, where the compare extra is installed).

The column loop is one jitted program of `lax.fori_loop`s with static shapes (W padded to
a whole number of blocks), so its compile time does not depend on the layer width, and it
is recompiled only per (out, padded in, group_size, block_size, flags). Host side: input
checks, dead-input handling, damping retries, packing into segments, the loss.

Not here: collecting H from activations (calibration), choosing bits or orders (AMLQ,
TAMMP), low-rank error reconstruction.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

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
) -> GPTQResult:
    """Quantize w [out, in] with GPTQ given hessian [in, in]; see the module docstring.

    group_bits: [ceil(in / group_size)] bit width per group: of consecutive permuted columns,
    or of consecutive original columns with static_groups.
    perm: [in] processing order (permuted column p is original column perm[p]); overrides
    act_order. factor: `inverse_factor(hessian, perm, percdamp)` computed once by a caller
    that quantizes the same (H, order) several times (AMLQ's presets); it must match
    hessian, perm and percdamp. with_loss=False skips the float64 loss (reported as nan).
    Raises ValueError naming the argument for inconsistent inputs.
    """
    perm, Q, codes, scale, zero, damping = _quantize_columns(
        w, hessian, group_bits, group_size, perm, act_order, static_groups, symmetric, percdamp, block_size, factor
    )
    w_hat = np.empty_like(Q)
    w_hat[:, perm] = Q
    if static_groups:  # groups live in the original order: store it, with no permutation
        codes_orig = np.empty_like(codes)
        codes_orig[:, perm] = codes
        segments = _segments(w_hat, codes_orig, scale, zero, np.asarray(group_bits), group_size)
        qlinear = QuantizedLinear.create(segments, bias=bias)
    else:
        segments = _segments(Q, codes, scale, zero, np.asarray(group_bits), group_size)
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
    w, hessian, group_bits, group_size, perm, act_order, static_groups, symmetric, percdamp, block_size, factor=None
):
    """Host preparation and the column loop, before packing.

    Returns perm [in], Q f32 [out, in] (the Ŵ the loop produced, permuted order), codes
    int32 [out, in], scale/zero f32 [out, n_groups], and the relative damping used.
    """
    W = np.array(w, dtype=np.float32)  # [out, in], a copy: dead columns are zeroed below
    H = np.array(hessian, dtype=np.float64)  # [in, in]
    _validate(W, H, group_size, block_size, percdamp)
    n_out, n_in = W.shape
    n_groups = math.ceil(n_in / group_size)
    bits = np.asarray(group_bits)
    _validate_bits(bits, n_groups)

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

    n_pad = _padded_width(n_groups * group_size, block_size)
    W_pad = np.zeros((n_out, n_pad), np.float32)
    W_pad[:, :n_in] = W[:, perm]
    # Padded columns get an identity block: no error flows into or out of them.
    U = np.eye(n_pad, dtype=np.float32)
    U[:n_in, :n_in] = Hinv
    # One bit width per group slot of the padded width; slots past the real groups are dense.
    n_slots = n_pad // group_size + 1
    bits_pad = np.full(n_slots, DENSE_BITS, np.int32)
    bits_pad[:n_groups] = bits
    # Group slot of each processed column: its position's group, or (static groups) its
    # original column's; padded columns fall in the last, dense slot.
    col_group = np.full(n_pad, n_slots - 1, np.int32)
    col_group[:n_in] = (perm if static_groups else np.arange(n_in)) // group_size
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
        n_in=n_in,
        group_size=int(group_size),
        block_size=int(block_size),
        symmetric=bool(symmetric),
        static_groups=bool(static_groups),
    )
    Q, codes = np.asarray(Q)[:, :n_in], np.asarray(codes)[:, :n_in]
    return perm, Q, codes, np.asarray(scale)[:, :n_groups], np.asarray(zero)[:, :n_groups], damping


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
def _gptq_loop(W, U, group_bits, col_group, scales0, zeros0, *, n_in, group_size, block_size, symmetric, static_groups):
    """The column loop over W [out, P] (permuted, P a multiple of block_size).

    U: [P, P] upper Cholesky factor of H^-1; group_bits: int32 [slots] (16 = dense);
    col_group: int32 [P] group slot of each processed column; scales0/zeros0 [out, slots]:
    the static groups' parameters (ignored, and found on the fly, without static groups).
    Returns Q f32 [out, P], codes int32 [out, P], scale/zero f32 [out, slots].
    """
    n_out, P = W.shape
    B = block_size
    cols = jnp.arange(P)
    col_bits = group_bits[col_group]  # [P]; padded columns count as dense
    col_dense = (col_bits == DENSE_BITS) | (cols >= n_in)
    starts_group = (cols % group_size == 0) & ~col_dense

    def column(i, carry, i1, W_block_start):
        W1, Err1, Q1, C1, scales, zeros = carry
        col = i1 + i
        g = col_group[col]

        def fresh_params(sz):
            # The group's columns as fully updated so far: the block-start W minus the lazy
            # update this block has accumulated (equal to W1 inside the block).
            window = lax.dynamic_slice(W_block_start, (0, col), (n_out, group_size))
            window = window - Err1 @ lax.dynamic_slice(U, (i1, col), (B, group_size))
            real = col + jnp.arange(group_size) < n_in
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


def _segments(Q, codes, scale, zero, bits, group_size: int):
    """Maximal runs of equal-bit groups -> packed segments (host side)."""
    n_in = Q.shape[1]
    segments, g0 = [], 0
    while g0 < len(bits):
        g1 = g0
        while g1 < len(bits) and bits[g1] == bits[g0]:
            g1 += 1
        start, stop = g0 * group_size, min(g1 * group_size, n_in)
        if bits[g0] == DENSE_BITS:
            segments.append(make_dense_segment(Q[:, start:stop], start))
        else:
            segments.append(
                make_segment(codes[:, start:stop], scale[:, g0:g1], zero[:, g0:g1], int(bits[g0]), start, group_size)
            )
        g0 = g1
    return segments
