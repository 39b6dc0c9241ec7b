"""TAMMP's strategies against uniform GPTQ, AMQ and AMLQ, side by side, on the default model.

    python scripts/bench_tammp.py [--json PATH] [--windows K] [--heldout-windows K]
                                  [--calib-samples 40] [--calib-seq-len 512] [--resamples 5]
                                  [--sorted 2.5,3,3.5] [--alpha-points 10] [--ablations strategy2] [--fresh]

One run, one shared capture: the five calibration sources (web, wikipedia, code, qa, arxiv),
each split into `--resamples` disjoint resamples, are captured once as 25 sources of their
own (mpq_jax.quant.tammp_model: a source's statistics are the pool of its resamples, and the
pool of all 25 is the whole calibration's). One TAMMP probe (eq. 4 saliency, per source and
per resample) serves every TAMMP row and the compactness table; a second probe with BiLLM's
Cholesky-factor saliency serves the saliency ablation; one AMLQ measuring pass serves the
AMQ/AMLQ rows. Rows (JSON `method`):

  fp                   the model as loaded
  strategy1/strategy2  TAMMP on all five sources (fp16 / 3-bit / 2-bit, GPTQ g128 inside classes)
  smp-<source>         single-source TAMMP for web, wikipedia, code
  sorted-<bits>        Figure 5's importance-sorted widths at that mean code width
  gptq-<b>bit-g<g>     uniform GPTQ 2/3-bit, g128 and g64 (act-order, static groups)
  amq-<bpw>/amlq-<bpw> AMQ and AMLQ at the exact BPW of Strategy 1 and of Strategy 2

and, under `ablations`, Strategy 2 (`--ablations`) with the Cholesky-factor saliency and
with the fp16 columns processed first by GPTQ. Every row: exact BPW (every stored bit), code-only BPW (as
the paper counts: codes alone), WikiText-2 test PPL on the first K windows of 2048 tokens,
the PPL of the first K' windows of each source's heldout.jsonl and their mean, and the
seconds the method took. The JSON is rewritten after every row and a run started again
skips the rows it holds (the capture is in $MPQ_CACHE_DIR; `--fresh` ignores both). A PNG
of PPL against exact BPW with every row is written beside the JSON, and the issue's
targets are checked at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from mpq_jax.capture import HessianCache, fill_hessian_cache
from mpq_jax.data.calibration import DEFAULT_SOURCE_NAMES, calibration_tokens, default_sources, heldout_tokens
from mpq_jax.data.paths import cache_dir
from mpq_jax.eval.perplexity import make_windows, wikitext2_tokens, window_nll_sums
from mpq_jax.fingerprint import calibration_fingerprint, model_identity
from mpq_jax.models.checkpoint import DEFAULT_MODEL, load_model
from mpq_jax.output import atomic_write_text
from mpq_jax.quant import amlq_model, gptq_model, tammp_model
from mpq_jax.quant.amlq import DEFAULT_PRESETS
from mpq_jax.quant.method import WalkContext
from mpq_jax.quant.model import average_bits_per_weight, linear_stats
from mpq_jax.report import save_figure

SMP_SOURCES = ("web", "wikipedia", "code")


def code_bits(notes: dict | None, params: dict, original: dict) -> float:
    """Mean code bits per weight, the paper's count: each column's width, nothing else.
    TAMMP's notes give the widths; uniform methods are their width; AMQ/AMLQ their presets'
    mean code width."""
    stats = linear_stats(original, params)
    weights = sum(s.shape[0] * s.shape[1] for s in stats)
    total = 0.0
    for s in stats:
        note = notes.get(s.name) if notes else None
        bits = getattr(note, "code_bits", None)
        if bits is None:
            bits = getattr(note, "mean_code_bits", None)
        total += (bits if bits is not None else float("nan")) * s.shape[0] * s.shape[1]
    return total / weights


class Scorer:
    """Every evaluation set's windows, scored in one pass per model and split per set."""

    def __init__(self, model, windows: int, heldout_windows: int, seq_len: int):
        self.sets = {"wikitext2": make_windows(wikitext2_tokens(model.tokenizer), seq_len, windows)}
        for src in DEFAULT_SOURCE_NAMES:
            self.sets[src] = make_windows(heldout_tokens(model.tokenizer, src), seq_len, heldout_windows)
        self.windows = np.concatenate(list(self.sets.values()))
        self.spec, self.seq_len = model.spec, seq_len

    def __call__(self, params: dict) -> dict:
        sums = window_nll_sums(params, self.spec, self.windows)
        out, start = {}, 0
        for name, windows in self.sets.items():
            out[name] = float(np.exp(sums[start : start + len(windows)].sum() / (len(windows) * (self.seq_len - 1))))
            start += len(windows)
        heldout = {src: out[src] for src in DEFAULT_SOURCE_NAMES}
        return {"ppl": out["wikitext2"], "heldout": heldout, "heldout_mean": float(np.mean(list(heldout.values())))}


