"""The uniform (min-max) quantizer grid: the one place that defines it.

A b-bit grid is `scale * (q - zero)` for integer codes q in [0, 2**b - 1] (maxq = 2**b - 1).
Every method (RTN, GPTQ, AMLQ, QAT) imports its parameters and rounding from here, so
codes written by any of them mean the same thing when dequantized.

Conventions follow the GPTQ reference quantizer (IST-DASLab, `quant.py`):
  asymmetric  xmin = min(min(w), 0), xmax = max(max(w), 0)   (0 is always on the grid)
              scale = (xmax - xmin) / maxq,  zero = round(-xmin / scale)
  symmetric   scale = 2 * max|w| / maxq,     zero = (maxq + 1) / 2 = 2**(b-1)
  degenerate  a row that is all zeros gets xmin = -1, xmax = +1 so its scale is never 0;
              its values still quantize exactly to 0 because `zero` is an integer code.

The zero point is returned as a float array holding integer values (it is stored packed as
a b-bit code by `mpq_jax.packed`). `quantize_codes` / `dequantize_codes` are elementwise and
broadcast: for per-row parameters from `min_max_params` pass `scale[..., None]`.

Functions are pure jnp; numpy inputs work (the results are jax arrays).
Not here: packing (mpq_jax.packed.bitpack), grouping of columns (the methods do it).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# fp16 is the storage dtype of scales; a scale below its smallest normal value would lose
# precision or flush to 0 when stored, so stored scales are clamped to this floor.
FP16_TINY = float(np.finfo(np.float16).tiny)
FP16_MAX = float(np.finfo(np.float16).max)


def max_code(bits: int) -> int:
    """Largest code of a `bits`-bit grid (maxq)."""
    return 2**bits - 1


def min_max_params(w, bits: int, symmetric: bool = False):
    """Grid parameters per row over the last axis: w [..., n] -> (scale [...], zero [...])."""
    w = jnp.asarray(w)
    w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    maxq = max_code(bits)
    xmin = jnp.minimum(jnp.min(w, axis=-1), 0.0)
    xmax = jnp.maximum(jnp.max(w, axis=-1), 0.0)
    if symmetric:
        xmax = jnp.maximum(-xmin, xmax)
        xmin = -xmax
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(degenerate, -1.0, xmin)
    xmax = jnp.where(degenerate, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if symmetric:
        zero = jnp.full_like(scale, (maxq + 1) // 2)
    else:
        zero = jnp.round(-xmin / scale)
    return scale, zero


def quantize_codes(w, scale, zero, bits: int):
    """Integer codes clip(round(w / scale) + zero, 0, maxq) as int32 (broadcasting)."""
    w = jnp.asarray(w)
    q = jnp.round(w / scale) + zero
    return jnp.clip(q, 0, max_code(bits)).astype(jnp.int32)


def dequantize_codes(q, scale, zero):
    """Grid values (q - zero) * scale (broadcasting); float dtype of `scale` (at least f32)."""
    scale = jnp.asarray(scale)
    dtype = jnp.promote_types(scale.dtype, jnp.float32)
    return (jnp.asarray(q).astype(dtype) - jnp.asarray(zero).astype(dtype)) * scale.astype(dtype)


def round_scale_to_fp16(scale):
    """The scale as it will be stored: clamped into fp16's normal range and rounded to fp16.

    Returned in float32. Methods quantize with this value (not the unrounded one) so that
    dequantizing the stored checkpoint reproduces exactly the grid they optimized for.
    """
    scale = jnp.clip(jnp.asarray(scale, jnp.float32), FP16_TINY, FP16_MAX)
    return scale.astype(jnp.float16).astype(jnp.float32)
