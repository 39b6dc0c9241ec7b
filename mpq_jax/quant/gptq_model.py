"""GPTQ over a whole model: block by block on calibration text, one pooled Hessian per
linear input, the next block fed by the quantized (or, with propagate "fp", the original)
block's outputs.

With propagate "fp" every block's statistics depend only on the model and the calibration,
so they come from the shared on-disk cache (`capture.HessianCache`) and no forward pass runs.
With "quantized", finished blocks are checkpointed in the context's resume folder, so a
killed run continues where it stopped.

Not here: the per-layer algorithm (mpq_jax.quant.gptq), capture (mpq_jax.capture).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mpq_jax.capture import sequential_quantize
from mpq_jax.models.decoder import LINEAR_INPUT_OF
from mpq_jax.models.spec import BLOCK_LINEARS
from mpq_jax.quant.gptq import gptq_quantize
from mpq_jax.quant.method import LayerNote, QuantizedModel, WalkContext
from mpq_jax.quant.model import linear_name
from mpq_jax.stats import pooled_statistics, token_counts


@dataclasses.dataclass(frozen=True, kw_only=True)
class GptqOptions:
    bits: int  # width of every block linear, 2..8
    group_size: int  # input columns sharing one scale and zero
    act_order: bool = True  # process columns by descending Hessian diagonal
    static_groups: bool = True  # groups of consecutive original columns, grids from the original weights
    symmetric: bool = False  # symmetric grid instead of min-max
    percdamp: float = 0.01  # damping added to diag(H), relative to its mean
    propagate_quantized: bool = True  # feed the next block with the quantized block's outputs
    batch_size: int = 8  # calibration windows per forward pass

    @classmethod
    def from_config(cls, q) -> "GptqOptions":
        return cls(
            bits=q.bits,
            group_size=q.group_size,
            act_order=q.act_order,
            static_groups=q.static_groups,
            symmetric=q.symmetric,
            percdamp=q.percdamp,
            propagate_quantized=q.propagate != "fp",
        )

    def describe(self) -> str:
        return f"{self.bits}-bit, group {self.group_size}, {'symmetric' if self.symmetric else 'asymmetric'}"


@dataclasses.dataclass(frozen=True)
class GptqNote(LayerNote):
    loss: float  # trace((W − Ŵ) H (W − Ŵ)ᵀ) on the pooled calibration Hessian

    def to_json(self) -> dict:
        return {"gptq_loss": self.loss}

    @classmethod
    def report_section(cls, layers: list[dict], summary: dict, folder: Path) -> list[str]:
        lines = ["", "## GPTQ layer losses", "", "| layer | GPTQ loss tr(ΔW H ΔWᵀ) |", "|---|---:|"]
        return lines + [f"| {row['name']} | {row['gptq_loss']:.4g} |" for row in layers]


def quantize_model(params: dict, options: GptqOptions, context: WalkContext) -> QuantizedModel:
    """GPTQ every block linear, block by block on the context's calibration tokens.

    Sources are pooled into one Hessian per linear input (token-weighted). Each layer's note
    is its GPTQ loss. With `propagate_quantized=False` the context's statistics cache (if
    any) supplies the Hessians; otherwise finished blocks are checkpointed in
    `context.resume_dir` (if set) under `context.fingerprint`.
    """
    tokens_per_source = token_counts(context.calibration)
    losses: dict[str, float] = {}

    def quantize_block(index: int, layer: dict, stats) -> dict:
        pooled = pooled_statistics(stats, tokens_per_source)
        new_layer = {key: (dict(value) if isinstance(value, dict) else value) for key, value in layer.items()}
        for module, name in BLOCK_LINEARS:
            dense = layer[module][name]
            n_groups = -(-dense["weight"].shape[1] // options.group_size)
            result = gptq_quantize(
                np.asarray(dense["weight"], np.float32),
                pooled[LINEAR_INPUT_OF[name]].hessian,
                [options.bits] * n_groups,
                options.group_size,
                act_order=options.act_order,
                static_groups=options.static_groups,
                symmetric=options.symmetric,
                percdamp=options.percdamp,
                bias=dense.get("bias"),
            )
            new_layer[module][name] = result.qlinear
            losses[linear_name(index, module, name)] = result.loss
        return new_layer

    cache = None if options.propagate_quantized else context.statistics
    quantized = sequential_quantize(
        params,
        context.spec,
        context.calibration,
        quantize_block,
        propagate_quantized=options.propagate_quantized,
        batch_size=options.batch_size,
        progress=context.progress,
        resume_dir=context.resume_dir,
        fingerprint=context.fingerprint,
        hessian_cache=cache,
        block_notes=losses,  # a resumed run reports the finished blocks' losses too
        mesh=context.mesh,
    )
    return QuantizedModel(quantized, {name: GptqNote(loss) for name, loss in losses.items()})
