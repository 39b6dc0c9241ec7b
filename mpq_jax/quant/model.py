"""Walking a model's block linears: the one place that knows which layers get quantized.

Every method quantizes the seven linears of each decoder block (`BLOCK_LINEARS`), never the
embedding or the LM head. This module iterates over them, swaps in `QuantizedLinear`s, and
measures what a report needs (bits per weight, relative weight error per layer). Each
method's walk (`quant/<method>_model.py`) is built on it.

Not for: choosing codes (the method modules), allocation across layers, or dequantizing a
packed model (mpq_jax.packed.params).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from mpq_jax.models.spec import BLOCK_LINEARS
from mpq_jax.packed.qlinear import QuantizedLinear, storage_bits


def linear_name(layer: int, module: str, name: str) -> str:
    return f"layers.{layer}.{module}.{name}"


def iter_block_linears(params: dict) -> Iterator[tuple[str, int, str, str, object]]:
    """(dotted name, layer index, module, name, dense dict or QuantizedLinear) for every block linear."""
    for index, layer in enumerate(params["layers"]):
        for module, name in BLOCK_LINEARS:
            yield linear_name(index, module, name), index, module, name, layer[module][name]


def replace_block_linears(
    params: dict, quantize_one: Callable[[str, object], object], desc: str = "quantize", progress: bool = True
) -> dict:
    """A new params tree with every block linear replaced by `quantize_one(name, linear)`."""
    layers = [
        {key: (dict(value) if isinstance(value, dict) else value) for key, value in layer.items()}
        for layer in params["layers"]
    ]
    items = list(iter_block_linears(params))
    for full_name, index, module, name, dense in tqdm(items, desc=desc, unit="linear", disable=not progress):
        layers[index][module][name] = quantize_one(full_name, dense)
    return {**params, "layers": layers}


@dataclasses.dataclass(frozen=True)
class LinearStats:
    name: str
    shape: tuple[int, int]  # [out, in]
    bits_per_weight: float
    relative_weight_error: float  # ‖W − Ŵ‖_F / ‖W‖_F

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _stored_bits(layer) -> float:
    if isinstance(layer, QuantizedLinear):
        return storage_bits(layer)
    return sum(np.asarray(a).size * np.dtype(a.dtype).itemsize * 8 for a in layer.values())


def linear_stats(original: dict, quantized: dict) -> list[LinearStats]:
    """Per block linear: stored bits per weight and relative weight error against `original`."""
    stats = []
    for (name, _, _, _, dense), (_, _, _, _, layer) in zip(iter_block_linears(original), iter_block_linears(quantized)):
        w = np.asarray(dense["weight"], np.float64)
        w_hat = np.asarray(layer.effective_weight() if isinstance(layer, QuantizedLinear) else layer["weight"], np.float64)
        stats.append(
            LinearStats(
                name=name,
                shape=tuple(w.shape),
                bits_per_weight=_stored_bits(layer) / w.size,
                relative_weight_error=float(np.linalg.norm(w - w_hat) / np.linalg.norm(w)),
            )
        )
    return stats


def average_bits_per_weight(stats: list[LinearStats]) -> float:
    """Stored bits over all block-linear weights / their count (each layer weighted by size)."""
    weights = sum(s.shape[0] * s.shape[1] for s in stats)
    return sum(s.bits_per_weight * s.shape[0] * s.shape[1] for s in stats) / weights
