"""Dequant-matmul of one quantized segment on TPU: Pallas with the Mosaic TPU lowering.

Grid (output tiles j, K tiles k) with k innermost and sequential ("arbitrary"): a float32
VMEM accumulator [T, bn] lives across the K steps of one output tile and is written once.
A K tile is `nb` pack blocks (nb a multiple of 8 that divides the segment's blocks, or all
of them), so every word row is an [nb, bn] slab aligned to the (8, 128) vreg tiling. Scales
and zeros come as the whole [groups, bn] stripe of the output tile (they are 1/group of
the codes' bytes); a step expands them to its blocks with a one-hot [nb, groups] matmul on
the MXU, which handles any group size that is a multiple of 32 without gathers. Each of
the 32 block columns then costs one shift-and-mask slab, a dequantize, and one
[T, nb] @ [nb, bn] MXU product accumulated in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mpq_jax.packed.planes import PACK_BLOCK, unpack_slab
from pallas_kernels.blocks import TPU_BLOCKS, KernelBlocks, largest_divisor_at_most, output_block

SUBLANES = 8  # a TPU vreg is [8, 128]; K tiles are whole multiples of 8 pack blocks


def k_tile_blocks(n_blocks: int, blocks: KernelBlocks) -> int:
    """Pack blocks per K step: a multiple of 8 dividing n_blocks within block_k, else all of them."""
    return largest_divisor_at_most(n_blocks, blocks.block_k // PACK_BLOCK, SUBLANES) or n_blocks


def _kernel(x_ref, codes_ref, scale_ref, zero_ref, o_ref, acc_ref, *, bits, group_size, tile):
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    n_groups = scale_ref.shape[0]
    block_index = k * tile + jax.lax.broadcasted_iota(jnp.int32, (tile, n_groups), 0)
    group_index = jax.lax.broadcasted_iota(jnp.int32, (tile, n_groups), 1)
    # lax.div, not //: indices are non-negative, and floor division lowers through sign().
    one_hot = (jax.lax.div(block_index * PACK_BLOCK, group_size) == group_index).astype(jnp.float32)  # [nb, groups]
    scale = jnp.dot(one_hot, scale_ref[...].astype(jnp.float32), preferred_element_type=jnp.float32)  # [nb, bn]
    zero = jnp.dot(one_hot, zero_ref[...].astype(jnp.float32), preferred_element_type=jnp.float32)
    acc = acc_ref[...]
    for i in range(PACK_BLOCK):
        w = (unpack_slab(lambda r: codes_ref[r], bits, i).astype(jnp.float32) - zero) * scale
        acc += jnp.dot(x_ref[i].astype(jnp.float32), w, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(k == pl.num_programs(1) - 1)
    def _():
        o_ref[...] = acc_ref[...]


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "blocks", "interpret"))
def segment_matmul_tpu(x_arranged, codes, scale, zero, *, bits, group_size, blocks=TPU_BLOCKS, interpret=False):
    """x_arranged [32, T, B] (any float dtype) x one segment's layout-2 arrays -> float32 [T, N].

    Needs group_size to be a multiple of 32; dispatch.py falls back to the reference otherwise.
    `interpret=True` runs the TPU interpreter (pltpu.InterpretParams) on any backend.
    """
    _, tokens, n_blocks = x_arranged.shape
    _, _, n_out = codes.shape
    n_groups = scale.shape[0]
    bn = output_block(n_out, blocks.block_n)
    tile = k_tile_blocks(n_blocks, blocks)
    kernel = functools.partial(_kernel, bits=bits, group_size=group_size, tile=tile)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((tokens, n_out), jnp.float32),
        grid=(pl.cdiv(n_out, bn), n_blocks // tile),
        in_specs=[
            pl.BlockSpec((PACK_BLOCK, tokens, tile), lambda j, k: (0, 0, k)),
            pl.BlockSpec((bits, tile, bn), lambda j, k: (0, k, j)),
            pl.BlockSpec((n_groups, bn), lambda j, k: (0, j)),
            pl.BlockSpec((n_groups, bn), lambda j, k: (0, j)),
        ],
        out_specs=pl.BlockSpec((tokens, bn), lambda j, k: (0, j)),
        scratch_shapes=[pltpu.VMEM((tokens, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"mpq_dequant_matmul_{bits}bit_tpu",
    )(x_arranged, codes, scale, zero)
