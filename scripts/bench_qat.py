"""QAT after PTQ on the default model: GPTQ 2-bit and 3-bit g64, TAMMP Strategy 1 and 2,
each after PTQ, after stage 1 (block-wise) and after stage 2 (end-to-end), side by side.

    python scripts/bench_qat.py [--json PATH] [--methods gptq-2bit-g64,strategy2,...]
                                [--windows 4] [--heldout-windows 1] [--block-samples 64]
                                [--e2e-samples 128] [--train-seq-len 256] [--fresh]

One shared capture: the five calibration sources, 40 windows of 512 tokens each, split into 5
resamples exactly as scripts/bench_tammp.py does, so the statistics cache it filled serves
here with no forward pass (TAMMP probes without the resamples: only the five sources' own
critical columns are needed). Training windows: `--block-samples` / `--e2e-samples` windows
of `--train-seq-len` tokens taken in turn from the five sources' calib splits (the pipeline's
`training_tokens`), far fewer than the paper's 4096 and 50,000 windows of 2048 tokens, so that
a method's two stages take minutes on 2 CPU cores; learning rates are raised to match (see
QAT_SETTINGS, measured on three blocks by a pilot). Stage 2 uses an effective batch of 16
windows (8 optimizer steps over 128 windows), not the paper's 32 (which would leave 4 steps).

Every row: exact BPW (every stored bit), WikiText-2 test PPL on the first K windows of 2048
tokens, the PPL of the first K' windows of each source's heldout.jsonl and their mean, and the
wall seconds of that stage. JSON (rewritten after every row; a run started again skips the
rows it holds and reloads the packed models it saved under --work):

    {"fp": {"ppl", "heldout", "heldout_mean"}, "settings": {...},
     "rows": [{"method", "stage" (ptq | block | e2e), "bpw", "ppl", "heldout": {source: ppl},
               "heldout_mean", "seconds"}]}

A PNG of PPL per stage is written beside the JSON, and the issue's targets are checked at
the end. No PyTorch peer is run (see the README's QAT section).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path


from bench_tammp import Scorer
from mpq_jax.capture import HessianCache
from mpq_jax.config import CalibrationConfig, QatBlockConfig, QatConfig, QatE2eConfig, RunConfig
from mpq_jax.data.calibration import DEFAULT_SOURCE_NAMES, calibration_tokens, default_sources
from mpq_jax.data.paths import cache_dir
from mpq_jax.fingerprint import calibration_fingerprint, fingerprint, model_identity
from mpq_jax.models.checkpoint import DEFAULT_MODEL, load_model
from mpq_jax.output import atomic_write_text
from mpq_jax.packed.io import MANIFEST_FILE, load_quantized, save_quantized
from mpq_jax.pipeline import training_tokens
from mpq_jax.qat.stages import block_stage, e2e_stage
from mpq_jax.quant import gptq_model, tammp_model
from mpq_jax.quant.method import WalkContext
from mpq_jax.quant.model import average_bits_per_weight, linear_stats
from mpq_jax.report import save_figure

METHODS = ("gptq-2bit-g64", "strategy2", "gptq-3bit-g64", "strategy1")
STAGES = ("ptq", "block", "e2e")


def qat_settings(args) -> QatConfig:
    return QatConfig(
        enabled=True,
        seq_len=args.train_seq_len,
        checkpoint_every=8,
        block=QatBlockConfig(samples=args.block_samples, epochs=2, batch_size=2, lr_weight=args.lr_weight, lr_quant=args.lr_quant),
        e2e=QatE2eConfig(samples=args.e2e_samples, epochs=1, batch_size=2, effective_batch=16, lr=args.lr_e2e, lr_weight=args.lr_e2e, warmup=0.1),
    )


def plot(fp: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in zip(axes, ("ppl", "heldout_mean"), ("WikiText-2 PPL", "mean heldout PPL (5 sources)")):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [(STAGES.index(r["stage"]), r[key]) for r in rows if r["method"] == method]
            bpw = next(r["bpw"] for r in rows if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{method} ({bpw:.2f} BPW)")
        ax.axhline(fp[key], color="k", linestyle="--", label="FP")
        ax.set_xticks(range(len(STAGES)), ["after PTQ", "after stage 1", "after stage 2"])
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("QAT on SmolLM2-135M: perplexity after each stage")
    fig.tight_layout()
    save_figure(fig, path)


def check_targets(fp: dict, rows: list[dict]) -> list[str]:
    by = {(r["method"], r["stage"]): r for r in rows}
    lines = []
    for method in dict.fromkeys(r["method"] for r in rows):
        stages = [by[(method, s)] for s in STAGES if (method, s) in by]
        pairs = list(zip(stages, stages[1:]))
        if pairs:
            ok = all(b["heldout_mean"] < a["heldout_mean"] for a, b in pairs)
            lines.append(f"{method}: each stage lowers the mean heldout PPL: {'held' if ok else 'did NOT hold'} ("
                         + " -> ".join(f"{s['heldout_mean']:.2f}" for s in stages) + ")")
    g2 = by.get(("gptq-2bit-g64", "e2e"))
    if g2:
        ok = g2["ppl"] <= 3 * fp["ppl"]
        lines.append(f"GPTQ 2-bit g64 after QAT at most 3x FP PPL: {'held' if ok else 'did NOT hold'} "
                     f"({g2['ppl']:.2f} vs 3 x {fp['ppl']:.2f} = {3 * fp['ppl']:.2f})")
    s2, g3 = by.get(("strategy2", "e2e")), by.get(("gptq-3bit-g64", "ptq"))
    if s2 and g3:
        ok = s2["bpw"] < g3["bpw"] and s2["ppl"] < g3["ppl"]
        lines.append(f"Strategy 2 after QAT, at fewer exact BPW, beats GPTQ 3-bit g64: {'held' if ok else 'did NOT hold'} "
                     f"({s2['ppl']:.2f} at {s2['bpw']:.3f} BPW vs {g3['ppl']:.2f} at {g3['bpw']:.3f})")
    s1, s1_ptq = by.get(("strategy1", "e2e")), by.get(("strategy1", "ptq"))
    if s1 and s1_ptq:
        closed = (s1_ptq["ppl"] - s1["ppl"]) / (s1_ptq["ppl"] - fp["ppl"])
        lines.append(f"Strategy 1 closes at least half of its PTQ gap to FP: {'held' if closed >= 0.5 else 'did NOT hold'} "
                     f"(PPL {s1_ptq['ppl']:.1f} -> {s1['ppl']:.2f}, FP {fp['ppl']:.2f}: {100 * closed:.1f}% closed)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json", default="runs/bench_qat.json")
    parser.add_argument("--work", default="runs/bench_qat", help="packed models per method and stage, and training checkpoints")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--windows", type=int, default=4, help="first K WikiText-2 test windows")
    parser.add_argument("--heldout-windows", type=int, default=1, help="first K windows of each heldout.jsonl")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-samples", type=int, default=40, help="calibration windows per source (as bench_tammp)")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--resamples", type=int, default=5, help="the split bench_tammp captured (reuses its cache)")
    parser.add_argument("--block-samples", type=int, default=64)
    parser.add_argument("--e2e-samples", type=int, default=128)
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--lr-weight", type=float, default=1e-4)
    parser.add_argument("--lr-quant", type=float, default=1e-3)
    parser.add_argument("--lr-e2e", type=float, default=1e-4)
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in --json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    json_path, work = Path(args.json), Path(args.work)
    done = {} if args.fresh or not json_path.is_file() else json.loads(json_path.read_text())
    rows = list(done.get("rows", []))
    qat = qat_settings(args)

    model = load_model(args.model)
    scorer = Scorer(model, args.windows, args.heldout_windows, args.seq_len)
    calibration = calibration_tokens(model.tokenizer, default_sources(DEFAULT_SOURCE_NAMES), args.calib_samples, args.calib_seq_len)
    identity = model_identity(model.source, "float32")
    plain_cache = HessianCache(cache_dir() / "hessians", calibration_fingerprint(identity, calibration))
    split = tammp_model.resampled_calibration(calibration, args.resamples)
    cache = tammp_model.resampled_cache(plain_cache, args.resamples)
    context = WalkContext(spec=model.spec, calibration=split, statistics=cache)
    tokens = training_tokens(model.tokenizer, RunConfig(qat=qat, calibration=CalibrationConfig(sources=DEFAULT_SOURCE_NAMES)))
    settings = {"qat": dataclasses.asdict(qat), "windows": args.windows, "heldout_windows": args.heldout_windows, "seq_len": args.seq_len}
    print(f"model: {model.source}; WikiText-2 {len(scorer.sets['wikitext2'])} x {args.seq_len}, heldout {args.heldout_windows} x "
          f"{args.seq_len} per source; training windows {tokens.shape[0]} x {tokens.shape[1]} (stage 1: {qat.block.samples}, "
          f"stage 2: {qat.e2e.samples})", flush=True)

    def save(fp) -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps({"fp": fp, "settings": settings, "rows": rows}, indent=2) + "\n")

    fp = done.get("fp") or scorer(model.params)
    save(fp)
    header = f"{'method':<16}{'stage':<7}{'bpw':>7}{'wt2 ppl':>11}{'heldout':>10}  " + " ".join(f"{s:>9}" for s in DEFAULT_SOURCE_NAMES) + f"{'s':>8}"
    print(header)
    print(f"{'fp':<16}{'':<7}{32.0:>7.3f}{fp['ppl']:>11.3f}{fp['heldout_mean']:>10.3f}  " + " ".join(f"{fp['heldout'][s]:>9.3f}" for s in DEFAULT_SOURCE_NAMES))

    probe = None

    def key(method: str) -> str:  # training checkpoints are valid for these settings only
        return fingerprint({"method": method, "settings": settings}, {"tokens": tokens})

    def ptq(method: str) -> dict:
        nonlocal probe
        if method.startswith("gptq"):
            bits = int(method.split("-")[1][0])
            return gptq_model.quantize_model(model.params, gptq_model.GptqOptions(bits=bits, group_size=64, propagate_quantized=False), context).params
        options = tammp_model.TammpOptions(strategy=method)
        if probe is None:
            probe = tammp_model.probe_model(model.params, model.spec, split, cache, options)
        return tammp_model.build_model(model.params, model.spec, split, cache, probe, options).params

    for method in [m for m in args.methods.split(",") if m]:
        params = None
        for stage in STAGES:
            folder = work / method / stage
            row = next((r for r in rows if r["method"] == method and r["stage"] == stage), None)
            if row is None or not (folder / MANIFEST_FILE).is_file():
                if params is None and stage != "ptq":
                    params, _ = load_quantized(work / method / STAGES[STAGES.index(stage) - 1])
                start = time.perf_counter()
                if stage == "ptq":
                    params = ptq(method)
                elif stage == "block":
                    params, _ = block_stage(model.params, params, model.spec, tokens, qat, work / method / "checkpoints", key(method))
                else:
                    params, _ = e2e_stage(params, model.spec, tokens, qat, work / method / "checkpoints", key(method))
                seconds = time.perf_counter() - start
                save_quantized(folder, params, {"method": method, "stage": stage})
                if row is None:
                    row = {"method": method, "stage": stage, "bpw": average_bits_per_weight(linear_stats(model.params, params)),
                           **scorer(params), "seconds": seconds}
                    rows.append(row)
                    save(fp)
            else:
                params = None  # loaded from its folder only if a later stage still has to run
            print(f"{method:<16}{stage:<7}{row['bpw']:>7.3f}{row['ppl']:>11.3f}{row['heldout_mean']:>10.3f}  "
                  + " ".join(f"{row['heldout'][s]:>9.3f}" for s in DEFAULT_SOURCE_NAMES) + f"{row['seconds']:>8.1f}", flush=True)

    print()
    for line in check_targets(fp, rows):
        print(line)
    plot(fp, rows, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
