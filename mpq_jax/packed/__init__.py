"""Packed storage of quantized layers: bit packing, the QuantizedLinear contract, save/load."""

# mpq_jax.quant's methods import this package and qlinear imports mpq_jax.quant.grid;
# loading the quant package first makes that cycle resolve whichever side is imported first.
import mpq_jax.quant  # noqa: F401  (isort: skip)
from mpq_jax.packed.bitpack import pack, packed_words, unpack
from mpq_jax.packed.io import load_quantized, save_quantized
from mpq_jax.packed.qlinear import (
    QuantizedLinear,
    Segment,
    bits_per_weight,
    make_dense_segment,
    make_segment,
    model_bits_per_weight,
    storage_bits,
)

__all__ = [
    "QuantizedLinear",
    "Segment",
    "bits_per_weight",
    "load_quantized",
    "make_dense_segment",
    "make_segment",
    "model_bits_per_weight",
    "pack",
    "packed_words",
    "save_quantized",
    "storage_bits",
    "unpack",
]
