"""Quantization methods; each produces a `mpq_jax.packed.QuantizedLinear`."""

# grid first: mpq_jax.packed.qlinear imports it while the methods below import packed.
from mpq_jax.quant.grid import (
    dequantize_codes,
    max_code,
    min_max_params,
    quantize_codes,
    round_scale_to_fp16,
)
from mpq_jax.quant.rtn import rtn_quantize

__all__ = [
    "dequantize_codes",
    "max_code",
    "min_max_params",
    "quantize_codes",
    "round_scale_to_fp16",
    "rtn_quantize",
]
