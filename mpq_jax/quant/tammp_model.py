"""TAMMP over a whole model: probe every block linear once per calibration source, allocate
fp16 / 3-bit / 2-bit columns by a strategy, quantize with GPTQ on the pooled Hessian.

1. `probe_model`: the unquantized model's input statistics per source come from the shared
   on-disk cache (`capture.HessianCache`, filled first if needed: one forward pass per
   block), one block at a time so memory stays at one block's statistics. For every linear
   and every source, eq. 4's saliency from that source's Hessian alone (never pooled) and
   Algorithm 1 give the source's critical and non-critical columns (`tammp.probe_columns`).
   With `resamples` R > 1, each source's calibration windows are split into R disjoint
   resamples ("web#0" .. "web#R-1", interleaved windows) captured as sources of their own; a
   source's statistics are then the token-weighted pool of its resamples (the same tokens,
   so the same statistics up to float rounding) and the resamples' own critical columns give
   the intra-source compactness of Appendix A. One capture serves both.
2. `build_model`: per layer, the strategy turns the sources' sets into per-column widths
   (`tammp.strategy1` / `strategy2` / `single_source` / `sorted_classes`), and
   `tammp.quantize_layer` quantizes the layer by GPTQ on the pooled Hessian with each class
   a contiguous run of columns.

One probe serves every strategy (scripts/bench_tammp.py builds several from one).

Not here: per-layer math (mpq_jax.quant.tammp, mpq_jax.quant.saliency), capture, I/O.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mpq_jax.capture import HessianCache, fill_hessian_cache
from mpq_jax.models.decoder import LINEAR_INPUT_OF
from mpq_jax.models.spec import BLOCK_LINEARS, ModelSpec
from mpq_jax.quant import tammp
from mpq_jax.quant.method import LayerNote, QuantizedModel, WalkContext
from mpq_jax.quant.model import linear_name
from mpq_jax.quant.saliency import column_saliency, inverse_hessian_diagonal
from mpq_jax.stats import InputStats, SourceStats, pooled_statistics, token_counts

log = logging.getLogger(__name__)

RESAMPLE_MARK = "#"  # "web#3": resample 3 of source "web"
STRATEGIES = ("strategy1", "strategy2", "smp", "sorted")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TammpOptions:
    strategy: str = "strategy1"  # one of STRATEGIES (see config.TammpConfig)
    sources: tuple[str, ...] | None = None  # sources probed apart; None = every calibration source
    topk: int = 10  # candidate columns per block and list (Algorithm 1)
    block_size: int = 128  # β
    saliency: str = "inverse"  # "inverse" ([H⁻¹]ᵢᵢ, eq. 4) or "cholesky" (BiLLM's factor diagonal)
    thresholds: tuple[int, ...] | None = None  # compactness p values; None = 1..number of sources
    resamples: int = 0  # > 1: intra-source compactness over this many disjoint resamples
    group_size: int = 128  # groups inside the 3-bit and 2-bit runs
    dense_position: str = "last"  # GPTQ processes the fp16 columns last or first
    target_bits: float = 3.0  # sorted: mean code bits
    critical_share: float = 0.01  # sorted: share of fp16 columns
    percdamp: float = 0.01  # damping of H, as GPTQ damps it, for saliency and quantization

    @classmethod
    def from_config(cls, q) -> "TammpOptions":
        t = q.tammp
        return cls(**{f.name: getattr(t, f.name) for f in dataclasses.fields(t)}, percdamp=q.percdamp)

    def describe(self) -> str:
        if self.strategy == "sorted":
            return f"importance-sorted widths, {self.target_bits} code bits, {self.critical_share:.0%} fp16"
        return f"{self.strategy}, topk {self.topk} per {self.block_size} columns, {self.saliency} saliency, g{self.group_size}"


@dataclasses.dataclass
class Probe:
    """What probing found: per source and layer, its ColumnSets; per source and resample,
    the resample's critical columns by layer (empty without resamples)."""

    sources: tuple[str, ...]
    sets: dict[str, dict[str, tammp.ColumnSets]]
    resample_critical: dict[str, dict[str, dict[str, np.ndarray]]]

    def compactness(self, thresholds=None) -> dict:
        """{"inter": compactness across sources, "intra": {source: across its resamples}}."""
        inter_p = thresholds or range(1, len(self.sources) + 1)
        critical = {src: {layer: s.critical for layer, s in by_layer.items()} for src, by_layer in self.sets.items()}
        result = {"inter": tammp.compactness(critical, inter_p) if len(self.sources) > 1 else None, "intra": {}}
        for src, resamples in self.resample_critical.items():
            result["intra"][src] = tammp.compactness(resamples, range(1, len(resamples) + 1))
        return result


