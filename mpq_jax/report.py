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
    return "\n".join(lines) + "\n"


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
