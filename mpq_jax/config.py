"""The YAML run configuration: parsed once, at the edge, into frozen typed objects.

Every section is a frozen dataclass whose fields carry their meaning in a comment; the
parser checks each key against the dataclass (unknown keys, wrong types and values outside
an allowed set raise `ConfigError` naming the dotted field and what is allowed). Inner code
receives these objects or plain arguments, never raw dicts. The defaults run the default
model.

Not for: model architecture (see `mpq_jax.models.spec`), or method internals.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mpq_jax.data.calibration import CalibrationConfig
from mpq_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class PresetConfig:
    group_size: int  # 32, 64 or 128
    bits: dict[int, float]  # width -> share of the layer's groups (widths from 2,3,4,5,6,8,16; shares sum to 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AmlqConfig:
    target_bpw: float = 3.3  # average stored bits per block-linear weight, everything counted
    lowrank: bool = True  # add the PCA low-rank term (AMLQ); false = AMQ, the same run without it
    presets: tuple[PresetConfig, ...] | None = None  # mixed-precision recipes q_j (default: 11 from 2.2 to ~4.9 BPW)
    alpha_grid: tuple[float, ...] | None = None  # AWQ strengths to search (default: 20 points 0..0.95)
    lowrank_bpw: tuple[float, ...] | None = None  # ranks as extra BPW per layer (default 0.0625, 0.125, 0.25, 0.5)
    keep_candidates: bool = True  # keep every preset's GPTQ layer in host memory (~presets x packed model) instead of recomputing


@dataclasses.dataclass(frozen=True, kw_only=True)
class TammpConfig:
    # strategy1: critical = ∩ of the sources' critical columns (fp16), sub-critical = rest of their ∪ (3-bit),
    # the remainder 2-bit; strategy2: critical as before, non-critical = ∪ of non-critical columns (2-bit), the rest
    # 3-bit; smp: one source's critical columns fp16, the rest 2-bit; sorted: columns by pooled saliency, the top
    # `critical_share` fp16 and widths 2/3/4 in importance order averaging `target_bits` (codes only)
    strategy: Literal["strategy1", "strategy2", "smp", "sorted"] = "strategy1"
    sources: tuple[str, ...] | None = None  # calibration sources probed apart (default: all of calibration.sources; smp: one)
    topk: int = 10  # most critical (and non-critical) candidate columns per block of block_size columns
    block_size: int = 128  # β: input columns per probing block (Algorithm 1)
    saliency: Literal["inverse", "cholesky"] = "inverse"  # [H⁻¹]ᵢᵢ as eq. 4 writes, or BiLLM's Cholesky-factor diagonal
    thresholds: tuple[int, ...] | None = None  # p values of the compactness table (default 1..number of sources)
    resamples: int = 0  # > 1: also intra-source compactness over this many disjoint resamples of each source
    group_size: int = 128  # columns sharing one scale/zero inside the 3-bit and 2-bit classes
    dense_position: Literal["last", "first"] = "last"  # where GPTQ processes the fp16 columns
    target_bits: float = 3.0  # sorted: mean code bits, in (2 + 14 * critical_share, 4]
    critical_share: float = 0.01  # sorted: share of columns kept in fp16


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizationConfig:
    # none: keep the model as loaded; rtn: round-to-nearest; gptq: GPTQ on calibration Hessians;
    # amlq: AMLQ/AMQ mixed precision under a BPW budget (section `amlq`); tammp: TAMMP's
    # multi-source critical columns, fp16 / 3-bit / 2-bit (section `tammp`)
    method: Literal["none", "rtn", "gptq", "amlq", "tammp"] = "rtn"
    bits: int = 4  # bit width of every block linear (2..8)
    group_size: int = 128  # input columns sharing one scale/zero; the last group may be shorter
    symmetric: bool = False  # symmetric grid (zero fixed at 2^(bits-1)) instead of min-max
    act_order: bool = True  # gptq: process columns by descending Hessian diagonal
    static_groups: bool = True  # gptq: groups of consecutive ORIGINAL columns, grids from the original weights
    percdamp: float = 0.01  # gptq: damping added to diag(H), relative to its mean
    # gptq: which block outputs feed the next block; "fp" makes Hessians independent of the
    # quantization settings, so they are cached on disk (MPQ_CACHE_DIR) and shared across runs
    propagate: Literal["quantized", "fp"] = "quantized"
    amlq: AmlqConfig = dataclasses.field(default_factory=AmlqConfig)  # method amlq only (always fp statistics)
    tammp: TammpConfig = dataclasses.field(default_factory=TammpConfig)  # method tammp only (always fp statistics)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QatBlockConfig:
    # stage 1: each block's weights and quantization parameters trained to reproduce the FP
    # block's output (MSE), fed with the quantized model's hidden states
    enabled: bool = True
    samples: int = 64  # training windows (of qat.seq_len tokens); the paper uses 4096 x 2048
    epochs: int = 2  # passes over the windows per block
    batch_size: int = 2  # windows per step
    lr_weight: float = 2e-5  # master weights, dense (critical) columns, low-rank factors, bias
    lr_quant: float = 1e-4  # scales and zero points; both decay by cosine to lr/20 over a block


@dataclasses.dataclass(frozen=True, kw_only=True)
class QatE2eConfig:
    # stage 2: next-token loss of the whole model, only the trainable set moving
    enabled: bool = True
    samples: int = 64  # training windows (of qat.seq_len tokens); the paper uses 50,000 x 2048
    epochs: int = 1
    batch_size: int = 1  # windows per forward pass
    effective_batch: int = 32  # windows per optimizer step (gradients accumulated over batch_size passes)
    # paper: TAMMP's critical (16-bit) columns and every scale; step_sizes: scales only (EfficientQAT's E2E-QP)
    trainable: Literal["paper", "step_sizes"] = "paper"
    lr: float = 2e-5  # scales (step sizes)
    lr_weight: float = 2e-5  # critical columns
    warmup: float = 0.03  # share of optimizer steps warming up linearly, then cosine to lr/20
    clip_norm: float = 1.0  # global gradient-norm clip (0 = off)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QatConfig:
    # quantization-aware training of whatever the method produced (mpq_jax.qat)
    enabled: bool = False
    sources: tuple[str, ...] | None = None  # training text: calibration sources (default: calibration.sources)
    seq_len: int = 512  # tokens per training window
    seed: int = 0  # windows drawn and batch order
    dtype: Literal["float32", "bfloat16"] = "float32"  # master weights and activations while training
    checkpoint_dir: str | None = None  # training state, for resuming a killed run (default: output_dir/.qat)
    checkpoint_every: int = 20  # steps between checkpoints (0 = at stage and block ends only)
    block: QatBlockConfig = dataclasses.field(default_factory=QatBlockConfig)
    e2e: QatE2eConfig = dataclasses.field(default_factory=QatE2eConfig)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityConfig:
    enabled: bool = True  # evaluate perplexity after quantizing
    # texts to score: wikitext2 (the test text) and/or a calibration source's heldout split
    # (web, wikipedia, code, qa, arxiv: $MPQ_SHARED_DIR/data/corpora/sources/<name>/heldout.jsonl)
    # and/or your own file: an entry ending in .txt or .jsonl or containing "/" is a path
    # (relative to the current directory), a .txt file one text, a .jsonl file one JSON object
    # per line with the text under "text"; reported under the path as written
    sets: tuple[str, ...] = ("wikitext2",)
    seq_len: int = 2048  # tokens per non-overlapping window
    max_windows: int = 0  # first K windows of each set only (0 = all; WikiText-2 has ~147 at 2048)
    batch_size: int = 1  # windows per forward pass
    wikitext2_path: str | None = None  # default: $MPQ_SHARED_DIR/data/corpora/wikitext2/wiki.test.txt


@dataclasses.dataclass(frozen=True, kw_only=True)
class TasksConfig:
    # lm-eval task names or tags from include_path (local_tasks = the nine zero-shot
    # multiple-choice tasks, local_tasks_extra = LAMBADA, GSM8K, NQ-open, SQuAD, MathQA;
    # local_code = MBPP, see allow_code_execution); empty = no downstream tasks
    names: tuple[str, ...] = ()
    limit: int = 0  # first N documents of each task (0 = all)
    limits: dict[str, int] | None = None  # per-task limit overriding `limit`, e.g. {local_gsm8k: 20}
    include_path: str | None = None  # folder of task YAMLs; default $MPQ_SHARED_DIR/data/tasks/lm_eval
    num_fewshot: int | None = None  # None = each task's own setting
    batch_size: int = 16  # requests per forward pass (fewer for long ones, see batch_tokens)
    batch_tokens: int = 8192  # padded tokens per forward pass at most
    max_length: int = 2048  # context of the lm-eval model (left-truncated beyond it)
    allow_code_execution: bool = False  # run tasks that execute model-written code (local_mbpp); not sandboxed


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    perplexity: PerplexityConfig = dataclasses.field(default_factory=PerplexityConfig)
    tasks: TasksConfig = dataclasses.field(default_factory=TasksConfig)
    # also evaluate the unquantized model (cached on disk per model and eval settings) and
    # report the retained fraction quantized / FP
    compare_fp: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    # a device mesh for calibration capture and QAT (mpq_jax.parallel); off = one device
    enabled: bool = False
    data: int = -1  # devices along the data axis (-1 = every device the model axis leaves)
    model: int = 1  # devices along the model (tensor-parallel) axis
    fsdp: bool = False  # also shard parameters and optimizer state over the data axis
    # several processes (hosts): "auto" starts jax.distributed when coordinator_address is
    # set or a cluster's variables are (TPU pod, SLURM, Open MPI); "on" always; "off" never
    distributed: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str | None = None  # host:port of process 0 (default: found by JAX)
    num_processes: int | None = None  # with coordinator_address
    process_id: int | None = None  # with coordinator_address; this process's index


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: str = "smollm2-135m-instruct"  # HF directory, .gguf file, or the default model's name
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of params and activations
    output_dir: str = "runs/default"  # where the packed model and the reports are written
    save_model: bool = True  # write the packed model to output_dir/model
    quantization: QuantizationConfig = dataclasses.field(default_factory=QuantizationConfig)
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)  # gptq only
    qat: QatConfig = dataclasses.field(default_factory=QatConfig)  # after any method, before saving
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)  # mesh and processes
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(v) for v in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return parse_section(annotation, value, where)
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if isinstance(annotation, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _check_value(value, inner, where)
    if origin is tuple:
        # tuple[T, ...] from a YAML list (or a single scalar, read as a one-element list)
        (item_type, _ellipsis) = typing.get_args(annotation)
        items = value if isinstance(value, list) else [value]
        return tuple(_check_value(item, item_type, f"{where}[{i}]") for i, item in enumerate(items))
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {
            _check_value(k, key_type, f"{where} key"): _check_value(v, value_type, f"{where}.{k}") for k, v in value.items()
        }
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is a subclass of int: `bits: true` must not pass as 1.
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    return value


def parse_section(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, naming `where.key` in every error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where + '.' if where else ''}{unknown[0]}: unknown field; allowed fields: {', '.join(fields)}"
        )
    values = {name: _check_value(value, hints[name], f"{where + '.' if where else ''}{name}") for name, value in data.items()}
    return cls(**values)


def validate(config: RunConfig) -> RunConfig:
    """Range checks that types alone cannot express."""
    q = config.quantization
    if q.method in ("rtn", "gptq") and not 2 <= q.bits <= 8:
        raise ConfigError(f"quantization.bits: {q.bits} is out of range; {q.method} supports 2..8")
    if q.method == "amlq":
        _validate_amlq(q.amlq)
    if q.method == "tammp":
        _validate_tammp(q.tammp, config.calibration.sources, config.calibration.n_samples)
    if not q.percdamp > 0:
        raise ConfigError(f"quantization.percdamp: must be positive, got {q.percdamp}")
    cal = config.calibration
    if cal.n_samples < 1 or cal.seq_len < 2:
        raise ConfigError("calibration: n_samples must be >= 1 and seq_len >= 2")
    if q.group_size < 1:
        raise ConfigError(f"quantization.group_size: must be a positive number of columns, got {q.group_size}")
    if config.qat.enabled:
        _validate_qat(config.qat, config.calibration.sources, q.method)
    _validate_parallel(config.parallel)
    ppl = config.eval.perplexity
    if ppl.seq_len < 2:
        raise ConfigError(f"eval.perplexity.seq_len: must be at least 2, got {ppl.seq_len}")
    if ppl.max_windows < 0 or ppl.batch_size < 1:
        raise ConfigError("eval.perplexity: max_windows must be >= 0 and batch_size >= 1")
    _validate_perplexity_sets(ppl.sets)
    tasks = config.eval.tasks
    if tasks.limit < 0 or any(v < 0 for v in (tasks.limits or {}).values()):
        raise ConfigError("eval.tasks.limit / limits: a number of documents >= 0 (0 = all)")
    if tasks.batch_size < 1 or tasks.batch_tokens < 1 or tasks.max_length < 16:
        raise ConfigError("eval.tasks: batch_size and batch_tokens must be >= 1 and max_length >= 16")
    return config


def _validate_perplexity_sets(sets: tuple[str, ...]) -> None:
    from mpq_jax.data.calibration import DEFAULT_SOURCE_NAMES
    from mpq_jax.data.text import names_text_file

    allowed = ("wikitext2",) + DEFAULT_SOURCE_NAMES
    for name in sets:
        if name not in allowed and not names_text_file(name):
            raise ConfigError(
                f"eval.perplexity.sets: unknown set {name!r}; choose from {', '.join(allowed)}, "
                "or give the path of a .txt or .jsonl file"
            )
    # "notes.txt" and "./notes.txt" are one file (the files themselves are checked by pre-flight)
    keys = [str(Path(name).expanduser()) if names_text_file(name) else name for name in sets]
    if len(set(keys)) != len(keys):
        raise ConfigError("eval.perplexity.sets: a set is listed twice")


def _validate_amlq(a: AmlqConfig) -> None:
    from mpq_jax.quant.amlq import presets_from_config  # the method owns what a preset may be

    if not 1.0 < a.target_bpw <= 16.0:
        raise ConfigError(f"quantization.amlq.target_bpw: {a.target_bpw} is out of range (1, 16]")
    try:
        presets_from_config(a.presets)
    except ValueError as exc:
        raise ConfigError(f"quantization.amlq.presets: {exc}") from None
    if a.alpha_grid is not None and (not a.alpha_grid or any(not 0 <= x <= 1 for x in a.alpha_grid)):
        raise ConfigError("quantization.amlq.alpha_grid: give one or more strengths in [0, 1]")
    if a.lowrank_bpw is not None and any(not x > 0 for x in a.lowrank_bpw):
        raise ConfigError("quantization.amlq.lowrank_bpw: extra bits per weight must be positive")


def _validate_tammp(t: TammpConfig, calibration_sources: tuple[str, ...], n_samples: int) -> None:
    where = "quantization.tammp"
    sources = t.sources if t.sources is not None else calibration_sources
    unknown = [s for s in sources if s not in calibration_sources]
    if unknown:
        raise ConfigError(
            f"{where}.sources: {', '.join(unknown)} not in calibration.sources ({', '.join(calibration_sources)}); "
            "add them there or remove them here"
        )
    if len(set(sources)) != len(sources) or not sources:
        raise ConfigError(f"{where}.sources: give one or more distinct calibration sources")
    if t.strategy == "smp" and len(sources) != 1:
        raise ConfigError(f"{where}.sources: strategy smp probes exactly one source, got {len(sources)}; e.g. sources: [code]")
    if t.strategy in ("strategy1", "strategy2") and len(sources) < 2:
        raise ConfigError(
            f"{where}.sources: {t.strategy} intersects the critical columns of two or more sources; "
            "use strategy smp for a single source"
        )
    for name in ("topk", "block_size", "group_size"):
        if getattr(t, name) < 1:
            raise ConfigError(f"{where}.{name}: must be a positive integer, got {getattr(t, name)}")
    if t.topk > t.block_size:
        raise ConfigError(f"{where}.topk: {t.topk} is more than the block of {t.block_size} columns")
    if t.thresholds is not None and (not t.thresholds or any(not 1 <= p <= len(sources) for p in t.thresholds)):
        raise ConfigError(f"{where}.thresholds: each p must be in 1..{len(sources)} (the number of sources)")
    if t.resamples == 1 or t.resamples < 0:
        raise ConfigError(f"{where}.resamples: 0 (off) or at least 2 disjoint resamples per source, got {t.resamples}")
    if t.resamples > n_samples:
        raise ConfigError(
            f"{where}.resamples: {t.resamples} disjoint resamples need at least as many windows per source; "
            f"raise calibration.n_samples (now {n_samples}) or lower resamples"
        )
    if not 0 <= t.critical_share < 1:
        raise ConfigError(f"{where}.critical_share: a share of columns in [0, 1), got {t.critical_share}")
    low = 2 + 14 * t.critical_share
    if t.strategy == "sorted" and not low <= t.target_bits <= 4 + 12 * t.critical_share:
        raise ConfigError(
            f"{where}.target_bits: {t.target_bits} is out of reach with critical_share {t.critical_share}: "
            f"choose {low:.3f} to {4 + 12 * t.critical_share:.3f}"
        )


def _validate_parallel(par: ParallelConfig) -> None:
    if par.model < 1 or (par.data < 1 and par.data != -1):
        raise ConfigError(f"parallel: data ({par.data}) and model ({par.model}) are device counts >= 1 (data may be -1: the rest)")
    named = [par.coordinator_address is not None, par.num_processes is not None, par.process_id is not None]
    if any(named) and not all(named):
        raise ConfigError("parallel: coordinator_address, num_processes and process_id go together; set all three or none")
    if par.num_processes is not None and not 0 <= (par.process_id or 0) < par.num_processes:
        raise ConfigError(f"parallel.process_id: {par.process_id} is not in 0..{par.num_processes - 1}")
    if par.distributed == "off" and par.coordinator_address is not None:
        raise ConfigError("parallel.distributed: off, but coordinator_address is set; remove one")


def _validate_qat(qat: QatConfig, calibration_sources: tuple[str, ...], method: str) -> None:
    where = "qat"
    if method == "none":
        raise ConfigError(f"{where}.enabled: method none leaves nothing quantized to train; choose a method or disable qat")
    if not (qat.block.enabled or qat.e2e.enabled):
        raise ConfigError(f"{where}: enabled with both stages off; enable qat.block or qat.e2e, or set qat.enabled: false")
    sources = qat.sources if qat.sources is not None else calibration_sources
    if not sources or len(set(sources)) != len(sources):
        raise ConfigError(f"{where}.sources: give one or more distinct sources")
    if qat.seq_len < 2:
        raise ConfigError(f"{where}.seq_len: must be at least 2 tokens, got {qat.seq_len}")
    if qat.checkpoint_every < 0:
        raise ConfigError(f"{where}.checkpoint_every: steps >= 0 (0 = at stage ends only), got {qat.checkpoint_every}")
    for stage, cfg in (("block", qat.block), ("e2e", qat.e2e)):
        if not cfg.enabled:
            continue
        for name in ("samples", "epochs", "batch_size"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{where}.{stage}.{name}: must be a positive integer, got {getattr(cfg, name)}")
        if cfg.batch_size > cfg.samples:
            raise ConfigError(f"{where}.{stage}.batch_size: {cfg.batch_size} is more than the {cfg.samples} samples")
        rates = ("lr_weight", "lr_quant") if stage == "block" else ("lr", "lr_weight")
        for name in rates:
            if not 0 <= getattr(cfg, name) < 1:
                raise ConfigError(f"{where}.{stage}.{name}: a learning rate in [0, 1), got {getattr(cfg, name)}")
    e2e = qat.e2e
    if e2e.enabled:
        if e2e.effective_batch < e2e.batch_size or e2e.effective_batch % e2e.batch_size:
            raise ConfigError(
                f"{where}.e2e.effective_batch: {e2e.effective_batch} must be a multiple of batch_size {e2e.batch_size} "
                "(gradients are accumulated over whole forward passes)"
            )
        if e2e.effective_batch > e2e.samples * e2e.epochs:
            raise ConfigError(
                f"{where}.e2e.effective_batch: {e2e.effective_batch} windows per step but only "
                f"{e2e.samples * e2e.epochs} in the stage; raise e2e.samples or lower effective_batch"
            )
        if not 0 <= e2e.warmup < 1:
            raise ConfigError(f"{where}.e2e.warmup: a share of the steps in [0, 1), got {e2e.warmup}")
        if e2e.clip_norm < 0:
            raise ConfigError(f"{where}.e2e.clip_norm: >= 0 (0 = off), got {e2e.clip_norm}")


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run configuration."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        # Most likely a file saved empty by mistake; a silent full default job (all of
        # WikiText-2 and the FP baseline into runs/default) would cost tens of minutes.
        raise ConfigError(
            f"{path}: the config file is empty; start from one in configs/ (e.g. configs/smollm2-135m-rtn-4bit.yaml), "
            "or write `{}` to run with every default"
        )
    try:
        return validate(parse_section(RunConfig, data, ""))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
