"""Walking a model's block linears: the one place that knows which layers get quantized.

Every method quantizes the seven linears of each decoder block (`BLOCK_LINEARS`), never the
embedding or the LM head. This module iterates over them, swaps in `QuantizedLinear`s, and
measures what a report needs (bits per weight, relative weight error per layer).

Not for: choosing codes (the method modules) or allocation across layers.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mpq_jax.capture import pooled_statistics, sequential_quantize
from mpq_jax.models.decoder import LINEAR_INPUT_OF
from mpq_jax.models.spec import BLOCK_LINEARS
from mpq_jax.packed.qlinear import QuantizedLinear, storage_bits
from mpq_jax.quant.gptq import gptq_quantize
from mpq_jax.quant.rtn import rtn_quantize


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


def dequantized_params(params: dict) -> dict:
    """Params with every QuantizedLinear replaced by its dense effective weight (and bias).

    The fake-quantized model computes the same function; on CPU a dense matmul is faster
    than unpacking codes in every forward pass, so evaluation runs on this form. The dtype
    follows the embedding's, so bfloat16 models stay bfloat16.
    """
    dtype = params["embed_tokens"]["weight"].dtype

    def dense(_, layer):
        if not isinstance(layer, QuantizedLinear):
            return layer
        out = {"weight": layer.effective_weight(dtype)}
        if layer.bias is not None:
            out["bias"] = layer.bias.astype(dtype)
        return out

    return replace_block_linears(params, dense, desc="dequantize", progress=False)


def quantize_model_rtn(params: dict, bits: int, group_size: int, symmetric: bool = False) -> dict:
    """RTN every block linear (weights in float32; the original bias is kept)."""

    def quantize_one(_, dense):
        return rtn_quantize(jnp.asarray(dense["weight"], jnp.float32), bits, group_size, symmetric, bias=dense.get("bias"))

    return replace_block_linears(params, quantize_one, desc=f"RTN {bits}-bit g{group_size}")


def quantize_model_gptq(
    params: dict,
    spec,
    calibration: dict[str, np.ndarray],
    *,
    bits: int,
    group_size: int,
    act_order: bool = True,
    static_groups: bool = True,
    symmetric: bool = False,
    percdamp: float = 0.01,
    propagate_quantized: bool = True,
    batch_size: int = 8,
    resume_dir=None,
    fingerprint: str = "",
    hessian_cache=None,
) -> tuple[dict, dict[str, float]]:
    """GPTQ every block linear, block by block on calibration tokens {source: [n, T]}.

    Sources are pooled into one Hessian per linear input (token-weighted). Returns the new
    params and each linear's GPTQ loss trace((W−Ŵ) H (W−Ŵ)ᵀ) by dotted name. A
    `hessian_cache` (capture.HessianCache, with propagate_quantized=False) skips the forward
    passes when the same model and calibration were captured before.
    """
    tokens_per_source = {src: int(np.asarray(t).size) for src, t in calibration.items()}
    losses: dict[str, float] = {}

    def quantize_block(index: int, layer: dict, stats) -> dict:
        pooled = pooled_statistics(stats, tokens_per_source)
        new_layer = {key: (dict(value) if isinstance(value, dict) else value) for key, value in layer.items()}
        for module, name in BLOCK_LINEARS:
            dense = layer[module][name]
            n_groups = -(-dense["weight"].shape[1] // group_size)
            result = gptq_quantize(
                np.asarray(dense["weight"], np.float32),
                pooled[LINEAR_INPUT_OF[name]].hessian,
                [bits] * n_groups,
                group_size,
                act_order=act_order,
                static_groups=static_groups,
                symmetric=symmetric,
                percdamp=percdamp,
                bias=dense.get("bias"),
            )
            new_layer[module][name] = result.qlinear
            losses[linear_name(index, module, name)] = result.loss
        return new_layer

    quantized = sequential_quantize(
        params,
        spec,
        calibration,
        quantize_block,
        propagate_quantized=propagate_quantized,
        batch_size=batch_size,
        resume_dir=resume_dir,
        fingerprint=fingerprint,
        hessian_cache=hessian_cache,
        block_notes=losses,  # a resumed run reports the finished blocks' losses too
    )
    return quantized, losses


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