def resampled_calibration(calibration: dict[str, np.ndarray], resamples: int, offset: int = 0) -> dict[str, np.ndarray]:
    """Each source's windows [n, T] split into `resamples` disjoint interleaved subsets:
    resample k holds the windows whose index is k modulo `resamples`, counted from `offset`
    (the index of the first window held, when a process holds its share of them: the
    processes' resamples together are then exactly one process's)."""
    short = [src for src, windows in calibration.items() if len(windows) < resamples]
    if short:
        raise ValueError(f"resamples: {resamples} disjoint resamples need at least that many windows per source; {short} have fewer")
    return {
        f"{src}{RESAMPLE_MARK}{k}": windows[(k - offset) % resamples :: resamples]
        for src, windows in calibration.items()
        for k in range(resamples)
    }


def resampled_cache(cache: HessianCache, resamples: int) -> HessianCache:
    """The statistics cache of `resampled_calibration(calibration, resamples)`: the split is a
    function of the calibration, so the calibration's key and R name it."""
    return HessianCache(cache.folder.parent, f"{cache.folder.name}-resamples{resamples}")


def calibration_view(context: WalkContext, options: TammpOptions) -> tuple[dict[str, np.ndarray], HessianCache]:
    """(calibration windows, statistics cache) this run probes and quantizes with."""
    if options.resamples > 1:
        split = resampled_calibration(context.calibration, options.resamples, context.window_offset)
        return split, resampled_cache(context.statistics, options.resamples)
    return context.calibration, context.statistics


def source_of(name: str) -> str:
    return name.split(RESAMPLE_MARK, 1)[0]


def per_source_statistics(raw: SourceStats, tokens: dict[str, int]) -> SourceStats:
    """Statistics per real source: its resamples pooled (a source without resamples as is)."""
    grouped: dict[str, list[str]] = {}
    for name in raw:
        grouped.setdefault(source_of(name), []).append(name)
    return {
        src: raw[names[0]] if names == [src] else pooled_statistics({n: raw[n] for n in names}, {n: tokens[n] for n in names})
        for src, names in grouped.items()
    }


def _probe_weight(weight, stats: InputStats) -> np.ndarray:
    """The layer's weights as probing sees them: float64, dead inputs' columns zeroed (as GPTQ drops them)."""
    w = np.asarray(weight, np.float64).copy()
    w[:, np.diag(stats.hessian) == 0] = 0.0
    return w


def probe_layer(weight, stats: InputStats, options: TammpOptions, inv_diag=None, non_critical: bool = True) -> tammp.ColumnSets:
    """One source's critical (and non-critical) columns of one layer; `inv_diag`: the
    denominator of eq. 4 for these statistics if already computed (q/k/v and gate/up share
    an input)."""
    if inv_diag is None:
        inv_diag = inverse_hessian_diagonal(stats.hessian, options.percdamp, options.saliency)
    return tammp.probe_columns(_probe_weight(weight, stats), inv_diag, options.topk, options.block_size, non_critical)


def probe_model(
    params: dict, spec: ModelSpec, calibration: dict, cache: HessianCache, options: TammpOptions, progress: bool = True, mesh=None
) -> Probe:
    """Every block linear probed per source (and per resample); see the module docstring.
    `mesh`: capture data-parallel (`calibration` then holds this process's share)."""
    fill_hessian_cache(params, spec, calibration, cache, progress=progress, mesh=mesh)
    tokens = token_counts(calibration)
    sources = options.sources or tuple(dict.fromkeys(source_of(name) for name in calibration))
    sets: dict = {src: {} for src in sources}
    resample_critical: dict = {}
    for index in tqdm(range(len(params["layers"])), desc="TAMMP probe", unit="block", disable=not progress):
        raw = cache.load(index)
        by_source = per_source_statistics(raw, tokens)
        inv_diags: dict = {}  # (set, input) -> eq. 4's denominator, one factorisation per input

        def inv_diag(set_name, stats, input_name):
            if (set_name, input_name) not in inv_diags:
                inv_diags[set_name, input_name] = inverse_hessian_diagonal(stats.hessian, options.percdamp, options.saliency)
            return inv_diags[set_name, input_name]

        for module, name in BLOCK_LINEARS:
            full, inp = linear_name(index, module, name), LINEAR_INPUT_OF[name]
            weight = params["layers"][index][module][name]["weight"]
            for src in sources:
                stats = by_source[src][inp]
                sets[src][full] = probe_layer(weight, stats, options, inv_diag(src, stats, inp))
            for pseudo, per_input in raw.items():
                if options.resamples > 1 and RESAMPLE_MARK in pseudo and source_of(pseudo) in sources:
                    stats = per_input[inp]
                    found = probe_layer(weight, stats, options, inv_diag(pseudo, stats, inp), non_critical=False)
                    resample_critical.setdefault(source_of(pseudo), {}).setdefault(pseudo, {})[full] = found.critical
    return Probe(tuple(sources), sets, resample_critical)


