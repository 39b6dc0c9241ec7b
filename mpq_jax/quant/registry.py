"""Every quantization method, registered once: the config's `quantization.method` names one.

Adding a method means a per-layer core (`quant/<method>.py`), a walk
(`quant/<method>_model.py`, the shape in mpq_jax.quant.method), its config section
(mpq_jax.config) and one line here.

Not for: running them (mpq_jax.pipeline).
"""

from __future__ import annotations

import dataclasses

from mpq_jax.errors import ConfigError
from mpq_jax.quant import amlq_model, gptq_model, rtn_model, tammp_model
from mpq_jax.quant.method import Method, QuantizedModel, WalkContext


@dataclasses.dataclass(frozen=True)
class KeepOptions:
    """Method `none`: the model as loaded (the FP reference run)."""

    @classmethod
    def from_config(cls, q) -> "KeepOptions":
        return cls()

    def describe(self) -> str:
        return ""


def keep_model(params: dict, options: KeepOptions, context: WalkContext) -> QuantizedModel:
    return QuantizedModel(params)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", KeepOptions.from_config, keep_model, calibrated=False),
        Method("rtn", rtn_model.RtnOptions.from_config, rtn_model.quantize_model, calibrated=False),
        Method("gptq", gptq_model.GptqOptions.from_config, gptq_model.quantize_model, True, gptq_model.GptqNote),
        Method("amlq", amlq_model.AmlqOptions.from_config, amlq_model.quantize_model, True, amlq_model.AmlqNote, amlq_model.check_options),
        Method("tammp", tammp_model.TammpOptions.from_config, tammp_model.quantize_model, True, tammp_model.TammpNote),
    )
}


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"quantization.method: unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
