"""Bit-plane packing of quantized codes: the storage layout (layout 2) the kernels read.

A segment's codes q [K, N] (K input columns, N outputs; b-bit values, 2 <= b <= 8) are
stored as uint32 words [b, ceil(K / 32), N]:

* The K axis is cut into pack blocks of 32 columns (the last one zero-padded). Every width
  packs a block into exactly b words per output, so a tile of whole blocks is an aligned,
  contiguous load for 2-, 3-, 4- and 8-bit codes alike, and N is the minor (contiguous)
  axis: consecutive outputs are consecutive words, coalesced on a GPU and lane-dense on a
  TPU.
* b is split into power-of-two bit planes, low bits first: 3 = 2 + 1, 5 = 4 + 1,
  6 = 4 + 2, 7 = 4 + 2 + 1; 2, 4 and 8 are one plane each. A plane of width w owns w
  consecutive word rows (`plane_layout`); word row j of it holds, at bit offset w * m, the
  plane's bits of block column i = j * (32 // w) + m. So one 32-bit load yields 16 2-bit,
  8 4-bit or 4 8-bit values, and a 3-bit value is one 2-bit field plus one 1-bit field in
  two aligned words: nothing straddles a word.
* Unpacking is a static sequence of shift-and-mask steps: for block column i, every plane
  contributes `(words[row(i)] >> shift(i)) & mask` — the same [blocks, N] slab for every i —
  so a kernel never gathers or reshapes; it produces the 32 slabs of a tile, each holding
  columns {32 * block + i}, and feeds x in the same (i, block) order.

`pack_codes` runs on the host (numpy, once per stored layer); `unpack_codes` is jnp.
Not here: scales and zero points (stored unpacked per group, see qlinear.py), kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

PACK_BLOCK = 32  # columns per pack block; a block of b-bit codes fills exactly b words per output
MIN_BITS, MAX_BITS = 2, 8


@functools.lru_cache(maxsize=None)
def plane_layout(bits: int) -> tuple[tuple[int, int, int], ...]:
    """(width, first word row, value bit offset) of each plane of a `bits`-bit code, low bits first."""
    _check_bits(bits)
    planes, row, left = [], 0, bits
    for width in (8, 4, 2, 1):  # widest plane first, holding the lowest bits
        if width <= left:
            planes.append((width, row, bits - left))
            row, left = row + width, left - width
    return tuple(planes)


def n_blocks(k: int) -> int:
    """Pack blocks needed for k columns."""
    return -(-k // PACK_BLOCK)


def column_slot(bits: int, plane: int, i: int) -> tuple[int, int]:
    """(word row, bit shift) of block column i's bits in plane number `plane`."""
    width, row, _ = plane_layout(bits)[plane]
    per_word = PACK_BLOCK // width
    return row + i // per_word, width * (i % per_word)


def pack_codes(codes, bits: int) -> np.ndarray:
    """Integer codes [K, N] in [0, 2**bits) -> np.uint32 words [bits, n_blocks(K), N]."""
    _check_bits(bits)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array, got dtype {codes.dtype}")
    if codes.ndim != 2:
        raise ValueError(f"codes must be [K, N], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(
            f"codes out of range for {bits}-bit packing: min {codes.min()}, max {codes.max()}, "
            f"allowed [0, {2**bits - 1}]"
        )
    k, n = codes.shape
    padded = np.zeros((n_blocks(k) * PACK_BLOCK, n), dtype=np.uint32)
    padded[:k] = codes
    blocks = padded.reshape(n_blocks(k), PACK_BLOCK, n)  # [blocks, i, N]
    words = np.zeros((bits, n_blocks(k), n), dtype=np.uint32)
    for plane, (width, _, offset) in enumerate(plane_layout(bits)):
        field = (blocks >> np.uint32(offset)) & np.uint32(2**width - 1)
        for i in range(PACK_BLOCK):
            row, shift = column_slot(bits, plane, i)
            words[row] |= field[:, i, :] << np.uint32(shift)
    return words


def unpack_slab(word_row, bits: int, i: int) -> jax.Array:
    """Codes of block column i of every block in a tile, as uint32 [B, N].

    `word_row(r)` returns word row r of the tile, uint32 [B, N] (`words[r]` for an array;
    a ref load in a kernel, since Triton cannot slice a loaded tensor). The one unpacking
    step that the reference and every kernel share.
    """
    value = None
    for plane, (width, _, offset) in enumerate(plane_layout(bits)):
        row, shift = column_slot(bits, plane, i)
        field = word_row(row)
        if shift:
            field = field >> jnp.uint32(shift)
        field = field & jnp.uint32(2**width - 1)
        if offset:
            field = field << jnp.uint32(offset)
        value = field if value is None else value | field
    return value


def unpack_codes(words, bits: int, k: int) -> jax.Array:
    """uint32 words [bits, n_blocks(k), N] -> int32 codes [k, N].

    int32 (not uint8) so that code arithmetic such as `q - zero` cannot wrap. The jitted
    part unpacks whole 32-column blocks and is compiled per (bits, blocks, N); `k` only
    slices its result, so layers whose segments differ in length by less than a block (TAMMP's
    classes: a different length in nearly every layer) share one program.
    """
    _check_bits(bits)
    words = jnp.asarray(words, dtype=jnp.uint32)
    if words.ndim != 3 or words.shape[:2] != (bits, n_blocks(k)):
        raise ValueError(f"words must be [{bits}, {n_blocks(k)}, N] for {k} columns of {bits} bits, got {words.shape}")
    return leading_rows(unpack_blocks(words, bits), k)


def leading_rows(x, k: int):
    """x[:k]. Eagerly on the CPU the slice is taken in numpy: a jnp slice compiles one small
    program per distinct k, and a model with a different segment length in every layer pays
    that hundreds of times (minutes on 2 cores). Under tracing it is an ordinary slice."""
    if not eager_on_cpu(x):
        return x[:k]
    return jnp.asarray(np.asarray(x)[:k])


def eager_on_cpu(x) -> bool:
    """Whether `x` is a concrete array on the CPU backend (not traced), where assembling a
    packed layer in numpy avoids compiling one small program per array shape."""
    return not isinstance(x, jax.core.Tracer) and jax.default_backend() == "cpu"


@functools.partial(jax.jit, static_argnames="bits")
def unpack_blocks(words, bits: int) -> jax.Array:
    """uint32 words [bits, B, N] -> int32 codes [32 B, N]."""
    slabs = jnp.stack([unpack_slab(words.__getitem__, bits, i) for i in range(PACK_BLOCK)], axis=1)  # [B, 32, N]
    return slabs.reshape(-1, words.shape[2]).astype(jnp.int32)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
