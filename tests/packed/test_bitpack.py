"""Bit packing: pack -> unpack is the identity, and `pack` matches an independent bitstream."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq_jax.packed.bitpack import pack, packed_words, unpack


def reference_pack_row(values, bits):
    """The layout stated in bitpack's docstring, built one stream bit at a time."""
    n_words = packed_words(len(values), bits)
    stream = np.zeros(n_words * 32, dtype=np.uint8)
    for j, v in enumerate(values):
        for b in range(bits):
            stream[j * bits + b] = (int(v) >> b) & 1
    # Word k = stream bits [32k, 32k + 32), least significant first.
    return (stream.reshape(n_words, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(axis=1)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(2, 8))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    n = draw(st.integers(1, 100))
    seed = draw(st.integers(0, 2**32 - 1))
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=lead + (n,))
    return codes, bits


@settings(max_examples=50, deadline=None)
@given(codes_and_bits())
def test_pack_then_unpack_is_identity(case):
    codes, bits = case
    n = codes.shape[-1]
    words = pack(codes, bits)
    assert words.dtype == np.uint32
    assert words.shape == codes.shape[:-1] + (packed_words(n, bits),)
    np.testing.assert_array_equal(np.asarray(unpack(words, bits, n)), codes)


@settings(max_examples=30, deadline=None)
@given(codes_and_bits())
def test_pack_matches_reference_bitstream(case):
    codes, bits = case
    rows = codes.reshape(-1, codes.shape[-1])
    words = pack(rows, bits)
    for row, packed_row in zip(rows, words):
        np.testing.assert_array_equal(packed_row, reference_pack_row(row, bits))


def test_three_bit_value_straddles_words():
    # Value 10 of a 3-bit row occupies stream bits 30, 31 (word 0) and 32 (word 1).
    codes = np.zeros(32, dtype=np.int64)
    codes[10] = 0b111
    words = pack(codes, 3)
    np.testing.assert_array_equal(words, [0b11 << 30, 0b1, 0])


@pytest.mark.parametrize("n,bits,expected", [(1, 4, 4), (32, 3, 3), (33, 3, 6), (128, 2, 8), (7, 8, 8)])
def test_packed_words(n, bits, expected):
    assert packed_words(n, bits) == expected


def test_unpack_under_jit():
    codes = np.random.default_rng(0).integers(0, 32, size=(4, 70))
    words = pack(codes, 5)
    unpacked = jax.jit(unpack, static_argnums=(1, 2))(words, 5, 70)
    np.testing.assert_array_equal(np.asarray(unpacked), codes)


@pytest.mark.parametrize("bad", [[0, 16], [-1, 0]])
def test_pack_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="out of range"):
        pack(np.array(bad), 4)


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_pack_rejects_bad_width(bits):
    with pytest.raises(ValueError, match="bits"):
        pack(np.zeros(4, dtype=np.int64), bits)
