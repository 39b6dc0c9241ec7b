"""Reports of a run: `report.json` (everything), `report.md` (for people), `layer_error.png`,
`capabilities.png` (retained fraction per capability dimension, when tasks were run beside
the FP baseline), and the method's own section and figures, written by its LayerNote type
(mpq_jax.quant.method): e.g. AMLQ's `amlq_allocation.png` (bits and rank per block and layer
type, as the paper's Figure 2) and `amlq_delta.png` (sensitivity δ per layer), drawn by
`plot_amlq` here.

Each file is written atomically. Not for: computing the numbers (the stages do that).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from mpq_jax.output import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def markdown_report(report: dict, note_type: type | None = None, folder: Path | None = None) -> str:
    """report.md: the run's summary, evaluation, timings, the per-layer table, then the
    method's own section (`note_type.report_section`, mpq_jax.quant.method.LayerNote),
    which writes its figures into `folder`."""
    detail = f" ({report['method_detail']})" if report.get("method_detail") else ""
    lines = [
        "# mpq-jax run report",
        "",
        f"- model: `{report['model']}`",
        f"- method: `{report['method']}`" + detail,
        f"- bits per weight (block linears, every stored array counted): {report['bits_per_weight']:.4f}",
    ]
    if "perplexity" in report:
        ppl = report["perplexity"]
        lines.append(
            f"- WikiText-2 perplexity: **{ppl['ppl']:.4f}** ({ppl['windows']} windows of {ppl['seq_len']} tokens, "
            f"{ppl['tokens_per_s']:.0f} tokens/s)"
        )
    if "packed_model" in report:
        lines.append(f"- packed model: `{report['packed_model']}`")
    if "eval" in report:
        lines += evaluation_markdown(report["eval"])
    lines += ["", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report.get("seconds", {}).items()]
    lines += ["", "![relative weight error per layer](layer_error.png)", "", "| layer | shape | bits/weight | ‖W−Ŵ‖/‖W‖ |", "|---|---|---:|---:|"]
    lines += [
        f"| {s['name']} | {s['shape'][0]}×{s['shape'][1]} | {s['bits_per_weight']:.3f} | {s['relative_weight_error']:.4f} |"
        for s in report["layers"]
    ]
    if note_type is not None:
        lines += note_type.report_section(report["layers"], report.get(report["method"], {}), folder)
    if "qat" in report:
        lines += qat_markdown(report["qat"], folder)
    return "\n".join(lines) + "\n"


def qat_markdown(qat: dict, folder: Path | None) -> list[str]:
    """The QAT section: what each stage trained, its loss at the start and end, its time,
    and `qat_losses.png` (the loss curves)."""
    lines = [
        "",
        "## Quantization-aware training",
        "",
        f"{qat['seq_len']}-token windows, {qat['dtype']}; bits per weight {qat['bits_per_weight_after_ptq']:.4f} before and after "
        "(training moves values, not widths).",
        "",
        "| stage | windows | trained parameters | loss, first steps | loss, last steps | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage in ("block", "e2e"):
        if stage not in qat:
            continue
        note = qat[stage]
        first, last = _curve_ends(note["losses"])
        label = "1: block-wise (MSE to the FP block, mean over blocks)" if stage == "block" else "2: end-to-end (next-token NLL)"
        lines.append(
            f"| {label} | {qat['samples'][stage]} | {note['trained_parameters']:,} | {_number(first)} | {_number(last)} | {note['seconds']:.0f} |"
        )
    if folder is not None:
        plot_qat_losses(qat, Path(folder) / "qat_losses.png")
        lines += ["", "![QAT loss curves](qat_losses.png)"]
    return lines


def _curve_ends(curves: dict[str, list[float]]) -> tuple[float, float]:
    """Mean over curves of the mean of each curve's first and last tenth (at least one step)."""
    firsts, lasts = [], []
    for curve in curves.values():
        if curve:
            k = max(1, len(curve) // 10)
            firsts.append(sum(curve[:k]) / k)
            lasts.append(sum(curve[-k:]) / k)
    if not firsts:
        return float("nan"), float("nan")
    return sum(firsts) / len(firsts), sum(lasts) / len(lasts)


def plot_qat_losses(qat: dict, path: Path) -> None:
    """Stage 1: each block's loss relative to its first step (one line per block, log
    scale); stage 2: the loss of each pass and its running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = [stage for stage in ("block", "e2e") if stage in qat]
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        curves = qat[stage]["losses"]
        if stage == "block":
            colors = plt.cm.viridis(np.linspace(0, 1, max(len(curves), 1)))
            for color, (name, curve) in zip(colors, curves.items()):
                if curve and curve[0] > 0:
                    ax.plot(np.asarray(curve) / curve[0], color=color, linewidth=0.8)
            ax.set_yscale("log")
            ax.set_ylabel("block MSE / first step's")
            ax.set_title(f"stage 1: {len(curves)} blocks (dark = first)")
        else:
            curve = np.asarray(curves["e2e"])
            ax.plot(curve, linewidth=0.6, alpha=0.5, label="per pass")
            k = max(1, len(curve) // 20)
            if len(curve) >= k:
                ax.plot(np.arange(k - 1, len(curve)), np.convolve(curve, np.ones(k) / k, mode="valid"), label=f"mean of {k}")
            ax.set_ylabel("next-token NLL")
            ax.set_title("stage 2: end-to-end")
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _missing(row: dict) -> str:
    """Why a capability dimension has no score: no local task exists, or none was run."""
    from mpq_jax.eval.downstream import CAPABILITIES

    return "not run" if CAPABILITIES.get(row["dimension"]) else "no local task"


def evaluation_markdown(evaluation: dict) -> list[str]:
    """The evaluation sections: perplexity per set, capability dimensions, tasks; FP beside
    the model with the retained fraction (quantized / FP) or the perplexity ratio."""
    lines: list[str] = []
    if evaluation["perplexity"]:
        lines += ["", "## Perplexity", "", "| text | FP | this model | ratio |", "|---|---:|---:|---:|"]
        lines += [
            f"| {row['set']} | {_number(row['fp'])} | {_number(row['quantized'])} | {_number(row['ratio'], 3)} |"
            for row in evaluation["perplexity"]
        ]
    if evaluation["tasks"]:
        lines += [
            "",
            "## Capabilities (lm-eval tasks, TAMMP's five dimensions)",
            "",
            *(["![retained fraction per capability](capabilities.png)", ""] if evaluation["fp"] is not None else []),
            "| dimension | tasks | FP | this model | retained |",
            "|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {row['dimension']} | {', '.join(row['tasks']) or _missing(row)} | {_number(row['fp'])} "
            f"| {_number(row['quantized'])} | {_number(row['retained'], 3)} |"
            for row in evaluation["capabilities"]
        ]
        lines += ["", "| task | dimension | metric | documents | FP | this model | retained |", "|---|---|---|---:|---:|---:|---:|"]
        lines += [
            f"| {row['task']} | {row['dimension']} | {row['metric']} | {row['samples']} | {_number(row['fp'])} "
            f"| {_number(row['quantized'])} | {_number(row['retained'], 3)} |"
            for row in evaluation["tasks"]
        ]
    return lines


def plot_capabilities(rows: list[dict], path: Path, title: str) -> None:
    """Bars of the retained fraction (quantized / FP) per capability dimension; a dimension
    without a local task or an FP score is labelled instead of drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = [row["dimension"] for row in rows]
    values = [row["retained"] or 0.0 for row in rows]
    bars = ax.bar(range(len(rows)), values, color="tab:blue")
    for bar, row in zip(bars, rows):
        label = f"{row['retained']:.2f}" if row["retained"] is not None else (_missing(row) if not row["tasks"] else "n/a")
        ax.text(bar.get_x() + bar.get_width() / 2, max(bar.get_height(), 0.02) + 0.02, label, ha="center", fontsize=8)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)), names, rotation=15, fontsize=8)
    ax.set_ylabel("retained fraction (quantized / FP)")
    ax.set_ylim(0, max([1.15] + [v + 0.15 for v in values]))
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_layer_error(report: dict, path: Path) -> None:
    """Relative weight error of each linear type across depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for s in report["layers"]:
        _, index, _, name = s["name"].split(".")
        series[name].append((int(index), s["relative_weight_error"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("‖W − Ŵ‖ / ‖W‖")
    ax.set_title(f"{report['method']}: relative weight error per linear")
    ax.legend(ncol=4, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure atomically (see mpq_jax.output.atomic_path) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            # The temp name ends in .tmp, so the format comes from the target's suffix.
            fig.savefig(tmp, dpi=120, format=Path(path).suffix.lstrip(".") or None)
    finally:
        plt.close(fig)


def plot_amlq(layers: list[dict], folder: Path) -> None:
    """amlq_allocation.png (mean code bits and rank per block, one line per layer type) and
    amlq_delta.png (δ of the chosen candidate per layer, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict]] = defaultdict(list)
    for row in layers:
        _, index, _, name = row["name"].split(".")
        series[name].append({**row, "block": int(index)})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for name, rows in series.items():
        blocks = [r["block"] for r in rows]
        top.plot(blocks, [r["bits_per_weight"] for r in rows], marker="o", markersize=3, label=name)
        bottom.plot(blocks, [r["amlq_rank"] or 0 for r in rows], marker="o", markersize=3, label=name)
    top.set_ylabel("stored bits per weight")
    bottom.set_ylabel("low-rank rank")
    bottom.set_xlabel("decoder block")
    top.set_title("AMLQ allocation per block and layer type")
    top.legend(ncol=4, fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, folder / "amlq_allocation.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    ax.semilogy(range(len(layers)), [max(r["amlq_delta"], 1e-12) for r in layers], marker=".", linestyle="none")
    ax.set_xlabel("layer (7 linears per block, in block order)")
    ax.set_ylabel("δ = ‖WX − Ŷ‖² / ‖WX‖²")
    ax.set_title("sensitivity of each layer's chosen candidate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, folder / "amlq_delta.png")


def write_report(output_dir: Path, report: dict, note_type: type | None = None) -> None:
    """Every report file of a run; `note_type` is the method's LayerNote class (its section)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(output_dir / "report.md", markdown_report(report, note_type, output_dir))
    plot_layer_error(report, output_dir / "layer_error.png")
    capabilities = report.get("eval", {}).get("capabilities")
    if capabilities and report["eval"]["fp"] is not None:
        plot_capabilities(capabilities, output_dir / "capabilities.png", f"{report['method']}: capabilities retained")
    log.info("wrote %s", output_dir / "report.md")


def tammp_markdown(layers: list[dict], summary: dict, folder: Path) -> list[str]:
    """TAMMP's section: the Table-5-like allocation, compactness, per-layer widths, and
    `tammp_compactness.png` (Figure 4) and `tammp_critical_columns.png` (Figure 3)."""
    from mpq_jax.quant.tammp_model import allocation_summary

    allocation = allocation_summary(layers)
    weights = sum(row["shape"][0] * row["shape"][1] for row in layers)
    exact = sum(row["bits_per_weight"] * row["shape"][0] * row["shape"][1] for row in layers) / weights
    names = {"16": "critical (fp16)", "4": "4-bit", "3": "sub-critical (3-bit)", "2": "non-critical (2-bit)"}
    widths = list(allocation["shares"])
    lines = [
        "",
        f"## TAMMP allocation ({summary['strategy']}, sources {', '.join(summary['sources'])}, {summary['saliency']} saliency)",
        "",
        "| " + " | ".join(names.get(w, f"{w}-bit") for w in widths) + " | bits (codes only, as the paper counts) | bits (exact, every stored bit) |",
        "|" + "---:|" * (len(widths) + 2),
        "| " + " | ".join(f"{allocation['shares'][w]:.3f}" for w in widths) + f" | {allocation['code_bits']:.3f} | {exact:.3f} |",
    ]
    compact = summary.get("compactness") or {}
    if compact.get("inter") or compact.get("intra"):
        plot_compactness(compact, folder / "tammp_compactness.png")
        lines += ["", "### Compactness of critical columns (consensus Jaccard, Appendix A)", "", "![compactness](tammp_compactness.png)", ""]
        rows = ([("inter-source", compact["inter"])] if compact.get("inter") else []) + [
            (f"intra {src}", value) for src, value in compact.get("intra", {}).items()
        ]
        thresholds = sorted({int(p) for _, value in rows for p in value["overall"]})
        lines += ["| sets | " + " | ".join(f"p={p}" for p in thresholds) + " |", "|---|" + "---:|" * len(thresholds)]
        for label, value in rows:
            overall = {int(p): j for p, j in value["overall"].items()}
            lines.append(f"| {label} | " + " | ".join(_number(overall.get(p), 3) for p in thresholds) + " |")
        if compact.get("inter"):
            lines += ["", "| layer type (inter-source) | " + " | ".join(f"p={p}" for p in thresholds) + " |", "|---|" + "---:|" * len(thresholds)]
            for kind, value in compact["inter"]["by_type"].items():
                by_p = {int(p): j for p, j in value.items()}
                lines.append(f"| {kind} | " + " | ".join(_number(by_p.get(p), 3) for p in thresholds) + " |")
    heat = summary.get("critical_columns")
    if heat and len(heat["by_source"]) > 0:
        plot_critical_columns(heat, folder / "tammp_critical_columns.png")
        lines += ["", f"![critical columns of {heat['layer']} by source](tammp_critical_columns.png)"]
    lines += ["", "| layer | columns per width | code bits | bits/weight | GPTQ loss |", "|---|---|---:|---:|---:|"]
    lines += [
        f"| {row['name']} | {', '.join(f'{w}b: {n}' for w, n in row['tammp_columns'].items())} | {row['tammp_code_bits']:.3f} "
        f"| {row['bits_per_weight']:.3f} | {row['tammp_loss']:.4g} |"
        for row in layers
    ]
    return lines


def plot_compactness(compact: dict, path: Path) -> None:
    """Figure 4: compactness J̄_core against the threshold p, inter-source against each
    source's resamples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if compact.get("inter"):
        points = sorted((int(p), j) for p, j in compact["inter"]["overall"].items())
        ax.plot([p for p, _ in points], [j for _, j in points], marker="o", linewidth=2.5, color="black", label="multi-source (inter)")
    for src, value in compact.get("intra", {}).items():
        points = sorted((int(p), j) for p, j in value["overall"].items())
        ax.plot([p for p, _ in points], [j for _, j in points], marker=".", linestyle="--", label=f"{src} (intra)")
    ax.set_xlabel("p (sets a column must be critical in to join the consensus)")
    ax.set_ylabel("compactness J̄_core")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("critical-column compactness")
    fig.tight_layout()
    save_figure(fig, path)


def plot_critical_columns(heat: dict, path: Path) -> None:
    """Figure 3: which input columns of one layer each source finds critical."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sources = list(heat["by_source"])
    grid = np.zeros((len(sources), heat["in_features"]))
    for row, src in enumerate(sources):
        grid[row, heat["by_source"][src]] = 1
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(sources)))
    ax.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_yticks(range(len(sources)), sources)
    ax.set_xlabel("input column")
    ax.set_title(f"critical columns of {heat['layer']} by calibration source")
    fig.tight_layout()
    save_figure(fig, path)
