"""Command line entry: `python -m mpq_jax.quantize --config configs/X.yaml [--output DIR]`.

Runs the stages of a quantization job in order: pre-flight checks (`mpq_jax.preflight`:
output folder, model, tokenizer, calibration and evaluation inputs, budgets, all before any
weights are read), load the tokenizer and the calibration tokens, then the checkpoint,
quantize the block linears (method `none`, `rtn`, `gptq` on calibration text, or `amlq`),
save the packed model, evaluate (perplexity sets and lm-eval tasks, beside the FP baseline;
`mpq_jax.eval.suite`), and write `report.json`, `report.md` and the plots into the output
folder. This is the only place where the stages meet; each stage is a function in its own
module. Caches and resume checkpoints are keyed by `mpq_jax.fingerprint`.

Not for: the methods themselves (mpq_jax.quant) or benchmarks (scripts/).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mpq_jax.config import RunConfig, config_to_dict, load_config
from mpq_jax.capture import HessianCache
from mpq_jax.data.calibration import calibration_tokens, sources_from_config
from mpq_jax.data.paths import cache_dir
from mpq_jax.errors import MpqError
from mpq_jax.eval.suite import compare, evaluate, fp_baseline
from mpq_jax.fingerprint import calibration_fingerprint, model_identity, run_fingerprint
from mpq_jax.models.checkpoint import LoadedModel, load_model, load_tokenizer
from mpq_jax.models.spec import spec_to_dict
from mpq_jax.packed.io import save_quantized
from mpq_jax.preflight import CALIBRATED_METHODS, CheckedModel, check_run
from mpq_jax.quant.amlq import DEFAULT_LOWRANK_BPW, presets_from_config
from mpq_jax.quant.amlq_model import allocate_model, build_model, measure_model
from mpq_jax.quant.awq import DEFAULT_ALPHA_GRID
from mpq_jax.quant.model import average_bits_per_weight, linear_stats, quantize_model_gptq, quantize_model_rtn
from mpq_jax.report import write_report

log = logging.getLogger("mpq_jax")


def calibration_for(tokenizer, config: RunConfig) -> dict[str, np.ndarray] | None:
    """The calibration windows per source for a method that reads them, else None."""
    if config.quantization.method not in CALIBRATED_METHODS:
        return None
    cal = config.calibration
    return calibration_tokens(tokenizer, sources_from_config(cal), cal.n_samples, cal.seq_len, cal.seed)


def _statistics_cache(identity: dict, calibration: dict[str, np.ndarray]) -> HessianCache:
    """The disk cache of the unquantized model's input statistics for this calibration."""
    return HessianCache(cache_dir() / "hessians", calibration_fingerprint(identity, calibration))


def quantize_amlq(model: LoadedModel, config: RunConfig, calibration: dict, identity: dict) -> tuple[dict, dict[str, dict]]:
    """AMLQ (or AMQ with lowrank: false): measure every candidate, allocate, build."""
    a = config.quantization.amlq
    cache = _statistics_cache(identity, calibration)
    measurement = measure_model(
        model.params,
        model.spec,
        calibration,
        cache,
        presets=presets_from_config(a.presets),
        alpha_grid=a.alpha_grid or DEFAULT_ALPHA_GRID,
        lowrank_bpw=(a.lowrank_bpw or DEFAULT_LOWRANK_BPW) if a.lowrank else None,
        percdamp=config.quantization.percdamp,
        keep=a.keep_candidates,
    )
    choices = allocate_model(measurement, a.target_bpw, a.lowrank)
    params, rows = build_model(
        model.params, model.spec, calibration, cache, measurement, choices, percdamp=config.quantization.percdamp
    )
    return params, {row["name"]: {f"amlq_{k}": v for k, v in row.items() if k not in ("name", "shape", "bits_per_weight")} for row in rows}


def quantize_params(
    model: LoadedModel, config: RunConfig, output_dir: Path, calibration: dict | None, identity: dict
) -> tuple[dict, dict[str, dict]]:
    """The quantization stage: params -> params with QuantizedLinear block linears, and
    per-layer notes for the report where the method has them (GPTQ loss; AMLQ choices).

    `calibration` holds the calibration tokens of methods that need them; `identity` is the
    model's content fingerprint (`mpq_jax.fingerprint.model_identity`), which keys the
    statistics cache and the resume checkpoints."""
    q = config.quantization
    if q.method == "none":
        return model.params, {}
    if q.method == "rtn":
        return quantize_model_rtn(model.params, q.bits, q.group_size, q.symmetric), {}
    if q.method == "amlq":
        return quantize_amlq(model, config, calibration, identity)
    if q.method == "gptq":
        resume_dir = output_dir / ".resume"
        # Unquantized-model Hessians do not depend on the quantization settings: share them.
        propagate_fp = q.propagate == "fp"
        cache = _statistics_cache(identity, calibration) if propagate_fp else None
        params, losses = quantize_model_gptq(
            model.params,
            model.spec,
            calibration,
            bits=q.bits,
            group_size=q.group_size,
            act_order=q.act_order,
            static_groups=q.static_groups,
            symmetric=q.symmetric,
            percdamp=q.percdamp,
            propagate_quantized=not propagate_fp,
            resume_dir=resume_dir,
            fingerprint=run_fingerprint(identity, config.quantization, config.calibration, calibration),
            hessian_cache=cache,
        )
        shutil.rmtree(resume_dir, ignore_errors=True)  # finished: the block checkpoints are spent
        return params, {name: {"gptq_loss": loss} for name, loss in losses.items()}
    raise AssertionError(f"config validation let through method {q.method!r}")


