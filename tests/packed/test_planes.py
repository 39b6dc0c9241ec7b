"""Bit-plane packing (layout 2): pack -> unpack is the identity, and `pack_codes` matches the
layout stated in planes.py built one bit at a time."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq_jax.packed.planes import PACK_BLOCK, n_blocks, pack_codes, plane_layout, unpack_codes


def reference_pack(codes, bits):
    """Words [bits, blocks, N] built bit by bit from the docstring's rule."""
    k, n = codes.shape
    words = np.zeros((bits, n_blocks(k), n), dtype=np.uint64)
    for col in range(k):
        block, i = divmod(col, PACK_BLOCK)
        for width, first_row, offset in plane_layout(bits):
            per_word = PACK_BLOCK // width
            row, slot = first_row + i // per_word, i % per_word
            for bit in range(width):
                value_bit = (codes[col].astype(np.uint64) >> np.uint64(offset + bit)) & np.uint64(1)
                words[row, block] |= value_bit << np.uint64(width * slot + bit)
    return words.astype(np.uint32)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(2, 8))
    k = draw(st.integers(1, 100))
    n = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 2**bits, size=(k, n)), bits


@settings(max_examples=50, deadline=None)
@given(codes_and_bits())
def test_pack_then_unpack_is_identity(case):
    codes, bits = case
    words = pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (bits, n_blocks(codes.shape[0]), codes.shape[1])
    np.testing.assert_array_equal(np.asarray(unpack_codes(words, bits, codes.shape[0])), codes)


@settings(max_examples=25, deadline=None)
@given(codes_and_bits())
def test_pack_matches_bit_by_bit_reference(case):
    codes, bits = case
    np.testing.assert_array_equal(pack_codes(codes, bits), reference_pack(codes, bits))


@pytest.mark.parametrize(
    "bits,planes",
    [(2, [(2, 0, 0)]), (3, [(2, 0, 0), (1, 2, 2)]), (4, [(4, 0, 0)]), (5, [(4, 0, 0), (1, 4, 4)]),
     (6, [(4, 0, 0), (2, 4, 4)]), (7, [(4, 0, 0), (2, 4, 4), (1, 6, 6)]), (8, [(8, 0, 0)])],
)
def test_plane_split(bits, planes):
    assert list(plane_layout(bits)) == planes
    assert sum(width for width, *_ in planes) == bits  # a block of 32 codes fills exactly `bits` words


def test_four_bit_word_holds_eight_consecutive_columns():
    codes = np.arange(32).reshape(32, 1) % 16
    words = pack_codes(codes, 4)
    expected = [sum(int(codes[8 * j + m, 0]) << (4 * m) for m in range(8)) for j in range(4)]
    np.testing.assert_array_equal(words[:, 0, 0], expected)


def test_three_bit_value_splits_into_two_aligned_fields():
    codes = np.zeros((32, 1), dtype=np.int64)
    codes[17] = 0b101  # low 2 bits 01 -> 2-bit plane word 1 slot 1; high bit 1 -> 1-bit plane slot 17
    words = pack_codes(codes, 3)
    np.testing.assert_array_equal(words[:, 0, 0], [0, 0b01 << 2, 1 << 17])


def test_unpack_under_jit_and_errors():
    codes = np.random.default_rng(0).integers(0, 32, size=(70, 4))
    words = pack_codes(codes, 5)
    np.testing.assert_array_equal(np.asarray(jax.jit(unpack_codes, static_argnums=(1, 2))(words, 5, 70)), codes)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(np.full((4, 1), 8), 3)
    with pytest.raises(ValueError, match=r"words must be \[5, 3, N\]"):
        unpack_codes(words[:4], 5, 70)
