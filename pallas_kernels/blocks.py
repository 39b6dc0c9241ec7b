"""Block shapes of the dequant-matmul kernels: the one place their defaults live.

Each kernel computes one quantized segment, y[T, N] = x_seg[T, K] @ W_seg[K, N], tiling N
(outputs) into `block_n` columns and K (inputs) into tiles of 32-column pack blocks. The
defaults are starting points chosen from the layout's arithmetic (see README.md); they are
not tuned on hardware yet (no GPU or TPU was available when they were set).

Not here: the kernels (gpu.py, tpu.py) or which one runs (dispatch.py).
"""

from __future__ import annotations

import dataclasses

from mpq_jax.packed.planes import PACK_BLOCK


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
    """Tile sizes. block_n: outputs per program (a multiple of 128 keeps TPU lanes dense and
    GPU loads coalesced); block_k: most input columns per K step (a multiple of 32)."""

    block_n: int = 256
    block_k: int = 512

    def __post_init__(self):
        if self.block_n < 1 or self.block_k < PACK_BLOCK or self.block_k % PACK_BLOCK:
            raise ValueError(f"KernelBlocks: block_n must be >= 1 and block_k a multiple of {PACK_BLOCK}, got {self}")


GPU_BLOCKS = KernelBlocks(block_n=256, block_k=512)
TPU_BLOCKS = KernelBlocks(block_n=256, block_k=1024)


def output_block(n: int, block_n: int) -> int:
    """Outputs per program: block_n, or all of n when n is smaller (one program)."""
    return min(block_n, n)


def largest_divisor_at_most(n: int, limit: int, multiple_of: int = 1) -> int | None:
    """Largest d <= limit with d | n and multiple_of | d, or None."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0 and d % multiple_of == 0:
            return d
    return None
