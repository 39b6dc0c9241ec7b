"""`quantized_matmul`: the one entry point that applies a QuantizedLinear, on any backend.

    y = sum over segments of dequant(seg) @ x_s[..., perm[seg]] + B (A x) + bias,
    x_s = x * input_scale (or x)

On GPU and TPU each quantized segment runs the backend's Pallas kernel; dense (16-bit)
segments, the thin low-rank product and the bias are plain XLA ops in the same jitted
function, where XLA's own GEMM and fusion already do the right thing. Everywhere else (CPU)
the plain-jnp reference runs: `QuantizedLinear.apply`, which dequantizes and multiplies in
float32. A segment whose group size is not a multiple of 32 (a pack block would straddle
two groups) also takes the reference path on every backend.

`backend="gpu"|"tpu"` with `interpret=True` runs a kernel through Pallas's interpreter on
the CPU; the tests use this to check both kernels without the hardware.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpq_jax.packed.planes import PACK_BLOCK, n_blocks
from mpq_jax.packed.qlinear import DENSE_BITS, QuantizedLinear, Segment
from pallas_kernels.blocks import GPU_BLOCKS, TPU_BLOCKS, KernelBlocks
from pallas_kernels.gpu import segment_matmul_gpu
from pallas_kernels.tpu import segment_matmul_tpu

KERNELS = {"gpu": (segment_matmul_gpu, GPU_BLOCKS), "tpu": (segment_matmul_tpu, TPU_BLOCKS)}


def kernel_backend(backend: str | None = None) -> str | None:
    """The kernel family for `backend` (default: JAX's default backend), or None for the reference."""
    backend = backend or jax.default_backend()
    if backend in ("cuda", "rocm"):
        backend = "gpu"
    return backend if backend in KERNELS else None


def kernel_supports(segment: Segment) -> bool:
    return segment.bits != DENSE_BITS and segment.group_size % PACK_BLOCK == 0


def arrange_x(x_seg: jax.Array) -> jax.Array:
    """x_seg [T, K] -> [32, T, blocks] with [i, t, b] = x_seg[t, 32 b + i] (zero-padded K).

    The kernels produce the codes of block column i for every block at once; this puts the
    activations they multiply in the same order. It costs one pass over x, which is
    T * K elements against the weights' K * N.
    """
    tokens, k = x_seg.shape
    padded = jnp.pad(x_seg, ((0, 0), (0, n_blocks(k) * PACK_BLOCK - k)))
    return padded.reshape(tokens, n_blocks(k), PACK_BLOCK).transpose(2, 0, 1)


def segment_matmul(x_seg, segment: Segment, backend: str, interpret: bool = False, blocks: KernelBlocks | None = None):
    """float32 [T, N] = x_seg [T, seg columns] @ the segment's weights, through the backend's kernel."""
    kernel, default_blocks = KERNELS[backend]
    return kernel(
        arrange_x(x_seg),
        segment.codes,
        segment.scale,
        segment.zero,
        bits=segment.bits,
        group_size=segment.group_size,
        blocks=blocks or default_blocks,
        interpret=interpret,
    )


def quantized_matmul(
    x: jax.Array, layer: QuantizedLinear, *, backend: str | None = None, interpret: bool = False, blocks: KernelBlocks | None = None
) -> jax.Array:
    """x [..., in] -> y [..., out] in x's dtype; see the module docstring for the path taken."""
    family = kernel_backend(backend)
    if family is None:
        return layer.apply(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    x_scaled = x2
    if layer.input_scale is not None:  # AWQ: the segments were quantized for x * input_scale
        x_scaled = (x2.astype(jnp.float32) * layer.input_scale.astype(jnp.float32)).astype(x.dtype)
    x_perm = jnp.take(x_scaled, layer.perm, axis=1)  # permuted column p is original column perm[p]
    y = jnp.zeros((x2.shape[0], layer.out_features), jnp.float32)
    for seg in layer.segments:
        x_seg = x_perm[:, seg.start : seg.stop]
        if seg.bits == DENSE_BITS:
            y = y + jnp.dot(x_seg.astype(jnp.float32), seg.dense.astype(jnp.float32))
        elif kernel_supports(seg):
            y = y + segment_matmul(x_seg, seg, family, interpret, blocks)
        else:
            y = y + jnp.dot(x_seg.astype(jnp.float32), seg.dequantize_t())
    if layer.lowrank_a is not None:
        x32 = x2.astype(jnp.float32)
        y = y + (x32 @ layer.lowrank_a.astype(jnp.float32).T) @ layer.lowrank_b.astype(jnp.float32).T
    if layer.bias is not None:
        y = y + layer.bias.astype(jnp.float32)
    return y.astype(x.dtype).reshape(*lead, layer.out_features)
