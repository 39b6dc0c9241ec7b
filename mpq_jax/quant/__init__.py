"""Quantization methods; each produces `mpq_jax.packed.qlinear.QuantizedLinear`s.

Import the modules themselves (`mpq_jax.quant.grid`, `mpq_jax.quant.rtn`, ...): this package
file stays empty so that `packed.qlinear` can import `quant.grid` while the methods import
`packed`, without an import cycle.
"""
