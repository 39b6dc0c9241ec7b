"""Dequant-matmul of one quantized segment on GPU: Pallas with the Triton lowering.

Why Triton and not Mosaic GPU: the work is a memory-bound GEMV/skinny GEMM whose inner loop
is integer shifts, masks and a multiply-add; Triton lowers that on every NVIDIA generation
from Ampere on, while Mosaic GPU targets Hopper's TMA/wgmma, which pay off for large
compute-bound tiles, not for streaming packed weights. jax-triton is not used: Pallas ships
its own Triton lowering, so the extra dependency would buy nothing here.

Program j owns outputs [j * bn, (j + 1) * bn) and walks K in tiles that never straddle a
quantization group (tile = a divisor of the group, at most `block_k` columns), so each
step loads one scale row and one zero row. Per step: `bits` word rows [nb, bn] (the
tile's codes, one aligned load each), then for each of the 32 block columns i one
shift-and-mask slab, dequantized in float32 and multiplied with x's matching columns
(x arrives arranged [32, T, blocks], see dispatch.arrange_x). The product is a broadcast
multiply and a sum over the tile's blocks, which has no minimum shape, unlike tl.dot
(>= 16 per side), so decode (T = 1) and short tiles need no padding of the weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mpq_jax.packed.planes import PACK_BLOCK, unpack_slab
from pallas_kernels.blocks import GPU_BLOCKS, KernelBlocks, largest_divisor_at_most, output_block


def k_tile_blocks(group_size: int, blocks: KernelBlocks) -> int:
    """Pack blocks per K step: the largest divisor of the group's blocks within block_k."""
    return largest_divisor_at_most(group_size // PACK_BLOCK, blocks.block_k // PACK_BLOCK)


def _kernel(x_ref, codes_ref, scale_ref, zero_ref, o_ref, *, bits, group_size, n_blocks, tile):
    tokens, bn = o_ref.shape

    def step(first_block, size, acc):
        rows = [codes_ref[r, pl.ds(first_block, size), :] for r in range(bits)]  # [size, bn] each
        group = jax.lax.div(first_block * PACK_BLOCK, group_size)  # non-negative: no floor needed
        scale = scale_ref[pl.ds(group, 1), :].astype(jnp.float32)  # [1, bn]
        zero = zero_ref[pl.ds(group, 1), :].astype(jnp.float32)
        for i in range(PACK_BLOCK):
            w = (unpack_slab(rows.__getitem__, bits, i).astype(jnp.float32) - zero) * scale  # [size, bn]
            x = x_ref[i, :, pl.ds(first_block, size)].astype(jnp.float32)  # [T, size]
            acc = acc + jnp.sum(x[:, :, None] * w[None, :, :], axis=1)
        return acc

    n_full = n_blocks // tile
    acc = jax.lax.fori_loop(
        0, n_full, lambda k, acc: step(k * tile, tile, acc), jnp.zeros((tokens, bn), jnp.float32)
    )
    remainder = n_blocks - n_full * tile
    if remainder:  # the segment's last group is shorter than the tile (static shapes)
        acc = step(n_full * tile, remainder, acc)
    o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "blocks", "interpret"))
def segment_matmul_gpu(x_arranged, codes, scale, zero, *, bits, group_size, blocks=GPU_BLOCKS, interpret=False):
    """x_arranged [32, T, B] (any float dtype) x one segment's layout-2 arrays -> float32 [T, N].

    Needs group_size to be a multiple of 32 (a pack block never straddles a group);
    dispatch.py falls back to the reference otherwise.
    """
    _, tokens, n_blocks = x_arranged.shape
    _, _, n_out = codes.shape
    n_groups = scale.shape[0]
    bn = output_block(n_out, blocks.block_n)
    kernel = functools.partial(
        _kernel, bits=bits, group_size=group_size, n_blocks=n_blocks, tile=k_tile_blocks(group_size, blocks)
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tokens, n_out), jnp.float32),
        grid=(pl.cdiv(n_out, bn),),
        in_specs=[
            pl.BlockSpec((PACK_BLOCK, tokens, n_blocks), lambda j: (0, 0, 0)),
            pl.BlockSpec((bits, n_blocks, bn), lambda j: (0, 0, j)),
            pl.BlockSpec((n_groups, bn), lambda j: (0, j)),
            pl.BlockSpec((n_groups, bn), lambda j: (0, j)),
        ],
        out_specs=pl.BlockSpec((tokens, bn), lambda j: (0, j)),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=f"mpq_dequant_matmul_{bits}bit_gpu",
    )(x_arranged, codes, scale, zero)
