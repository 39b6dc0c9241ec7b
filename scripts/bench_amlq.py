"""AMQ and AMLQ across bit budgets against uniform GPTQ, side by side, on the default model.

    python scripts/bench_amlq.py [--json PATH] [--windows K] [--targets 2.3,2.5,...]
                                 [--calib-samples 64] [--calib-seq-len 512]
                                 [--presets default|small] [--alpha-points 20]

One run: the unquantized model's input statistics are captured once (into a fresh folder,
so the capture is timed), one AMLQ measuring pass measures every candidate of every layer
(AMQ's and AMLQ's), and every budget is then only an allocation and a build. Rows:

  fp     the model as loaded
  gptq   uniform GPTQ 2/3/4-bit g128 (act-order, static groups, the same statistics)
  amq    AMLQ without the low-rank term, at each target BPW (default 2.3 to 4.3 by 0.2)
  amlq   AMLQ, at each target BPW

Calibration and evaluation windows are the GPTQ bench's (scripts/bench_ptq.py): 64 x 512
Wikipedia calibration tokens; the first K WikiText-2 test windows of 2048 tokens.
`seconds` is the wall time of a whole run of that method from the model and the
calibration tokens, evaluation excluded: capture + GPTQ for gptq rows; capture +
measuring pass + allocation + build for amq/amlq rows (what one `method: amlq` run costs;
the bench itself pays capture and measurement once). JSON rows carry `method`,
`target_bpw` (null for fp/gptq), `bpw`, `ppl`, `seconds` and the parts; a PNG of PPL
against BPW is written beside the JSON, and the issue's targets are checked at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mpq_jax.capture import HessianCache, fill_hessian_cache
from mpq_jax.data.calibration import calibration_tokens, default_sources
from mpq_jax.eval.perplexity import make_windows, perplexity, wikitext2_tokens
from mpq_jax.models.checkpoint import DEFAULT_MODEL, load_model
from mpq_jax.output import atomic_write_text
from mpq_jax.quant.amlq import DEFAULT_PRESETS, Preset
from mpq_jax.quant.amlq_model import allocate_model, build_model, measure_model
from mpq_jax.quant.gptq_model import GptqOptions, quantize_model
from mpq_jax.quant.method import WalkContext
from mpq_jax.quant.model import average_bits_per_weight, linear_stats
from mpq_jax.report import save_figure

DEFAULT_TARGETS = tuple(round(2.3 + 0.2 * i, 1) for i in range(11))  # 2.3 ... 4.3
SMALL_PRESETS = (Preset(128, ((2, 1.0),)), Preset(128, ((3, 1.0),)), Preset(128, ((4, 1.0),)))  # quick runs, tests


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"amq": ("o-", "AMQ (no low-rank)"), "amlq": ("s-", "AMLQ"), "gptq": ("^", "GPTQ g128 (uniform)")}
    for method, (style, label) in styles.items():
        pts = sorted((r["bpw"], r["ppl"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=5)
    fp = [r for r in rows if r["method"] == "fp"]
    if fp:
        ax.axhline(fp[0]["ppl"], color="k", linestyle="--", label="FP (as loaded)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (block linears, everything stored)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets, each as a line saying met / NOT met with the numbers."""
    lines = []
    by = {(r["method"], r["target_bpw"]): r for r in rows}
    targets = sorted(t for m, t in by if m == "amlq" and (("amq", t) in by))
    if targets:
        worse = [t for t in targets if by[("amlq", t)]["ppl"] > by[("amq", t)]["ppl"]]
        lines.append(f"AMLQ <= AMQ at every budget: {'met' if not worse else 'NOT met at ' + ', '.join(map(str, worse))}")
        gains = [by[("amq", t)]["ppl"] - by[("amlq", t)]["ppl"] for t in targets]
        falling = all(a >= b for a, b in zip(gains, gains[1:]))
        lines.append(
            "AMLQ gain (AMQ ppl - AMLQ ppl) grows as BPW falls: "
            + ("met" if falling else "NOT met")
            + " (" + ", ".join(f"{t}: {g:.3f}" for t, g in zip(targets, gains)) + ")"
        )
    fp = next((r for r in rows if r["method"] == "fp"), None)
    gptq3 = next((r for r in rows if r["method"] == "gptq" and r["bits"] == 3), None)
    if fp and gptq3 and targets:
        t = min(targets, key=lambda t: abs(t - 3.3))
        ratio = (by[("amlq", t)]["ppl"] - fp["ppl"]) / (gptq3["ppl"] - fp["ppl"])
        lines.append(f"AMLQ@{t} PPL increase over FP / GPTQ 3-bit g128's <= 0.6: {'met' if ratio <= 0.6 else 'NOT met'} ({ratio:.3f})")
    gptq_seconds = [r["seconds"] for r in rows if r["method"] == "gptq"]
    amlq_seconds = [r["seconds"] for r in rows if r["method"] == "amlq"]
    if gptq_seconds and amlq_seconds:
        ratio = max(amlq_seconds) / np.mean(gptq_seconds)
        lines.append(f"AMLQ run <= 3x GPTQ run wall time: {'met' if ratio <= 3 else 'NOT met'} ({ratio:.2f}x)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--windows", type=int, default=8, help="first K windows (0 = whole text)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", default="runs/bench_amlq.json")
    parser.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)), help="comma-separated target BPWs")
    parser.add_argument("--gptq-bits", default="2,3,4", help="uniform GPTQ g128 reference rows")
    parser.add_argument("--calib-sources", default="wikipedia")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--presets", choices=("default", "small"), default="default")
    parser.add_argument("--alpha-points", type=int, default=20, help="α grid: this many points in [0, 0.95]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    model = load_model(args.model)
    windows = make_windows(wikitext2_tokens(model.tokenizer), args.seq_len, args.windows)
    sources = default_sources(args.calib_sources.split(","))
    calibration = calibration_tokens(model.tokenizer, sources, args.calib_samples, args.calib_seq_len)
    presets = DEFAULT_PRESETS if args.presets == "default" else SMALL_PRESETS
    alpha_grid = tuple(np.round(np.linspace(0.0, 0.95, args.alpha_points), 4)) if args.alpha_points > 1 else (0.0,)
    print(f"model: {model.source}; {len(windows)} windows of {args.seq_len} tokens; "
          f"calibration {args.calib_sources} {args.calib_samples} x {args.calib_seq_len}; "
          f"{len(presets)} presets, {len(alpha_grid)} alphas")

    rows: list[dict] = []
    header = f"{'method':<7}{'target':>8}{'bpw':>8}{'ppl':>14}{'seconds':>9}"
    with tempfile.TemporaryDirectory(prefix="bench_amlq_stats_") as folder:
        cache = HessianCache(folder, "calibration")
        start = time.perf_counter()
        fill_hessian_cache(model.params, model.spec, calibration, cache)
        capture_s = time.perf_counter() - start
        start = time.perf_counter()
        measurement = measure_model(model.params, model.spec, calibration, cache, presets=presets, alpha_grid=alpha_grid)
        measure_s = time.perf_counter() - start
        print(f"capture {capture_s:.1f} s, measuring pass {measure_s:.1f} s "
              f"({sum(len(p.candidates) for p in measurement.plans)} candidates over {len(measurement.plans)} layers)")
        print(header)

        def add(method, params, target, seconds, **parts):
            bpw = average_bits_per_weight(linear_stats(model.params, params)) if method != "fp" else 32.0
            ppl = perplexity(params, model.spec, windows, progress=False).ppl
            rows.append({"method": method, "target_bpw": target, "bpw": bpw, "ppl": ppl, "seconds": seconds,
                         "windows": len(windows), "seq_len": args.seq_len, **parts})
            print(f"{method:<7}{'-' if target is None else target:>8}{bpw:>8.3f}{ppl:>14.4f}{seconds:>9.1f}", flush=True)

        add("fp", model.params, None, 0.0)
        for bits in [int(b) for b in args.gptq_bits.split(",") if b]:
            start = time.perf_counter()
            context = WalkContext(spec=model.spec, calibration=calibration, statistics=cache)
            params = quantize_model(model.params, GptqOptions(bits=bits, group_size=128, propagate_quantized=False), context).params
            gptq_s = time.perf_counter() - start
            add("gptq", params, None, capture_s + gptq_s, bits=bits, capture_seconds=capture_s, method_seconds=gptq_s)
        for target in [float(t) for t in args.targets.split(",")]:
            for method, lowrank in (("amq", False), ("amlq", True)):
                start = time.perf_counter()
                choices = allocate_model(measurement, target, lowrank)
                params, _ = build_model(model.params, model.spec, calibration, cache, measurement, choices, progress=False)
                build_s = time.perf_counter() - start
                add(method, params, target, capture_s + measure_s + build_s,
                    capture_seconds=capture_s, measure_seconds=measure_s, method_seconds=build_s)

    for line in check_targets(rows):
        print(line)
    json_path = Path(args.json)
    atomic_write_text(json_path, json.dumps(rows, indent=2) + "\n")
    plot(rows, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
