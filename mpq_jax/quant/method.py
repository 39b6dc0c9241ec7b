"""The shape every quantization method has, so that the pipeline, the report and QAT treat
them alike.

A method is two modules: a pure per-layer core (`quant/<method>.py`: arrays in,
`QuantizedLinear` out; no capture, no files) and a model walk (`quant/<method>_model.py`)
with one call shape:

    quantize_model(params, options, context) -> QuantizedModel

`options` is the method's frozen options dataclass (built from its config section by
`Options.from_config`, the one place a method meets the config); `context` carries what a
walk may need besides the weights: the model spec, the calibration tokens, the cache of the
unquantized model's input statistics, and where to keep resume checkpoints. The walk returns
the new params, one typed `LayerNote` per quantized linear (what the report shows about that
layer), and method-level results for the report.

Methods are registered in one line each in `mpq_jax.pipeline.METHODS`.

Not for: the stages around quantization (mpq_jax.pipeline) or walking linears
(mpq_jax.quant.model).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from mpq_jax.models.spec import ModelSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class WalkContext:
    """What a model walk may use besides params and its options."""

    spec: ModelSpec
    calibration: dict[str, np.ndarray] | None = None  # calibration tokens {source: [n, T]}, for calibrated methods
    statistics: Any = None  # capture.HessianCache of the unquantized model on that calibration, or None
    resume_dir: Path | None = None  # where a walk that supports it checkpoints finished blocks
    fingerprint: str = ""  # run fingerprint (mpq_jax.fingerprint.run_fingerprint) tagging those checkpoints
    output_dir: Path | None = None  # run folder, for a method's own figures (TAMMP's compactness plots)
    progress: bool = True  # progress bars
    # a jax Mesh for data-parallel capture (mpq_jax.parallel); `calibration` then holds this
    # process's share of the windows, whose first window is window `window_offset` of all
    mesh: Any = None
    window_offset: int = 0


class LayerNote:
    """What the report shows about one quantized linear; subclasses are frozen dataclasses.

    `to_json` gives the entries merged into the layer's row of report.json; `report_section`
    turns every layer's row into the method's markdown section (and writes its figures).
    """

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def report_section(cls, layers: list[dict], summary: dict, folder: Path) -> list[str]:
        return []


@dataclasses.dataclass
class QuantizedModel:
    """A walk's result: params with QuantizedLinear block linears, per-layer notes by dotted
    name (one note type per method), and method-level report entries (JSON-serializable)."""

    params: dict
    notes: dict[str, LayerNote] = dataclasses.field(default_factory=dict)
    summary: dict = dataclasses.field(default_factory=dict)


class Options(Protocol):
    """A method's frozen options dataclass."""

    @classmethod
    def from_config(cls, quantization) -> "Options": ...

    def describe(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered method: its walk, its options and what it reads."""

    name: str
    options: Callable[[Any], Any]  # QuantizationConfig -> the method's options
    quantize_model: Callable[[dict, Any, WalkContext], QuantizedModel]
    calibrated: bool  # reads calibration text
    note_type: type[LayerNote] | None = None  # the report section for this method's layers
    check: Callable[[ModelSpec, Any], None] | None = None  # pre-flight check of (spec, options), before any weights load
