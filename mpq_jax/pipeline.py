"""The stages of a quantization job, in the order they run, and the one place where the run
configuration meets the plain arguments of the stages:

    check   pre-flight: output folder, model, tokenizer, calibration and evaluation inputs,
            budgets, all before any weights are read (mpq_jax.preflight)
    load    tokenizer, calibration tokens (before the weights: a short source fails in
            seconds), the model's content identity, then the weights
    quantize  the configured method's walk (mpq_jax.quant.registry), with the shared cache of
            the unquantized model's input statistics and resume checkpoints keyed by
            mpq_jax.fingerprint
    train   quantization-aware training of the packed model, when `qat.enabled`: stage 1
            block-wise, stage 2 end-to-end (mpq_jax.qat), packed layers in and out
    save    the packed model, before evaluating: a failed evaluation keeps it; the resume
            checkpoints of quantize and train are removed once it is written
    evaluate  perplexity sets and lm-eval tasks beside the FP baseline (mpq_jax.eval.suite)
    report  report.json, report.md and the plots (mpq_jax.report)

`mpq_jax.quantize` is the command line around `run`. Benchmarks call the stages directly.

Not for: the methods themselves (mpq_jax.quant) or evaluation internals (mpq_jax.eval).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from mpq_jax import parallel
from mpq_jax.capture import HessianCache
from mpq_jax.config import RunConfig, config_to_dict
from mpq_jax.data.calibration import calibration_tokens, sources_from_config
from mpq_jax.data.paths import cache_dir
from mpq_jax.errors import ConfigError, MpqError
from mpq_jax.eval.suite import check_inputs, compare, evaluate, fp_baseline
from mpq_jax.fingerprint import calibration_fingerprint, model_identity, qat_fingerprint, run_fingerprint
from mpq_jax.models.checkpoint import LoadedModel, load_model, load_tokenizer
from mpq_jax.models.spec import spec_to_dict
from mpq_jax.packed.io import save_quantized
from mpq_jax.preflight import CheckedModel, check_run, evaluates_text
from mpq_jax.quant.method import QuantizedModel, WalkContext
from mpq_jax.quant.model import average_bits_per_weight, linear_stats
from mpq_jax.quant.registry import method_named
from mpq_jax.report import write_report

log = logging.getLogger("mpq_jax")


def calibration_for(tokenizer, config: RunConfig) -> dict[str, np.ndarray] | None:
    """The calibration windows per source for a method that reads them, else None."""
    if not method_named(config.quantization.method).calibrated:
        return None
    cal = config.calibration
    return calibration_tokens(tokenizer, sources_from_config(cal), cal.n_samples, cal.seq_len, cal.seed)


def training_tokens(tokenizer, config: RunConfig) -> np.ndarray | None:
    """int32 [n, qat.seq_len] QAT windows (n = the larger stage's samples), taken in turn
    from each training source (qat.sources, default calibration.sources), or None without QAT."""
    qat = config.qat
    if not qat.enabled:
        return None
    names = qat.sources if qat.sources is not None else config.calibration.sources
    n = max(qat.block.samples if qat.block.enabled else 0, qat.e2e.samples if qat.e2e.enabled else 0)
    per_source = -(-n // len(names))
    sources = sources_from_config(dataclasses.replace(config.calibration, sources=tuple(names)))
    windows = calibration_tokens(tokenizer, sources, per_source, qat.seq_len, qat.seed)
    # Interleaved (window 0 of every source, then window 1, ...), so any prefix mixes the sources.
    mixed = np.stack([windows[name] for name in names], axis=1).reshape(-1, qat.seq_len)
    return mixed[:n]


def load_inputs(config: RunConfig, checked: CheckedModel) -> tuple[LoadedModel, dict | None, dict, np.ndarray | None]:
    """(model, calibration tokens or None, model identity, QAT windows or None), the text
    tokenized before the weights are read, so that a source too short for its windows fails
    in seconds rather than after loading."""
    tokenizer = load_tokenizer(checked.path)
    if evaluates_text(config):
        check_inputs(config.eval, tokenizer)  # a user's text file is now measured in tokens, still before the weights
    calibration = calibration_for(tokenizer, config)
    training = training_tokens(tokenizer, config)
    identity = model_identity(checked.path, config.dtype)
    model = load_model(checked.path, dtype=config.dtype, with_tokenizer=False)
    return dataclasses.replace(model, tokenizer=tokenizer), calibration, identity, training


def statistics_cache(identity: dict, calibration: dict[str, np.ndarray]) -> HessianCache:
    """The disk cache of the unquantized model's input statistics for this calibration:
    they do not depend on the quantization settings, so every run and method shares them."""
    return HessianCache(cache_dir() / "hessians", calibration_fingerprint(identity, calibration))


def mesh_for(config: RunConfig):
    """The device mesh of `parallel` (mpq_jax.parallel), or None when it is off."""
    par = config.parallel
    return parallel.make_mesh(par.data, par.model) if par.enabled else None


def calibration_share(calibration: dict[str, np.ndarray], mesh, config: RunConfig) -> tuple[dict[str, np.ndarray], int]:
    """This process's share of every source's calibration windows (all of them in one
    process) and the index of its first window: capture splits the windows over every
    device of the mesh, so the share follows the process's devices along both axes."""
    share = parallel.process_share(mesh, parallel.AXES)
    rows = parallel.share_rows(config.calibration.n_samples, share, "calibration.n_samples")
    tammp = config.quantization.tammp
    if config.quantization.method == "tammp" and tammp.resamples > 1 and (rows.stop - rows.start) % tammp.resamples:
        raise ConfigError(
            f"calibration.n_samples: each of the {share[1]} process shares holds {rows.stop - rows.start} windows per source, "
            f"which quantization.tammp.resamples ({tammp.resamples}) does not divide; use a multiple of {share[1] * tammp.resamples}"
        )
    return {src: windows[rows] for src, windows in calibration.items()}, rows.start


def quantize_params(
    model: LoadedModel, config: RunConfig, output_dir: Path, calibration: dict | None, identity: dict, mesh=None
) -> QuantizedModel:
    """The quantization stage: the configured method's walk on the loaded model.

    `calibration` holds the calibration tokens of methods that need them (every window: they
    key the caches; with a mesh the walk gets this process's share); `identity` is the
    model's content fingerprint (`mpq_jax.fingerprint.model_identity`), which keys the
    statistics cache and the resume checkpoints (kept in output_dir/.resume while running)."""
    method = method_named(config.quantization.method)
    resume_dir = output_dir / ".resume"
    windows, offset = (calibration, 0) if calibration is None or mesh is None else calibration_share(calibration, mesh, config)
    context = WalkContext(
        spec=model.spec,
        calibration=windows,
        statistics=None if calibration is None else statistics_cache(identity, calibration),
        resume_dir=resume_dir,
        fingerprint="" if calibration is None else run_fingerprint(identity, config.quantization, config.calibration, calibration),
        output_dir=output_dir,
        progress=parallel.is_leader(),
        mesh=mesh,
        window_offset=offset,
    )
    return method.quantize_model(model.params, method.options(config.quantization), context)


def qat_checkpoints(config: RunConfig, output_dir: Path) -> Path:
    return Path(config.qat.checkpoint_dir) if config.qat.checkpoint_dir is not None else output_dir / ".qat"


def train_params(
    model: LoadedModel, packed: dict, config: RunConfig, output_dir: Path, tokens: np.ndarray, identity: dict, mesh=None
):
    """The train stage: QAT stage 1 and/or 2 on the packed params; returns (params, report
    entry). Checkpoints (qat.checkpoint_dir, default output_dir/.qat) are keyed by the run's
    settings and the training tokens, so a killed run started again resumes. With a mesh
    the stages run sharded by the partition rules, each process on its share of the windows."""
    from mpq_jax.qat.stages import block_stage, e2e_stage

    qat = config.qat
    root = qat_checkpoints(config, output_dir)
    key = qat_fingerprint(identity, config.quantization, config.calibration, qat, tokens)
    placement = parallel.Placement(mesh, config.parallel.fsdp)
    for stage in ("block", "e2e"):
        if getattr(qat, stage).enabled:
            parallel.share_rows(getattr(qat, stage).samples, placement.share, f"qat.{stage}.samples")
            parallel.share_rows(getattr(qat, stage).batch_size, placement.share, f"qat.{stage}.batch_size")
    mine = tokens[parallel.share_rows(len(tokens), placement.share, "qat samples")]
    entry: dict = {"samples": {"block": qat.block.samples, "e2e": qat.e2e.samples}, "seq_len": qat.seq_len, "dtype": qat.dtype}
    entry["mesh"] = parallel.mesh_shape(mesh)
    progress = parallel.is_leader()
    if qat.block.enabled:
        packed, note = block_stage(model.params, packed, model.spec, mine, qat, root, key, placement=placement, progress=progress)
        entry["block"] = note.to_json()
    if qat.e2e.enabled:
        packed, note = e2e_stage(packed, model.spec, mine, qat, root, key, placement=placement, progress=progress)
        entry["e2e"] = note.to_json()
    return packed, entry


def run(config: RunConfig, output_dir: Path) -> dict:
    """Run every stage; returns the report dict (also written to output_dir)."""
    timings: dict[str, float] = {}
    parallel.initialize(config.parallel)  # before anything touches a device
    # Everything that can be checked in seconds, before minutes go into loading and quantizing.
    checked = check_run(config, output_dir)
    mesh = mesh_for(config)
    start = time.perf_counter()
    model, calibration, identity, training = load_inputs(config, checked)
    timings["load"] = time.perf_counter() - start
    log.info("loaded %s: %s, %d layers", model.source, model.spec.family, model.spec.num_layers)

    start = time.perf_counter()
    method = method_named(config.quantization.method)
    result = quantize_params(model, config, output_dir, calibration, identity, mesh)
    params = result.params
    timings["quantize"] = time.perf_counter() - start
    qat_entry = None
    if config.qat.enabled:
        start = time.perf_counter()
        ptq_bits = average_bits_per_weight(linear_stats(model.params, params))
        params, qat_entry = train_params(model, params, config, output_dir, training, identity, mesh)
        qat_entry["bits_per_weight_after_ptq"] = ptq_bits
        timings["train"] = time.perf_counter() - start
    stats = linear_stats(model.params, params)
    report: dict = {
        "model": model.source,
        "method": config.quantization.method,
        "method_detail": method.options(config.quantization).describe(),
        "bits_per_weight": average_bits_per_weight(stats),
        "config": config_to_dict(config),
        "layers": [{**s.to_json(), **(result.notes[s.name].to_json() if s.name in result.notes else {})} for s in stats],
    }
    if result.summary:
        report[config.quantization.method] = result.summary
    if qat_entry is not None:
        report["qat"] = qat_entry
    if not parallel.is_leader():
        # Every process holds the same quantized params; process 0 saves, evaluates and
        # reports them.
        return report

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
    # Quantized (and trained) params are in hand, and saved if asked: the checkpoints that
    # would resume a killed run are spent.
    shutil.rmtree(output_dir / ".resume", ignore_errors=True)
    if config.qat.enabled:
        shutil.rmtree(qat_checkpoints(config, output_dir), ignore_errors=True)

    start = time.perf_counter()
    try:
        report.update(evaluation_report(params, model, config, identity))
    except MpqError as exc:
        if config.save_model:
            raise type(exc)(f"{exc} (the quantized model is saved in {packed_dir})") from None
        raise
    timings["evaluate"] = time.perf_counter() - start
    report["seconds"] = timings
    write_report(output_dir, report, method.note_type)
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
