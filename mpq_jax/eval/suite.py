"""The evaluation stage of a run: perplexity sets and lm-eval tasks, for a model and its FP baseline.

`evaluate(params, model, config)` scores `params` (quantized or not) with everything the
config's `eval:` section lists; `fp_baseline(model, config)` scores the unquantized model the
same way, cached on disk (`$MPQ_CACHE_DIR/eval/<fingerprint>.json`, keyed by the content of
the model's files, the eval settings and the evaluation files: `mpq_jax.fingerprint`) because
every run of the same model and settings would otherwise repeat it; `compare` puts the two side by side (retained fraction per task and dimension,
perplexity ratio per set). Used by `python -m mpq_jax.quantize` after quantizing and by
`python -m mpq_jax.evaluate` on a saved packed model.

Not for: the metrics themselves (`perplexity`, `downstream`, `harness`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

from mpq_jax.config import EvalConfig
from mpq_jax.data.calibration import heldout_path, heldout_tokens
from mpq_jax.data.paths import cache_dir
from mpq_jax.errors import ConfigError, EvaluationError
from mpq_jax.eval.downstream import capability_table, default_include_path, resolve_tasks, run_tasks, task_manager, task_table
from mpq_jax.eval.perplexity import make_windows, perplexity, resolve_wikitext2_path, wikitext2_tokens
from mpq_jax.fingerprint import eval_fingerprint, folder_files
from mpq_jax.models.checkpoint import LoadedModel
from mpq_jax.output import atomic_write_text

log = logging.getLogger(__name__)


def check_inputs(config: EvalConfig) -> None:
    """Fail before any heavy work when an evaluation input is missing or misnamed."""
    ppl = config.perplexity
    if ppl.enabled:
        for name in ppl.sets:
            if name == "wikitext2":
                resolve_wikitext2_path(ppl.wikitext2_path)
            elif not heldout_path(name).is_file():
                raise ConfigError(f"eval.perplexity.sets: {name}'s heldout split {heldout_path(name)} not found")
    if config.tasks.names:
        # also refuses code-executing tasks (MBPP) unless eval.tasks.allow_code_execution
        resolve_tasks(task_manager(config.tasks.include_path), config.tasks.names, config.tasks.allow_code_execution)


def _set_tokens(tokenizer, name: str, config: EvalConfig):
    if name == "wikitext2":
        return wikitext2_tokens(tokenizer, config.perplexity.wikitext2_path)
    return heldout_tokens(tokenizer, name)


def evaluate(params: dict, model: LoadedModel, config: EvalConfig, label: str = "model") -> dict:
    """{"perplexity": {set: PerplexityResult json}, "tasks": {task: score}, "seconds": {...}}."""
    result: dict = {"perplexity": {}, "tasks": {}, "seconds": {}}
    ppl = config.perplexity
    needs_text = (ppl.enabled and ppl.sets) or config.tasks.names
    if needs_text and model.tokenizer is None:
        raise ConfigError(
            f"eval: {model.source} has no tokenizer to read evaluation text with; "
            "add one to the checkpoint or turn evaluation off (eval.perplexity.enabled: false, eval.tasks.names: [])"
        )
    if ppl.enabled:
        for name in ppl.sets:
            start = time.perf_counter()
            windows = make_windows(_set_tokens(model.tokenizer, name, config), ppl.seq_len, ppl.max_windows)
            outcome = perplexity(params, model.spec, windows, batch_size=ppl.batch_size, desc=f"{label} ppl {name}")
            _refuse_non_finite(f"{label} perplexity on {name}", outcome.mean_nll, "mean log-likelihood")
            result["perplexity"][name] = outcome.to_json()
            result["seconds"][f"perplexity {name}"] = time.perf_counter() - start
    if config.tasks.names:
        from mpq_jax.eval.harness import MpqJaxLM  # imports lm-eval: only when tasks are asked for

        t = config.tasks
        start = time.perf_counter()
        lm = MpqJaxLM(
            model=dataclasses.replace(model, params=params),
            batch_size=t.batch_size,
            batch_tokens=t.batch_tokens,
            max_length=t.max_length,
        )
        result["tasks"] = run_tasks(
            lm,
            t.names,
            limit=t.limit,
            limits=t.limits,
            include_path=t.include_path,
            num_fewshot=t.num_fewshot,
            allow_code_execution=t.allow_code_execution,
        )
        for task, score in result["tasks"].items():
            _refuse_non_finite(f"{label} {task}", score["value"], score["metric"])
        result["seconds"]["tasks"] = time.perf_counter() - start
    return result


def _refuse_non_finite(what: str, value, name: str) -> None:
    """A NaN or infinite number is never a result: the model produces non-finite values."""
    if not math.isfinite(float(value)):
        raise EvaluationError(
            f"{what}: {name} is {value}, not a number; the model computes non-finite values (NaN or "
            "overflowing weights, activations or scales), so there is no result to report. Check the "
            "quantized weights (a damaged packed model is refused when loaded) or try float32"
        )


def eval_data_files(config: EvalConfig) -> list[Path]:
    """The text and task files an evaluation reads, so that its cache key covers their content."""
    files: list[Path] = []
    ppl = config.perplexity
    if ppl.enabled:
        for name in ppl.sets:
            files.append(resolve_wikitext2_path(ppl.wikitext2_path) if name == "wikitext2" else heldout_path(name))
    if config.tasks.names:
        files += folder_files(config.tasks.include_path or default_include_path())
    return files


def fp_baseline(model: LoadedModel, config: EvalConfig, model_identity: dict) -> dict:
    """`evaluate` of the unquantized model, read from the disk cache when already computed.

    `model_identity` is `mpq_jax.fingerprint.model_identity` of the model's files: the cache
    is keyed by their content, the eval settings and the evaluation files' content."""
    path = cache_dir() / "eval" / f"{eval_fingerprint(model_identity, config, eval_data_files(config))}.json"
    if path.is_file():
        log.info("FP baseline from cache %s", path)
        return json.loads(path.read_text(encoding="utf-8"))
    result = evaluate(model.params, model, config, label="fp")
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def compare(quantized: dict, fp: dict | None) -> dict:
    """The report's `eval` entry: both evaluations and side-by-side tables per perplexity set,
    per task and per capability dimension."""
    fp_tasks = fp["tasks"] if fp else None
    perplexity_rows = []
    for name, outcome in quantized["perplexity"].items():
        fp_ppl = fp["perplexity"][name]["ppl"] if fp and name in fp["perplexity"] else None
        perplexity_rows.append(
            {"set": name, "fp": fp_ppl, "quantized": outcome["ppl"], "ratio": outcome["ppl"] / fp_ppl if fp_ppl else None}
        )
    return {
        "quantized": quantized,
        "fp": fp,
        "perplexity": perplexity_rows,
        "tasks": task_table(quantized["tasks"], fp_tasks),
        "capabilities": capability_table(quantized["tasks"], fp_tasks) if quantized["tasks"] else [],
    }
