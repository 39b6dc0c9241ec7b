"""Reports of a run: `report.json` (everything), `report.md` (for people), `layer_error.png`.

Each file is written atomically. Not for: computing the numbers (the stages do that).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from mpq_jax.output import atomic_write_text

log = logging.getLogger(__name__)


def markdown_report(report: dict) -> str:
    q = report["config"]["quantization"]
    lines = [
        "# mpq-jax run report",
        "",
        f"- model: `{report['model']}`",
        f"- method: `{report['method']}`"
        + (f" ({q['bits']}-bit, group {q['group_size']}, {'symmetric' if q['symmetric'] else 'asymmetric'})" if report["method"] != "none" else ""),
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
    lines += ["", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in report.get("seconds", {}).items()]
    has_loss = any("gptq_loss" in s for s in report["layers"])
    header = "| layer | shape | bits/weight | ‖W−Ŵ‖/‖W‖ |" + (" GPTQ loss tr(ΔW H ΔWᵀ) |" if has_loss else "")
    lines += ["", "![relative weight error per layer](layer_error.png)", "", header, "|---|---|---:|---:|" + ("---:|" if has_loss else "")]
    lines += [
        f"| {s['name']} | {s['shape'][0]}×{s['shape'][1]} | {s['bits_per_weight']:.3f} | {s['relative_weight_error']:.4f} |"
        + (f" {s['gptq_loss']:.4g} |" if "gptq_loss" in s else (" - |" if has_loss else ""))
        for s in report["layers"]
    ]
    return "\n".join(lines) + "\n"


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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(output_dir: Path, report: dict) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / "report.json", json.dumps(report, indent=2, default=str) + "\n")
    atomic_write_text(output_dir / "report.md", markdown_report(report))
    plot_layer_error(report, output_dir / "layer_error.png")
    log.info("wrote %s", output_dir / "report.md")
