"""AMLQ over a whole model: a measuring pass, the allocation, a quantizing pass.

1. `measure_model`: every block linear's candidates (mpq_jax.quant.amlq.measure_layer)
   from the unquantized model's input statistics. They come from the on-disk
   `HessianCache` (filled first if needed: one forward pass per block), because every
   candidate of every layer must be measured on the same, unquantized inputs.
2. `allocate_model`: one candidate per layer under the BPW budget by the greedy of
   mpq_jax.allocate, over AMQ candidates (no low-rank term) or AMLQ ones.
3. `build_model`: the chosen layers, from the GPTQ results kept by the measuring pass
   (`keep=True`: about presets x the packed model in host memory) or recomputed, plus
   the PCA terms computed from the cached statistics.

One measurement serves any number of budgets and both methods (scripts/bench_amlq.py).
`quantize_model` runs the three in order: the walk every method has (mpq_jax.quant.method).

Not here: per-layer math (amlq.py), the knapsack (allocate.py), I/O and reports.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from mpq_jax.allocate import Candidate, bpw_range, greedy_allocate
from mpq_jax.capture import HessianCache, fill_hessian_cache
from mpq_jax.errors import ConfigError
from mpq_jax.models.decoder import LINEAR_INPUT_OF
from mpq_jax.models.spec import BLOCK_LINEARS, ModelSpec
from mpq_jax.quant.amlq import (
    DEFAULT_LOWRANK_BPW,
    DEFAULT_PRESETS,
    LayerPlan,
    Preset,
    build_layer,
    layer_summary,
    measure_layer,
    preset_storage_bits,
    presets_from_config,
    reachable_bits,
)
from mpq_jax.quant.awq import DEFAULT_ALPHA_GRID
from mpq_jax.quant.method import LayerNote, QuantizedModel, WalkContext
from mpq_jax.quant.model import linear_name
from mpq_jax.stats import pooled_statistics

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Measurement:
    plans: list[LayerPlan]  # one per block linear, in iter_block_linears order
    presets: tuple[Preset, ...]
    kept: dict | None  # (layer name, preset index) -> QuantizedLinear without low-rank term
    lowrank: bool  # whether AMLQ candidates were measured

    @property
    def n_weights(self) -> int:
        return sum(p.shape[0] * p.shape[1] for p in self.plans)

    def options(self, lowrank: bool) -> list[list[Candidate]]:
        """Per layer, AMQ's candidates (rank None: nothing added) or AMLQ's: those plus every
        rank (0 = the folded mean alone), so AMLQ may still leave a layer without a term."""
        if lowrank and not self.lowrank:
            raise ConfigError("AMLQ allocation needs a measurement with low-rank candidates (lowrank_bpw set)")
        return [[c for c in plan.candidates if lowrank or c.label[1] is None] for plan in self.plans]


def reachable_bpw(
    spec: ModelSpec, presets: Sequence[Preset], lowrank_bpw: Sequence[float] | None
) -> tuple[float, float]:
    """(lowest, highest) BPW a measurement with these presets and ranks can be allocated to,
    from the layer shapes alone (`amlq.reachable_bits`), so that a budget is checked before
    the measuring pass (minutes) instead of after it."""
    low = high = weights = 0
    for module, name in BLOCK_LINEARS:
        n_out, n_in = spec.linear_shape(module, name)
        layer_low, layer_high = reachable_bits(n_out, n_in, spec.linear_has_bias(module, name), presets, lowrank_bpw)
        low, high, weights = low + layer_low, high + layer_high, weights + n_out * n_in
    return low / weights, high / weights  # every block has the same layers


def check_target_reachable(spec: ModelSpec, target_bpw: float, presets: Sequence[Preset], lowrank_bpw: Sequence[float] | None) -> None:
    """ConfigError naming the reachable range when no allocation can meet `target_bpw`."""
    low, high = reachable_bpw(spec, presets, lowrank_bpw)
    if target_bpw < low:
        cheapest = min(presets, key=lambda p: preset_storage_bits(spec.hidden_size, spec.hidden_size, p))
        raise ConfigError(
            f"quantization.amlq.target_bpw: {target_bpw:g} is below what these presets can store: every layer at its "
            f"cheapest preset ({cheapest.name}) already takes {low:.3f} BPW; reachable: {low:.3f} to about {high:.3f} BPW. "
            "Choose a target in that range or add a cheaper preset (quantization.amlq.presets)"
        )
    if target_bpw > high:
        log.warning("target BPW %.3f is above the most these presets store (about %.3f): every layer will get its best", target_bpw, high)


def check_options(spec: ModelSpec, options: "AmlqOptions") -> None:
    """Pre-flight: the budget against what the presets can reach on these layer shapes."""
    check_target_reachable(spec, options.target_bpw, options.presets, options.lowrank_bpw if options.lowrank else None)


def measure_model(
    params: dict,
    spec: ModelSpec,
    calibration: dict[str, np.ndarray],
    cache: HessianCache,
    *,
    presets: Sequence[Preset] = DEFAULT_PRESETS,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    lowrank_bpw: Sequence[float] | None = DEFAULT_LOWRANK_BPW,
    percdamp: float = 0.01,
    keep: bool = True,
    progress: bool = True,
    mesh=None,
) -> Measurement:
    """Candidates of every block linear (see the module docstring). `mesh`: capture the
    statistics data-parallel (`calibration` then holds this process's share)."""
    fill_hessian_cache(params, spec, calibration, cache, progress=progress, mesh=mesh)
    tokens = {src: int(np.asarray(t).size) for src, t in calibration.items()}
    kept: dict | None = {} if keep else None
    plans = []
    for index in tqdm(range(len(params["layers"])), desc="AMLQ measure", unit="block", disable=not progress):
        stats = pooled_statistics(cache.load(index), tokens)
        layer = params["layers"][index]
        for module, name in BLOCK_LINEARS:
            dense = layer[module][name]
            plans.append(
                measure_layer(
                    linear_name(index, module, name),
                    np.asarray(dense["weight"], np.float32),
                    stats[LINEAR_INPUT_OF[name]],
                    presets,
                    alpha_grid=alpha_grid,
                    lowrank_bpw=lowrank_bpw,
                    bias=dense.get("bias"),
                    percdamp=percdamp,
                    keep=kept,
                )
            )
    return Measurement(plans=plans, presets=tuple(presets), kept=kept, lowrank=lowrank_bpw is not None)


def allocate_model(measurement: Measurement, target_bpw: float, lowrank: bool) -> list[Candidate]:
    """One candidate per layer with total stored bits <= target_bpw x weights (greedy)."""
    options = measurement.options(lowrank)
    n = measurement.n_weights
    _, high = bpw_range(options, n)
    if target_bpw > high:
        log.warning("target BPW %.3f is above the most the candidates store (%.3f): every layer gets its best", target_bpw, high)
    choice = greedy_allocate(options, target_bpw * n, n)
    return [layer[j] for layer, j in zip(options, choice)]


def build_model(
    params: dict,
    spec: ModelSpec,
    calibration: dict[str, np.ndarray],
    cache: HessianCache,
    measurement: Measurement,
    choices: Sequence[Candidate],
    *,
    percdamp: float = 0.01,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Params with every block linear replaced by its chosen layer, and the per-layer rows."""
    tokens = {src: int(np.asarray(t).size) for src, t in calibration.items()}
    by_name = {plan.name: (plan, choice) for plan, choice in zip(measurement.plans, choices)}
    layers, rows = [], []
    for index in tqdm(range(len(params["layers"])), desc="AMLQ build", unit="block", disable=not progress):
        stats = pooled_statistics(cache.load(index), tokens)
        layer = params["layers"][index]
        new_layer = {key: (dict(value) if isinstance(value, dict) else value) for key, value in layer.items()}
        for module, name in BLOCK_LINEARS:
            full = linear_name(index, module, name)
            plan, choice = by_name[full]
            dense = layer[module][name]
            kept = None if measurement.kept is None else measurement.kept.get((full, choice.label[0]))
            new_layer[module][name] = build_layer(
                np.asarray(dense["weight"], np.float32),
                stats[LINEAR_INPUT_OF[name]],
                plan,
                choice,
                measurement.presets,
                bias=dense.get("bias"),
                percdamp=percdamp,
                kept=kept,
            )
            rows.append(layer_summary(plan, choice, measurement.presets))
        layers.append(new_layer)
    return {**params, "layers": layers}, rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class AmlqOptions:
    target_bpw: float  # average stored bits per block-linear weight, everything counted
    lowrank: bool = True  # AMLQ (with the PCA low-rank term) or AMQ (without)
    presets: tuple[Preset, ...] = DEFAULT_PRESETS  # mixed-precision recipes q_j
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID  # AWQ strengths searched per layer
    lowrank_bpw: tuple[float, ...] = DEFAULT_LOWRANK_BPW  # rank sets as extra BPW per layer (AMLQ only)
    percdamp: float = 0.01  # GPTQ damping, relative to mean(diag H)
    keep_candidates: bool = True  # keep every preset's GPTQ layer in host memory instead of recomputing

    @classmethod
    def from_config(cls, q) -> "AmlqOptions":
        a = q.amlq
        return cls(
            target_bpw=a.target_bpw,
            lowrank=a.lowrank,
            presets=presets_from_config(a.presets),
            alpha_grid=tuple(a.alpha_grid or DEFAULT_ALPHA_GRID),
            lowrank_bpw=tuple(a.lowrank_bpw or DEFAULT_LOWRANK_BPW),
            percdamp=q.percdamp,
            keep_candidates=a.keep_candidates,
        )

    def describe(self) -> str:
        kind = "AMLQ" if self.lowrank else "AMQ, no low-rank term"
        return f"{kind}, target {self.target_bpw} bits per weight"


@dataclasses.dataclass(frozen=True)
class AmlqNote(LayerNote):
    """The candidate AMLQ chose for one layer (report.json keys carry an `amlq_` prefix)."""

    preset: str  # bits mix and group size
    mean_code_bits: float  # the preset's mean code width
    group_size: int
    alpha: float  # AWQ strength
    rank: int | None  # low-rank rank; None = no term (AMQ)
    delta: float  # sensitivity δ of the chosen candidate
    dense_share: float  # share of groups kept in fp16

    def to_json(self) -> dict:
        return {f"amlq_{key}": value for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def report_section(cls, layers: list[dict], summary: dict, folder: Path) -> list[str]:
        from mpq_jax.report import plot_amlq

        plot_amlq(layers, folder)
        lines = [
            "",
            "## AMLQ choices",
            "",
            "![bits and rank per block](amlq_allocation.png)",
            "",
            "![sensitivity per layer](amlq_delta.png)",
            "",
            "| layer | preset (bits mix, group) | α | rank | bits/weight | δ |",
            "|---|---|---:|---:|---:|---:|",
        ]
        return lines + [
            f"| {s['name']} | {s['amlq_preset']} | {s['amlq_alpha']:.2f} | {'-' if s['amlq_rank'] is None else s['amlq_rank']} "
            f"| {s['bits_per_weight']:.3f} | {s['amlq_delta']:.3g} |"
            for s in layers
        ]


def quantize_model(params: dict, options: AmlqOptions, context: WalkContext) -> QuantizedModel:
    """Measure every candidate, allocate under the budget, build (see the module docstring)."""
    measurement = measure_model(
        params,
        context.spec,
        context.calibration,
        context.statistics,
        presets=options.presets,
        alpha_grid=options.alpha_grid,
        lowrank_bpw=options.lowrank_bpw if options.lowrank else None,
        percdamp=options.percdamp,
        keep=options.keep_candidates,
        progress=context.progress,
        mesh=context.mesh,
    )
    choices = allocate_model(measurement, options.target_bpw, options.lowrank)
    quantized, rows = build_model(
        params, context.spec, context.calibration, context.statistics, measurement, choices,
        percdamp=options.percdamp, progress=context.progress,
    )
    fields = [f.name for f in dataclasses.fields(AmlqNote)]
    return QuantizedModel(quantized, {row["name"]: AmlqNote(**{k: row[k] for k in fields}) for row in rows})
