"""Pre-flight checks: everything a run needs that can be checked in seconds, before its first
expensive step (loading weights, capturing statistics, measuring, evaluating).

Each check raises an `mpq_jax.errors` exception naming the config field or file and the fix;
the CLIs turn those into `error: ...` and exit status 2. What is checked: the output folder
(not a file, writable, nothing in the way of `model/`), the model (present, an architecture
we implement — read from its config, not its weights — and not already packed where a method
would quantize it again), a tokenizer wherever text must be read, the calibration sources
(present and of a known format; their records and length are checked when they are
tokenized, which the pipeline does before loading the weights), the evaluation sets and tasks, and an AMLQ
budget against the range its presets can reach.

Not for: validating config values one by one (`mpq_jax.config`), or the checks that need the
loaded model (shapes of every tensor: `mpq_jax.models.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from mpq_jax.config import RunConfig
from mpq_jax.data.calibration import source_format, sources_from_config
from mpq_jax.errors import CheckpointError, ConfigError
from mpq_jax.eval.suite import check_inputs
from mpq_jax.models.checkpoint import DEFAULT_MODEL, has_tokenizer, model_kind, read_spec, resolve_model_source
from mpq_jax.models.spec import ModelSpec
from mpq_jax.packed.io import read_metadata
from mpq_jax.quant.registry import method_named

log = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class CheckedModel:
    path: Path  # the resolved file or folder
    kind: str  # "hf", "gguf" or "packed"
    spec: ModelSpec  # read from the config, no weights loaded


def check_output_dir(folder: Path, field: str = "output_dir") -> None:
    """The output folder exists or can be made, is writable, and `model/` is not a file."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{field}: {folder} is an existing file, not a folder; choose another output folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{field}: cannot write into {folder} ({exc.strerror or exc}); choose a folder you can write to"
        ) from None
    for name in ("model", ".resume", ".qat"):
        if (folder / name).exists() and not (folder / name).is_dir():
            raise ConfigError(f"{field}: {folder / name} is a file where the run writes a folder; move it away")


def check_model(source: str, field: str = "model", allow_packed: bool = True) -> CheckedModel:
    """The model is there and its architecture is one we implement (from its config alone)."""
    try:
        path = resolve_model_source(source)
        kind = model_kind(path)
        if kind == "packed" and not allow_packed:
            refuse_packed_source(path, field)
        spec = read_spec(path)
    except CheckpointError as exc:
        raise type(exc)(f"{field}: {exc}") from None
    return CheckedModel(path=path, kind=kind, spec=spec)


def refuse_packed_source(path: Path, field: str = "model") -> None:
    """Quantizing a packed model again would compound two quantizations' errors, and its
    report would compare against the packed model rather than the real FP one: refuse it,
    pointing at its source and at `mpq_jax.evaluate`."""
    metadata = read_metadata(path)
    source = metadata.get("source")
    method = (metadata.get("run_config") or {}).get("quantization", {}).get("method", "?")
    hint = f"quantize its source instead ({field}: {source})" if source else "quantize the unquantized model instead"
    raise ConfigError(
        f"{field}: {path} is a packed mpq-jax model (already quantized, method {method}); {hint}, "
        f"or score it with: python -m mpq_jax.evaluate --model {path} --config X.yaml"
    )


def check_tokenizer(model: CheckedModel, needed_for: str) -> None:
    if not has_tokenizer(model.path):
        raise ConfigError(
            f"{model.path} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...), "
            f"but {needed_for} needs one; copy the tokenizer files into the folder"
        )


def check_calibration(config: RunConfig) -> None:
    """Every calibration source names a file or dataset of a known format. Its records (the
    text field, JSON, UTF-8) and its length are checked when it is tokenized, which the
    pipeline does before loading the weights, so the files are read once."""
    for source in sources_from_config(config.calibration):
        source_format(source)


def evaluates_text(config: RunConfig) -> bool:
    ppl = config.eval.perplexity
    return bool((ppl.enabled and ppl.sets) or config.eval.tasks.names)


def check_run(config: RunConfig, output_dir: Path) -> CheckedModel:
    """Every pre-flight check of a `python -m mpq_jax.quantize` run, cheapest first."""
    check_output_dir(output_dir)
    model = check_model(config.model, allow_packed=False)
    method = method_named(config.quantization.method)
    if method.calibrated:
        check_tokenizer(model, f"quantization.method {method.name} (to read calibration text)")
        check_calibration(config)
    if config.qat.enabled:
        check_tokenizer(model, "qat (to read training text)")
        if config.qat.checkpoint_dir is not None:
            check_output_dir(Path(config.qat.checkpoint_dir), "qat.checkpoint_dir")
    if evaluates_text(config):
        check_tokenizer(model, "evaluation (eval.perplexity / eval.tasks)")
        check_inputs(config.eval)
    if method.check is not None:  # what the method can tell from the layer shapes alone (AMLQ's budget)
        method.check(model.spec, method.options(config.quantization))
    log.info(
        "pre-flight checks passed: %s (%s, %s, %d layers) -> %s",
        model.path if str(config.model) != DEFAULT_MODEL else DEFAULT_MODEL,
        model.kind,
        model.spec.family,
        model.spec.num_layers,
        output_dir,
    )
    return model

