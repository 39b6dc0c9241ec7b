"""Downstream capabilities of the default model after each method, and the harness's speed.

    python scripts/bench_eval.py [--json PATH] [--limit 50] [--gsm8k-limit 5]
                                 [--methods fp,rtn3,gptq3,amlq3.3] [--no-hf]
                                 [--packed NAME=DIR,...]

The nine zero-shot multiple-choice local lm-eval tasks, LAMBADA and GSM8K 5-shot on the first
`--limit` documents (`--gsm8k-limit` for GSM8K, whose greedy generation is slow on CPU), for
each method. The later local tasks (NQ-open, SQuAD, MathQA, MBPP) are not part of this
benchmark, so world knowledge and code show as not run:

  fp        the model as loaded (SmolLM2-135M-Instruct, float32)
  rtn3      round-to-nearest 3-bit, groups of 128
  gptq3     GPTQ 3-bit, groups of 128, act-order, static groups, FP-propagated Hessians
  amlq3.3   AMLQ at 3.3 bits per weight (default presets and ranks)
  amq3.3    the same without the low-rank term
  strategy1 TAMMP Strategy 1 (fp16 / 3-bit / 2-bit columns, five sources, 40 x 512 each)
  strategy2 TAMMP Strategy 2
  NAME      with --packed NAME=DIR: a packed model saved in DIR, e.g. a QAT model of
            scripts/bench_qat.py (runs/bench_qat/gptq-2bit-g64/e2e), scored as it is

Calibration: 64 x 512 Wikipedia tokens (the statistics are cached on disk, shared with
`python -m mpq_jax.quantize` runs). Reported per method: accuracy per task, mean per
capability dimension (TAMMP's five; `mpq_jax.eval.downstream`), retained fraction
quantized / FP, bits per weight and quantization seconds. Speed: the wall time of our
`mpq-jax` model and of lm-eval's `hf` model (transformers, torch CPU, the same GGUF,
batch 16) on the FP model over the same tasks and documents, run back to back in this
process before anything else, split into the log-likelihood tasks and GSM8K generation;
ours twice: cold (including XLA compilation) and warm (the same evaluation again). Writes the JSON (and a
PNG of retained fraction per dimension beside it) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from mpq_jax.config import RunConfig, parse_section
from mpq_jax.eval.downstream import CAPABILITIES, capability_table, run_tasks, task_manager, task_table
from mpq_jax.eval.harness import MpqJaxLM
from mpq_jax.eval.torch_reference import lm_eval_hf_model
from mpq_jax.models.checkpoint import DEFAULT_MODEL, LoadedModel, load_model
from mpq_jax.output import atomic_write_text
from mpq_jax.packed.io import MANIFEST_FILE, load_quantized
from mpq_jax.quant.model import average_bits_per_weight, linear_stats
from mpq_jax.fingerprint import model_identity
from mpq_jax.pipeline import calibration_for, quantize_params
from mpq_jax.report import save_figure

LOGLIKELIHOOD_TASKS = ["local_tasks", "local_lambada_openai"]
CALIBRATION = {"sources": ["wikipedia"], "n_samples": 64, "seq_len": 512}
METHODS = {
    "fp": {"method": "none"},
    "rtn3": {"method": "rtn", "bits": 3, "group_size": 128},
    "gptq3": {"method": "gptq", "bits": 3, "group_size": 128, "propagate": "fp"},
    "amlq3.3": {"method": "amlq", "amlq": {"target_bpw": 3.3}},
    "amq3.3": {"method": "amlq", "amlq": {"target_bpw": 3.3, "lowrank": False}},
    "strategy1": {"method": "tammp", "tammp": {"strategy": "strategy1"}},
    "strategy2": {"method": "tammp", "tammp": {"strategy": "strategy2"}},
}
# TAMMP probes each knowledge source apart: all five, as scripts/bench_tammp.py calibrates.
TAMMP_CALIBRATION = {"sources": ["web", "wikipedia", "code", "qa", "arxiv"], "n_samples": 40, "seq_len": 512}


def quantized_model(model: LoadedModel, name: str) -> tuple[LoadedModel, float, float]:
    """(model with quantized params, bits per weight, seconds to quantize)."""
    calibration = TAMMP_CALIBRATION if METHODS[name]["method"] == "tammp" else CALIBRATION
    config = parse_section(RunConfig, {"quantization": METHODS[name], "calibration": calibration}, "")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        identity = model_identity(model.source, config.dtype)
        params = quantize_params(model, config, Path(folder), calibration_for(model.tokenizer, config), identity).params
    seconds = time.perf_counter() - start
    return dataclasses.replace(model, params=params), average_bits_per_weight(linear_stats(model.params, params)), seconds


def _timed_tasks(lm, manager, limit: int, gsm8k_limit: int) -> tuple[dict, dict]:
    """(scores, seconds of the log-likelihood tasks and of GSM8K generation)."""
    start = time.perf_counter()
    scores = run_tasks(lm, LOGLIKELIHOOD_TASKS, limit=limit, manager=manager)
    middle = time.perf_counter()
    scores.update(run_tasks(lm, ["local_gsm8k"], limit=gsm8k_limit, manager=manager))
    return scores, {"loglikelihood": middle - start, "generation": time.perf_counter() - middle}


def speed_comparison(model: LoadedModel, manager, limit: int, gsm8k_limit: int) -> dict:
    """Seconds of our harness model (cold: with XLA compilation; warm: the same evaluation
    again in this process) and of lm-eval's `hf` model on the same FP evaluation."""
    ours_lm = MpqJaxLM(model=model)
    ours, cold = _timed_tasks(ours_lm, manager, limit, gsm8k_limit)
    _, warm = _timed_tasks(ours_lm, manager, limit, gsm8k_limit)
    hf_lm = lm_eval_hf_model(model.source)
    theirs, hf = _timed_tasks(hf_lm, manager, limit, gsm8k_limit)
    return {
        "mpq_jax_cold_seconds": cold,
        "mpq_jax_warm_seconds": warm,
        "hf_seconds": hf,
        "same_scores": {task: ours[task]["value"] == theirs[task]["value"] for task in ours},
        "fp_scores": ours,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dimensions = [d for d in CAPABILITIES if any(r["dimension"] == d and r["tasks"] for m in results.values() for r in m["capabilities"])]
    methods = [m for m in results if m != "fp"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        rows = {r["dimension"]: r for r in results[method]["capabilities"]}
        values = [rows[d]["retained"] or 0.0 for d in dimensions]
        ax.bar([x + i * width for x in range(len(dimensions))], values, width, label=f"{method} ({results[method]['bpw']:.2f} BPW)")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(dimensions))], dimensions, fontsize=9)
    ax.set_ylabel("retained fraction (quantized / FP)")
    ax.set_title("SmolLM2-135M-Instruct: capabilities retained (dimensions with a task run)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="runs/bench_eval.json")
    parser.add_argument("--limit", type=int, default=50, help="documents per task (0 = all)")
    parser.add_argument("--gsm8k-limit", type=int, default=5)
    parser.add_argument("--methods", default="fp,rtn3,gptq3,amlq3.3")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-hf", action="store_true", help="skip the speed comparison with lm-eval's hf model")
    parser.add_argument("--packed", default="", help="NAME=DIR,...: also score packed models saved in DIR (e.g. bench_qat's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "fp" not in methods:
        parser.error(f"--methods: need fp and names from {', '.join(METHODS)}")
    packed = dict(item.split("=", 1) for item in args.packed.split(",") if item)
    for name, folder in packed.items():
        if not (Path(folder) / MANIFEST_FILE).is_file():
            parser.error(f"--packed: {folder} (for {name}) holds no packed model ({MANIFEST_FILE} missing)")
    methods += list(packed)
    manager = task_manager()
    model = load_model(args.model)
    output: dict = {"model": model.source, "limit": args.limit, "gsm8k_limit": args.gsm8k_limit, "methods": {}}

    if not args.no_hf:
        output["speed"] = speed_comparison(model, manager, args.limit, args.gsm8k_limit)
        fp_scores = output["speed"].pop("fp_scores")
    else:
        fp_scores, _ = _timed_tasks(MpqJaxLM(model=model), manager, args.limit, args.gsm8k_limit)
    for name in methods:
        if name == "fp":
            scores, bpw, seconds = fp_scores, 32.0, 0.0
        elif name in packed:
            params, _ = load_quantized(packed[name])
            bpw, seconds = average_bits_per_weight(linear_stats(model.params, params)), 0.0
            scores, _ = _timed_tasks(MpqJaxLM(model=dataclasses.replace(model, params=params)), manager, args.limit, args.gsm8k_limit)
        else:
            quantized, bpw, seconds = quantized_model(model, name)
            scores, _ = _timed_tasks(MpqJaxLM(model=quantized), manager, args.limit, args.gsm8k_limit)
        output["methods"][name] = {
            "bpw": bpw,
            "quantize_seconds": seconds,
            "tasks": task_table(scores, fp_scores),
            "capabilities": capability_table(scores, fp_scores),
        }

    path = Path(args.json)
    atomic_write_text(path, json.dumps(output, indent=2) + "\n")
    plot(output["methods"], path.with_suffix(".png"))

    tasks = [row["task"] for row in output["methods"]["fp"]["tasks"]]
    print(f"\naccuracy (first {args.limit} documents; GSM8K {args.gsm8k_limit}), retained = quantized / FP")
    print(f"{'task':<22}" + "".join(f"{m:>16}" for m in methods))
    for i, task in enumerate(tasks):
        cells = []
        for m in methods:
            row = output["methods"][m]["tasks"][i]
            cells.append(f"{row['quantized']:.3f}" + (f" ({row['retained']:.2f})" if m != "fp" and row["retained"] is not None else ""))
        print(f"{task:<22}" + "".join(f"{c:>16}" for c in cells))
    print(f"{'dimension':<22}" + "".join(f"{m:>16}" for m in methods))
    for j, row in enumerate(output["methods"]["fp"]["capabilities"]):
        if not row["tasks"]:
            print(f"{row['dimension']:<22}{'not run':>16}")
            continue
        cells = []
        for m in methods:
            r = output["methods"][m]["capabilities"][j]
            cells.append(f"{r['quantized']:.3f}" + (f" ({r['retained']:.2f})" if m != "fp" and r["retained"] is not None else ""))
        print(f"{row['dimension']:<22}" + "".join(f"{c:>16}" for c in cells))
    print("BPW: " + ", ".join(f"{m} {output['methods'][m]['bpw']:.3f}" for m in methods))
    if "speed" in output:
        s = output["speed"]
        print("FP evaluation wall time, s      mpq-jax cold   mpq-jax warm   lm-eval hf   hf / mpq-jax (cold, warm)")
        for part in ("loglikelihood", "generation"):
            cold, warm, hf = s["mpq_jax_cold_seconds"][part], s["mpq_jax_warm_seconds"][part], s["hf_seconds"][part]
            print(f"  {part:<28}{cold:>13.1f}{warm:>15.1f}{hf:>13.1f}   {hf / cold:.2f}, {hf / warm:.2f}")
        print(f"identical scores on every task: {all(s['same_scores'].values())}")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
