"""Row-bitstream packing: the storage layout of format-1 checkpoints, read for conversion only.

New checkpoints store codes in bit planes (`mpq_jax.packed.planes`); `mpq_jax.packed.io`
uses `unpack` here to convert format-1 files on load, and `pack` to write them in tests.

Layout 1:
each row along the last axis is a little-endian bitstream. Value j of a row occupies
stream bits [j*bits, (j+1)*bits); word k holds stream bits [32k, 32k+32), bit 0 being the
least significant bit of the word. The row is zero-padded to a multiple of 32 values, so
every block of 32 values fills exactly `bits` words whatever the width (3-, 5-, 6- and
7-bit values straddle word boundaries). That one rule serves every width in 2..8.

`pack` runs on the host (numpy; it is called once when a layer is stored).
`unpack` is pure jnp, jitted with bits and n static (it inlines into callers' jits).

Not here: what the codes mean (see `mpq_jax.quant.grid`) or the current layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

VALUES_PER_BLOCK = 32  # values per block; a block of b-bit values fills exactly b words
MIN_BITS, MAX_BITS = 2, 8


def packed_words(n_values: int, bits: int) -> int:
    """Number of uint32 words that hold `n_values` values of `bits` bits (with padding)."""
    _check_bits(bits)
    n_blocks = -(-n_values // VALUES_PER_BLOCK)
    return n_blocks * bits


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


@functools.lru_cache(maxsize=None)
def _block_layout(bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static placement of the 32 values of one block within its `bits` words.

    Returns (word, shift, spill), each int [32]: value j starts in word `word[j]` at bit
    `shift[j]`; `spill[j]` is true when it runs over into word `word[j] + 1`.
    """
    start = np.arange(VALUES_PER_BLOCK) * bits  # first stream bit of each value
    word = start // 32
    shift = start % 32
    spill = shift + bits > 32
    return word, shift, spill


def pack(codes, bits: int) -> np.ndarray:
    """Pack integer codes [..., n] (each in [0, 2**bits)) into np.uint32 [..., packed_words(n, bits)]."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array, got dtype {codes.dtype}")
    if codes.ndim == 0:
        raise ValueError("codes must have at least one axis (the axis that is packed)")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(
            f"codes out of range for {bits}-bit packing: min {codes.min()}, max {codes.max()}, "
            f"allowed [0, {2**bits - 1}]"
        )
    *lead, n = codes.shape
    n_blocks = -(-n // VALUES_PER_BLOCK)
    padded = np.zeros((*lead, n_blocks * VALUES_PER_BLOCK), dtype=np.uint64)
    padded[..., :n] = codes
    blocks = padded.reshape(*lead, n_blocks, VALUES_PER_BLOCK)  # [..., n_blocks, 32]

    word, shift, spill = _block_layout(bits)
    out = np.zeros((*lead, n_blocks, bits), dtype=np.uint64)  # [..., n_blocks, bits]
    # A loop over the 32 slots of a block (not over values): each slot is vectorized
    # over every block of every row. uint64 keeps the spilled high bits until masked.
    for j in range(VALUES_PER_BLOCK):
        v = blocks[..., j]
        out[..., word[j]] |= (v << np.uint64(shift[j])) & np.uint64(0xFFFFFFFF)
        if spill[j]:
            out[..., word[j] + 1] |= v >> np.uint64(32 - shift[j])
    return out.reshape(*lead, n_blocks * bits).astype(np.uint32)


@functools.partial(jax.jit, static_argnames=("bits", "n"))
def unpack(words, bits: int, n: int) -> jax.Array:
    """Unpack uint32 words [..., packed_words(n, bits)] into int32 codes [..., n].

    int32 (not uint8) so that code arithmetic such as `q - zero` cannot wrap.
    """
    _check_bits(bits)
    words = jnp.asarray(words, dtype=jnp.uint32)
    *lead, n_words = words.shape
    if n_words != packed_words(n, bits):
        raise ValueError(
            f"words has {n_words} words on its last axis; {n} values of {bits} bits need "
            f"{packed_words(n, bits)}"
        )
    n_blocks = n_words // bits
    blocks = words.reshape(*lead, n_blocks, bits)  # [..., n_blocks, bits]

    word, shift, spill = _block_layout(bits)
    # For a non-spilling value the "next word" index and shift are dummies that the mask
    # zeroes; clamping keeps the gather in bounds and the shift below 32.
    next_word = np.minimum(word + 1, bits - 1)
    next_shift = np.where(spill, 32 - shift, 0).astype(np.uint32)
    low = blocks[..., word] >> shift.astype(np.uint32)  # [..., n_blocks, 32]
    high = jnp.where(spill, blocks[..., next_word] << next_shift, jnp.uint32(0))
    values = (low | high) & jnp.uint32(2**bits - 1)
    return values.reshape(*lead, n_blocks * VALUES_PER_BLOCK)[..., :n].astype(jnp.int32)
