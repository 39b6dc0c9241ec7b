"""RTN over a whole model: every block linear rounded to its grid, no calibration.

Not here: the per-layer rounding (mpq_jax.quant.rtn).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mpq_jax.quant.method import QuantizedModel, WalkContext
from mpq_jax.quant.model import replace_block_linears
from mpq_jax.quant.rtn import rtn_quantize


@dataclasses.dataclass(frozen=True, kw_only=True)
class RtnOptions:
    bits: int  # width of every block linear, 2..8
    group_size: int  # input columns sharing one scale and zero
    symmetric: bool = False  # symmetric grid (zero fixed at 2^(bits-1)) instead of min-max

    @classmethod
    def from_config(cls, q) -> "RtnOptions":
        return cls(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric)

    def describe(self) -> str:
        return f"{self.bits}-bit, group {self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}"


def quantize_model(params: dict, options: RtnOptions, context: WalkContext | None = None) -> QuantizedModel:
    """RTN every block linear (weights in float32; the original bias is kept)."""
    progress = True if context is None else context.progress

    def quantize_one(_, dense):
        weight = jnp.asarray(dense["weight"], jnp.float32)
        return rtn_quantize(weight, options.bits, options.group_size, options.symmetric, bias=dense.get("bias"))

    desc = f"RTN {options.bits}-bit g{options.group_size}"
    return QuantizedModel(replace_block_linears(params, quantize_one, desc=desc, progress=progress))


def quantize_model_rtn(params: dict, bits: int, group_size: int, symmetric: bool = False) -> dict:
    """The params of `quantize_model` with these options: RTN needs nothing else, and tests,
    benchmarks and examples call it this way."""
    return quantize_model(params, RtnOptions(bits=bits, group_size=group_size, symmetric=symmetric)).params
