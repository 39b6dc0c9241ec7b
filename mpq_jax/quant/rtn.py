"""Round-to-nearest (RTN) quantization of a weight matrix into a QuantizedLinear.

Each group of `group_size` consecutive input columns of each output row gets its own
min-max grid (`mpq_jax.quant.grid`); the last group may be shorter. RTN is the baseline
every other method is compared against, and the fallback for layers nothing else touches.

The per-group math is one vectorized jnp function (`rtn_codes`); packing happens on the
host afterwards. Not here: error feedback (GPTQ), activation statistics, bit allocation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.packed.planes import MAX_BITS, MIN_BITS
from mpq_jax.packed.qlinear import DENSE_BITS, QuantizedLinear, make_dense_segment, make_segment
from mpq_jax.quant.grid import min_max_params, quantize_codes, round_scale_to_fp16


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric"))
def rtn_codes(w: jax.Array, bits: int, group_size: int, symmetric: bool = False):
    """w [out, in] -> codes int32 [out, in], scale f32 [out, n_groups], zero f32 [out, n_groups].

    The scale is already rounded to its fp16 storage value, so dequantizing the stored
    layer reproduces exactly the grid the codes were chosen on.
    """
    out, n_in = w.shape
    n_groups = math.ceil(n_in / group_size)
    # Repeating the last column fills the short last group without moving its min or max.
    w_padded = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, n_groups * group_size - n_in)), mode="edge")
    w_groups = w_padded.reshape(out, n_groups, group_size)  # [out, n_groups, group_size]
    scale, zero = min_max_params(w_groups, bits, symmetric)  # [out, n_groups] each
    scale = round_scale_to_fp16(scale)
    codes = quantize_codes(w_groups, scale[..., None], zero[..., None], bits)
    return codes.reshape(out, n_groups * group_size)[:, :n_in], scale, zero


def rtn_quantize(w, bits: int, group_size: int, symmetric: bool = False, bias=None) -> QuantizedLinear:
    """Quantize w [out, in] to `bits` (2..8, or 16 for a dense fp16 copy) with identity perm."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be [out, in], got shape {w.shape}")
    if bits == DENSE_BITS:
        return QuantizedLinear.create([make_dense_segment(np.asarray(w, np.float32), 0)], bias=bias)
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS} or 16, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    codes, scale, zero = rtn_codes(w, bits, group_size, symmetric)
    seg = make_segment(np.asarray(codes), np.asarray(scale), np.asarray(zero), bits, 0, group_size)
    return QuantizedLinear.create([seg], bias=bias)
