"""Fake quantization of master weights with a straight-through estimator (STE).

Forward: the grid of `mpq_jax.quant.grid`, with the scale as it is stored (clamped into
float16's normal range and rounded to float16) and the zero point as it is stored (rounded
and clamped to a code):

    s = fp16(scale),  z = clip(round(zero), 0, maxq)
    q = clip(round(w / s) + z, 0, maxq)          (= grid.quantize_codes)
    ŵ = (q - z) * s                                (= grid.dequantize_codes)

so ŵ is bit-identical to dequantizing the packed segment made from the same w, scale and
zero (`mpq_jax.qat.trainable.packed_linear`).

Backward, the rule implemented (EfficientQAT's `round_ste` / `clamp_ste`, written out):
rounding passes gradients straight through, i.e. d round(x)/dx := 1 for round(w/s),
round(zero) and the float16 rounding of the scale; with v = round(w/s) + z,

    inside the grid (0 <= v <= maxq):   dŵ/dw = 1,  dŵ/ds = round(w/s) - w/s,  dŵ/dz = 0
    clamped (v < 0 or v > maxq):        dŵ/dw = 0,  dŵ/ds = q - z,             dŵ/dz = -s

The bounds count as inside (v == 0 or v == maxq), which is what torch's `clamp` does (its
gradient mask is min <= x <= max) and so what EfficientQAT trains with. `jnp.clip`'s own
derivative differs exactly there (it is built from min/max, whose JVP at a tie is split or
one-sided), and `lax.clamp`'s passes only strictly inside; writing the rule as a custom_vjp
keeps it independent of those choices. The clamp of round(zero) to [0, maxq] passes its
gradient straight through as well (a zero that wanders past the code range keeps learning
instead of freezing).

`fake_quantize_reference` is the float64 numpy reference the tests differentiate
numerically: the same function with every rounding replaced by a fixed offset (a smooth
surrogate whose derivatives are the STE's by construction).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.quant.grid import dequantize_codes, max_code, quantize_codes, round_scale_to_fp16


def stored_zero(zero, bits: int) -> jax.Array:
    """The zero-point code a trainable (float) zero is stored as: clip(round(zero), 0, maxq)."""
    return jnp.clip(jnp.round(zero), 0, max_code(bits))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fake_quantize(w, scale, zero, bits: int):
    """ŵ [..., cols] from master weights w and per-column scale and zero (broadcast to w).

    Float32 arithmetic whatever w's dtype (bfloat16 master weights are upcast), result float32.
    """
    s = round_scale_to_fp16(scale)
    z = stored_zero(zero.astype(jnp.float32), bits)
    return dequantize_codes(quantize_codes(w.astype(jnp.float32), s, z, bits), s, z)


def _fake_quantize_fwd(w, scale, zero, bits):
    return fake_quantize(w, scale, zero, bits), (w, scale, zero)


def _fake_quantize_bwd(bits, residuals, g):
    w, scale, zero = residuals
    s = round_scale_to_fp16(scale)
    z = stored_zero(zero.astype(jnp.float32), bits)
    ratio = w.astype(jnp.float32) / s
    rounded = jnp.round(ratio)
    v = rounded + z
    inside = (v >= 0) & (v <= max_code(bits))
    q = jnp.clip(v, 0, max_code(bits))
    d_w = jnp.where(inside, g, 0.0)
    d_scale = g * jnp.where(inside, rounded - ratio, q - z)
    d_zero = jnp.where(inside, 0.0, -g * s)
    return d_w.astype(w.dtype), _unbroadcast(d_scale, scale), _unbroadcast(d_zero, zero)


fake_quantize.defvjp(_fake_quantize_fwd, _fake_quantize_bwd)


def _unbroadcast(grad, like) -> jax.Array:
    """Sum `grad` over the axes along which `like` was broadcast to it."""
    like_shape = (1,) * (grad.ndim - like.ndim) + tuple(like.shape)
    axes = tuple(i for i, (n, m) in enumerate(zip(like_shape, grad.shape)) if n == 1 and m != 1)
    return jnp.sum(grad, axis=axes, keepdims=True).reshape(like.shape).astype(like.dtype)


def fake_quantize_reference(w, scale, zero, bits: int, at=None):
    """float64 numpy ŵ with the STE surrogate: every rounding r(x) replaced by x + (r(x0) - x0)
    with x0 taken at the point `at` = (w0, scale0, zero0) (default: the inputs themselves),
    float16 rounding of the scale included. At `at` it equals `fake_quantize` (in float64);
    near `at`, off the clamp bounds, its derivatives are the STE rule's."""
    w, scale, zero = (np.asarray(a, np.float64) for a in (w, scale, zero))
    w0, scale0, zero0 = (w, scale, zero) if at is None else (np.asarray(a, np.float64) for a in at)
    maxq = max_code(bits)
    s_offset = np.asarray(round_scale_to_fp16(scale0), np.float64) - scale0
    s = scale + s_offset
    s0 = scale0 + s_offset
    z_offset = np.clip(np.round(zero0), 0, maxq) - zero0
    z = zero + z_offset
    r_offset = np.round(w0 / s0) - w0 / s0
    v = w / s + r_offset + z
    return (np.clip(v, 0, maxq) - z) * s


@jax.custom_vjp
def stored_float16(x):
    """x as it will be stored (float16, returned as float32), with the gradient passed straight
    through: trained dense columns, low-rank factors and biases then compute in training
    exactly what the packed layer will compute."""
    return x.astype(jnp.float16).astype(jnp.float32)


stored_float16.defvjp(lambda x: (stored_float16(x), None), lambda _, g: (g,))


@jax.custom_vjp
def stored_scale(scale):
    """The scale as stored (clamped into float16's normal range, rounded to float16, as
    float32), the gradient passed straight through."""
    return round_scale_to_fp16(scale)


stored_scale.defvjp(lambda s: (stored_scale(s), None), lambda _, g: (g,))


def dequantize_fixed_codes(codes, scale, zero, bits: int):
    """ŵ = (q - z)·s for fixed integer codes q (EfficientQAT's E2E-QP: codes frozen, step
    sizes trained): ∂ŵ/∂s = q - z and ∂ŵ/∂z = -s exactly, the roundings of s and z straight
    through. Bit-identical to dequantizing the packed segment."""
    return dequantize_codes(codes, stored_scale(scale), _stored_zero_ste(zero, bits))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _stored_zero_ste(zero, bits: int):
    return stored_zero(zero, bits)


_stored_zero_ste.defvjp(lambda z, bits: (_stored_zero_ste(z, bits), None), lambda bits, _, g: (g,))