def load_inputs(config: RunConfig, checked: CheckedModel) -> tuple[LoadedModel, dict | None, dict]:
    """(model, calibration tokens or None, model identity), the calibration text tokenized
    before the weights are read, so that a source too short for n_samples x seq_len fails
    in seconds rather than after loading."""
    tokenizer = load_tokenizer(checked.path)
    calibration = calibration_for(tokenizer, config)
    identity = model_identity(checked.path, config.dtype)
    model = load_model(checked.path, dtype=config.dtype, with_tokenizer=False)
    return dataclasses.replace(model, tokenizer=tokenizer), calibration, identity


def run(config: RunConfig, output_dir: Path) -> dict:
    """Run every stage; returns the report dict (also written to output_dir)."""
    timings: dict[str, float] = {}
    # Everything that can be checked in seconds, before minutes go into loading and quantizing.
    checked = check_run(config, output_dir)
    start = time.perf_counter()
    model, calibration, identity = load_inputs(config, checked)
    timings["load"] = time.perf_counter() - start
    log.info("loaded %s: %s, %d layers", model.source, model.spec.family, model.spec.num_layers)

    start = time.perf_counter()
    params, notes = quantize_params(model, config, output_dir, calibration, identity)
    timings["quantize"] = time.perf_counter() - start
    stats = linear_stats(model.params, params)
    report: dict = {
        "model": model.source,
        "method": config.quantization.method,
        "bits_per_weight": average_bits_per_weight(stats),
        "config": config_to_dict(config),
        "layers": [{**s.to_json(), **notes.get(s.name, {})} for s in stats],
    }

    # Saved before evaluating: an evaluation that fails does not take the quantized model with it.
    packed_dir = output_dir / "model"
    if config.save_model:
        start = time.perf_counter()
        save_packed_model(packed_dir, params, model, config)
        timings["save"] = time.perf_counter() - start
        report["packed_model"] = str(packed_dir)
    elif packed_dir.is_dir():
        # A report must never sit beside a model that another run wrote.
        log.info("save_model is false: removing the earlier run's %s", packed_dir)
        shutil.rmtree(packed_dir)

    start = time.perf_counter()
    try:
        report.update(evaluation_report(params, model, config, identity))
    except MpqError as exc:
        if config.save_model:
            raise type(exc)(f"{exc} (the quantized model is saved in {packed_dir})") from None
        raise
    timings["evaluate"] = time.perf_counter() - start
    report["seconds"] = timings
    write_report(output_dir, report)
    return report


def save_packed_model(folder: Path, params: dict, model: LoadedModel, config: RunConfig) -> None:
    metadata = {
        "spec": spec_to_dict(model.spec),
        "hf_config": model.hf_config,
        "source": model.source,
        "run_config": config_to_dict(config),
    }
    # The tokenizer travels with the packed model so that it loads on its own.
    save_tokenizer = None if model.tokenizer is None else (lambda tmp: model.tokenizer.save_pretrained(str(tmp)))
    save_quantized(folder, params, metadata, extra_files=save_tokenizer)


def evaluation_report(params: dict, model: LoadedModel, config: RunConfig, identity: dict) -> dict:
    """The report's evaluation entries: `perplexity` (WikiText-2, when scored) and `eval`
    (every perplexity set and task, for this model and, unless it is the unquantized model
    itself or compare_fp is off, for the FP baseline, side by side)."""
    evaluation = evaluate(params, model, config.eval, label=config.quantization.method)
    fp = None
    if config.eval.compare_fp and config.quantization.method != "none" and (evaluation["perplexity"] or evaluation["tasks"]):
        fp = fp_baseline(model, config.eval, identity)
    entries: dict = {"eval": compare(evaluation, fp)}
    if "wikitext2" in evaluation["perplexity"]:
        entries["perplexity"] = evaluation["perplexity"]["wikitext2"]
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpq_jax.quantize",
        description="Quantize a Llama/Qwen checkpoint, evaluate it, and save the packed model.",
    )
    parser.add_argument("--config", required=True, help="YAML run configuration (see configs/)")
    parser.add_argument("--model", help="checkpoint to quantize (default: the config's model)")
    parser.add_argument("--output", help="output folder (default: the config's output_dir)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config)
        if args.model:
            config = dataclasses.replace(config, model=args.model)
        if args.output:
            config = dataclasses.replace(config, output_dir=args.output)
        report = run(config, Path(config.output_dir))
    except MpqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    line = f"method={report['method']} bits/weight={report['bits_per_weight']:.3f}"
    if "perplexity" in report:
        line += f" wikitext2 ppl@{report['perplexity']['seq_len']}={report['perplexity']['ppl']:.4f}"
    print(line)
    print(f"report: {Path(config.output_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
