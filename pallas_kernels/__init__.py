"""Pallas dequant-matmul kernels for QuantizedLinear layers (GPU and TPU), each beside a
plain-jnp reference, chosen by one dispatch function. Not yet implemented: see the kernels
issue; until then `QuantizedLinear.apply` (plain jnp) is the only execution path."""