def layer_bits(name: str, weight, pooled: InputStats, probe: Probe, options: TammpOptions) -> np.ndarray:
    """Width of every input column of layer `name`, int32 [in], by the configured strategy."""
    n_in = np.asarray(weight).shape[1]
    found = [probe.sets[src][name] for src in probe.sources]
    if options.strategy == "strategy1":
        return tammp.strategy1(found, n_in).column_bits()
    if options.strategy == "strategy2":
        return tammp.strategy2(found, n_in).column_bits()
    if options.strategy == "smp":
        return tammp.single_source(found[0], n_in).column_bits()
    if options.strategy == "sorted":
        inv_diag = inverse_hessian_diagonal(pooled.hessian, options.percdamp, options.saliency)
        score = column_saliency(_probe_weight(weight, pooled), inv_diag)
        return tammp.sorted_classes(score, n_in, options.target_bits, options.critical_share)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {options.strategy!r}")


@dataclasses.dataclass(frozen=True)
class TammpNote(LayerNote):
    """One layer's column widths (report.json keys carry a `tammp_` prefix)."""

    columns: dict[int, int]  # width -> number of input columns (16 = critical, fp16)
    code_bits: float  # mean code width per weight, the paper's count (no scales or zeros)
    loss: float  # GPTQ loss trace((W − Ŵ) H (W − Ŵ)ᵀ) on the pooled Hessian

    @classmethod
    def of(cls, bits: np.ndarray, loss: float) -> "TammpNote":
        widths, counts = np.unique(bits, return_counts=True)
        return cls({int(w): int(c) for w, c in zip(widths, counts)}, float(np.mean(bits)), float(loss))

    def to_json(self) -> dict:
        return {"tammp_columns": {str(k): v for k, v in sorted(self.columns.items(), reverse=True)}, "tammp_code_bits": self.code_bits, "tammp_loss": self.loss}

    @classmethod
    def report_section(cls, layers: list[dict], summary: dict, folder: Path) -> list[str]:
        from mpq_jax.report import tammp_markdown

        return tammp_markdown(layers, summary, folder)


def allocation_summary(layers: list[dict]) -> dict:
    """Table 5 over every block linear: share of weights at each width (fp16 critical,
    3-bit sub-critical, 2-bit non-critical), weighted by the rows they span, and the mean
    code bits. `layers` are report rows (shape, tammp_columns)."""
    weights: dict[int, float] = {}
    for row in layers:
        for width, count in row["tammp_columns"].items():
            weights[int(width)] = weights.get(int(width), 0.0) + count * row["shape"][0]
    total = sum(weights.values())
    shares = {width: count / total for width, count in sorted(weights.items(), reverse=True)}
    return {"shares": {str(w): s for w, s in shares.items()}, "code_bits": sum(w * s for w, s in shares.items())}


def build_model(
    params: dict, spec: ModelSpec, calibration: dict, cache: HessianCache, probe: Probe, options: TammpOptions, progress: bool = True
) -> QuantizedModel:
    """Params with every block linear quantized at its strategy's widths, the per-layer notes
    and the summary (compactness, allocation)."""
    tokens = token_counts(calibration)
    layers, notes = [], {}
    for index in tqdm(range(len(params["layers"])), desc=f"TAMMP {options.strategy}", unit="block", disable=not progress):
        pooled = pooled_statistics(cache.load(index), tokens)
        layer = params["layers"][index]
        new_layer = {key: (dict(value) if isinstance(value, dict) else value) for key, value in layer.items()}
        for module, name in BLOCK_LINEARS:
            full = linear_name(index, module, name)
            dense = layer[module][name]
            stats = pooled[LINEAR_INPUT_OF[name]]
            bits = layer_bits(full, dense["weight"], stats, probe, options)
            result = tammp.quantize_layer(
                np.asarray(dense["weight"], np.float32), stats.hessian, bits, options.group_size,
                dense_position=options.dense_position, percdamp=options.percdamp, bias=dense.get("bias"),
            )
            new_layer[module][name] = result.qlinear
            notes[full] = TammpNote.of(bits, result.loss)
        layers.append(new_layer)
    return QuantizedModel({**params, "layers": layers}, notes, run_summary(probe, options, spec))


def run_summary(probe: Probe, options: TammpOptions, spec: ModelSpec) -> dict:
    """Method-level report entries: sources, compactness, and Figure 3's data for one layer."""
    heatmap_layer = linear_name(int(0.75 * (spec.num_layers - 1)), "self_attn", "o_proj")  # the paper's Figure 3 layer type
    return {
        "strategy": options.strategy,
        "saliency": options.saliency,
        "sources": list(probe.sources),
        "compactness": probe.compactness(options.thresholds),
        "critical_columns": {
            "layer": heatmap_layer,
            "in_features": spec.hidden_size,
            "by_source": {src: probe.sets[src][heatmap_layer].critical.tolist() for src in probe.sources},
        },
    }


def quantize_model(params: dict, options: TammpOptions, context: WalkContext) -> QuantizedModel:
    """Probe, then build (see the module docstring)."""
    calibration, cache = calibration_view(context, options)
    probe = probe_model(params, context.spec, calibration, cache, options, context.progress, context.mesh)
    return build_model(params, context.spec, calibration, cache, probe, options, context.progress)