def plot(rows: list[dict], ablations: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    groups = {
        "GPTQ g128": lambda m: m.startswith("gptq") and m.endswith("g128"),
        "GPTQ g64": lambda m: m.startswith("gptq") and m.endswith("g64"),
        "AMQ": lambda m: m.startswith("amq-"),
        "AMLQ": lambda m: m.startswith("amlq-"),
        "TAMMP importance-sorted": lambda m: m.startswith("sorted-"),
        "TAMMP SMP": lambda m: m.startswith("smp-"),
        "TAMMP strategy 1/2": lambda m: m in ("strategy1", "strategy2"),
    }
    for (label, member), marker in zip(groups.items(), ["^", "v", "o", "s", "x", "D", "P"]):
        points = sorted((r["bpw"], r["ppl"], r["method"]) for r in rows if member(r["method"]))
        if not points:
            continue
        style = "-" if label in ("AMQ", "AMLQ", "TAMMP importance-sorted") else ""
        ax.plot([p[0] for p in points], [p[1] for p in points], marker + style, label=label, markersize=7)
        if label.startswith("TAMMP s") or label == "TAMMP SMP":
            for bpw, ppl, method in points:
                ax.annotate(method, (bpw, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fp = next((r for r in rows if r["method"] == "fp"), None)
    if fp:
        ax.axhline(fp["ppl"], color="k", linestyle="--", label="FP (as loaded)")
    ax.set_yscale("log")
    ax.set_xlabel("exact bits per weight (block linears, every stored bit)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("TAMMP, GPTQ, AMQ and AMLQ on SmolLM2-135M")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)


def check_targets(rows: list[dict], compactness: dict) -> list[str]:
    """The issue's four directions, each as a line saying held / did NOT hold with the numbers."""
    lines = []
    by = {r["method"]: r for r in rows}
    inter, intra = compactness.get("inter") or {}, compactness.get("intra") or {}
    if inter and intra:
        ps = sorted(int(p) for p in inter if all(p in v for v in intra.values()))
        mean_intra = {p: float(np.mean([v[p] for v in intra.values() if p in v])) for p in ps}
        below = [p for p in ps if inter[p] < mean_intra[p]]
        lines.append(
            f"inter-source compactness below intra-source (mean over sources): {'held' if below == ps else 'did NOT hold'} at "
            + ", ".join(f"p={p}: {inter[p]:.3f} vs {mean_intra[p]:.3f}" for p in ps)
        )
    s1, s2 = by.get("strategy1"), by.get("strategy2")
    if s1 and s2:
        ok = s2["heldout_mean"] < s1["heldout_mean"]
        lines.append(f"Strategy 2 mean heldout PPL below Strategy 1's: {'held' if ok else 'did NOT hold'} "
                     f"({s2['heldout_mean']:.3f} vs {s1['heldout_mean']:.3f})")
    g3 = by.get("gptq-3bit-g64")
    if s2 and g3:
        ok = s2["heldout_mean"] <= g3["heldout_mean"] and s2["bpw"] < g3["bpw"]
        lines.append(f"Strategy 2 mean heldout PPL <= GPTQ 3-bit g64's with fewer exact BPW: {'held' if ok else 'did NOT hold'} "
                     f"({s2['heldout_mean']:.3f} at {s2['bpw']:.3f} BPW vs {g3['heldout_mean']:.3f} at {g3['bpw']:.3f} BPW)")
    if s2:
        parts, ok = [], True
        for src in SMP_SOURCES:
            smp = by.get(f"smp-{src}")
            if not smp:
                continue
            others = [o for o in DEFAULT_SOURCE_NAMES if o != src]
            mine, theirs = np.mean([s2["heldout"][o] for o in others]), np.mean([smp["heldout"][o] for o in others])
            ok &= mine < theirs
            parts.append(f"{src}: {mine:.3f} vs {theirs:.3f}")
        if parts:
            lines.append(f"Strategy 2 beats each SMP on the other sources' mean heldout PPL: {'held' if ok else 'did NOT hold'} "
                         f"({'; '.join(parts)})")
    return lines


def _string_keys(tree):
    """JSON's form of a nested dict keyed by thresholds p: string keys at every level."""
    return {str(k): _string_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json", default="runs/bench_tammp.json")
    parser.add_argument("--windows", type=int, default=2, help="first K WikiText-2 test windows")
    parser.add_argument("--heldout-windows", type=int, default=1, help="first K windows of each heldout.jsonl")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-samples", type=int, default=40, help="calibration windows per source")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--resamples", type=int, default=5, help="disjoint resamples per source (intra-source compactness)")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--sorted", default="2.5,3,3.5", help="mean code bits of the importance-sorted rows")
    parser.add_argument("--alpha-points", type=int, default=10, help="AMLQ's α grid: this many points in [0, 0.95]")
    parser.add_argument("--no-amlq", action="store_true", help="skip the AMQ/AMLQ rows (their measuring pass is the slowest part)")
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in --json")
    parser.add_argument("--ablations", default="strategy2", help="strategies whose saliency and dense-position variants are run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    json_path = Path(args.json)
    done = {} if args.fresh or not json_path.is_file() else json.loads(json_path.read_text())
    rows, ablations = list(done.get("rows", [])), list(done.get("ablations", []))
    have = {r["method"] for r in rows + ablations}

    model = load_model(args.model)
    scorer = Scorer(model, args.windows, args.heldout_windows, args.seq_len)
    calibration = calibration_tokens(model.tokenizer, default_sources(DEFAULT_SOURCE_NAMES), args.calib_samples, args.calib_seq_len)
    identity = model_identity(model.source, "float32")
    plain_cache = HessianCache(cache_dir() / "hessians", calibration_fingerprint(identity, calibration))
    split = tammp_model.resampled_calibration(calibration, args.resamples)
    cache = tammp_model.resampled_cache(plain_cache, args.resamples)
    print(f"model: {model.source}; WikiText-2 {len(scorer.sets['wikitext2'])} x {args.seq_len}, heldout "
          f"{args.heldout_windows} x {args.seq_len} per source; calibration {len(calibration)} sources x "
          f"{args.calib_samples} x {args.calib_seq_len}, {args.resamples} resamples each")
    start = time.perf_counter()
    fill_hessian_cache(model.params, model.spec, split, cache)
    capture_s = time.perf_counter() - start
    context = WalkContext(spec=model.spec, calibration=split, statistics=cache)
    print(f"capture: {capture_s:.1f} s")
    header = f"{'method':<22}{'bpw':>7}{'code':>7}{'wt2 ppl':>11}{'heldout':>10}  " + " ".join(f"{s:>9}" for s in DEFAULT_SOURCE_NAMES) + f"{'s':>8}"
    print(header)

    def save(compactness=None) -> None:
        payload = {**done, "rows": rows, "ablations": ablations, "capture_seconds": capture_s}
        if compactness is not None:
            payload["compactness"] = compactness
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
        done.update(payload)

    def add(method, make, into=rows) -> dict | None:
        if method in have:
            row = next(r for r in rows + ablations if r["method"] == method)
        else:
            start = time.perf_counter()
            params, notes = make()
            seconds = time.perf_counter() - start
            bpw = 32.0 if method == "fp" else average_bits_per_weight(linear_stats(model.params, params))
            codes = notes if isinstance(notes, float) else code_bits(notes, params, model.params)
            row = {"method": method, "bpw": bpw, "code_bpw": codes, **scorer(params), "seconds": seconds}
            into.append(row)
            save()
        print(f"{method:<22}{row['bpw']:>7.3f}{row['code_bpw']:>7.3f}{row['ppl']:>11.3f}{row['heldout_mean']:>10.3f}  "
              + " ".join(f"{row['heldout'][s]:>9.3f}" for s in DEFAULT_SOURCE_NAMES) + f"{row['seconds']:>8.1f}", flush=True)
        return row

    add("fp", lambda: (model.params, 32.0))
    base = tammp_model.TammpOptions(topk=args.topk, resamples=args.resamples)
    ablation_strategies = [s for s in args.ablations.split(",") if s]
    probes: dict = {}

    def probe(saliency: str):
        if saliency not in probes:
            start = time.perf_counter()
            options = tammp_model.TammpOptions(topk=args.topk, saliency=saliency, resamples=args.resamples if saliency == "inverse" else 0)
            probes[saliency] = (tammp_model.probe_model(model.params, model.spec, split, cache, options), time.perf_counter() - start)
        return probes[saliency]

    def tammp_row(options, found=None):
        def make():
            found_probe, _ = found or probe(options.saliency)
            result = tammp_model.build_model(model.params, model.spec, split, cache, found_probe, options)
            return result.params, result.notes
        return make

    for strategy in ("strategy1", "strategy2"):
        add(strategy, tammp_row(dataclasses.replace(base, strategy=strategy)))
    if "compactness" not in done:
        full = probe("inverse")[0].compactness()
        compactness = {"inter": full["inter"]["overall"], "intra": {s: v["overall"] for s, v in full["intra"].items()},
                       "inter_by_type": full["inter"]["by_type"]}
        save(_string_keys(compactness))
    for src in SMP_SOURCES:
        def smp(src=src):
            found, probe_s = probe("inverse")
            one = tammp_model.Probe((src,), {src: found.sets[src]}, {})
            return tammp_row(dataclasses.replace(base, strategy="smp", sources=(src,)), (one, probe_s))()
        add(f"smp-{src}", smp)
    for bits in [float(b) for b in args.sorted.split(",") if b]:
        add(f"sorted-{bits:g}", tammp_row(dataclasses.replace(base, strategy="sorted", target_bits=bits)))
    for bits in (2, 3):
        for group in (128, 64):
            options = gptq_model.GptqOptions(bits=bits, group_size=group, propagate_quantized=False)
            add(f"gptq-{bits}bit-g{group}", lambda o=options: (gptq_model.quantize_model(model.params, o, context).params, float(o.bits)))
    for strategy in ablation_strategies:
        add(f"{strategy}-cholesky", tammp_row(dataclasses.replace(base, strategy=strategy, saliency="cholesky")), ablations)
        add(f"{strategy}-dense-first", tammp_row(dataclasses.replace(base, strategy=strategy, dense_position="first")), ablations)

    if not args.no_amlq:
        by = {r["method"]: r for r in rows}
        targets = [round(by[s]["bpw"], 3) for s in ("strategy1", "strategy2")]
        measurement = None
        for target in targets:
            for method, lowrank in (("amq", False), ("amlq", True)):
                def make(target=target, lowrank=lowrank):
                    nonlocal measurement
                    if measurement is None:
                        alpha_grid = tuple(np.round(np.linspace(0.0, 0.95, args.alpha_points), 4))
                        measurement = amlq_model.measure_model(model.params, model.spec, split, cache, presets=DEFAULT_PRESETS, alpha_grid=alpha_grid)
                    choices = amlq_model.allocate_model(measurement, target, lowrank)
                    params, layer_rows = amlq_model.build_model(model.params, model.spec, split, cache, measurement, choices, progress=False)
                    fields = [f.name for f in dataclasses.fields(amlq_model.AmlqNote)]
                    return params, {r["name"]: amlq_model.AmlqNote(**{k: r[k] for k in fields}) for r in layer_rows}
                add(f"{method}-{target:g}", make)

    print()
    comp = done.get("compactness", {})
    if comp:
        ps = sorted(comp["inter"], key=int)
        print("compactness (consensus Jaccard of critical columns)  " + "  ".join(f"p={p}" for p in ps))
        print(f"{'inter-source':<30}" + "  ".join(f"{comp['inter'][p]:.3f}" for p in ps))
        for src, values in comp["intra"].items():
            print(f"{'intra ' + src:<30}" + "  ".join(f"{values[p]:.3f}" if p in values else "  -  " for p in ps))
    as_int = {"inter": {int(p): v for p, v in comp.get("inter", {}).items()},
              "intra": {s: {int(p): v for p, v in vals.items()} for s, vals in comp.get("intra", {}).items()}}
    for line in check_targets(rows, as_int):
        print(line)
    plot(rows, ablations, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
