"""Packed storage of quantized layers: bit packing, the QuantizedLinear contract, save/load."""

from mpq_jax.packed.planes import pack_codes, unpack_codes
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
    "pack_codes",
    "save_quantized",
    "storage_bits",
    "unpack_codes",
]
