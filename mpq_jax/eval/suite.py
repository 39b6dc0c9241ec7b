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

import numpy as np

from mpq_jax.config import EvalConfig
from mpq_jax.data.calibration import heldout_path, heldout_tokens
from mpq_jax.data.paths import cache_dir
from mpq_jax.data.text import TEXT_FILE_SUFFIXES, names_text_file, read_jsonl, token_stream
from mpq_jax.errors import ConfigError, EvaluationError
from mpq_jax.eval.downstream import capability_table, default_include_path, resolve_tasks, run_tasks, task_manager, task_table
from mpq_jax.eval.perplexity import make_windows, perplexity, resolve_wikitext2_path, wikitext2_tokens
from mpq_jax.fingerprint import eval_fingerprint, folder_files
from mpq_jax.models.checkpoint import LoadedModel
from mpq_jax.output import atomic_write_text

log = logging.getLogger(__name__)


TEXT_SET_FIELD = "text"  # the JSON key holding each text of a user's .jsonl perplexity set


def check_inputs(config: EvalConfig, tokenizer=None) -> None:
    """Fail before any heavy work when an evaluation input is missing or misnamed.

    A user's text file set (`names_text_file`) is read here: present, UTF-8, every .jsonl line
    a JSON object with a "text" field, and long enough for one window. With `tokenizer` the
    length is counted in tokens, exactly; without one (pre-flight runs before any tokenizer is
    loaded) a file of fewer UTF-8 bytes than `seq_len` is refused, since tokenizers make at most
    about one token per byte, and a file that is longer but still short of a window is named when
    it is tokenized for scoring.
    """
    ppl = config.perplexity
    if ppl.enabled:
        for name in ppl.sets:
            if name == "wikitext2":
                resolve_wikitext2_path(ppl.wikitext2_path)
            elif names_text_file(name):
                if tokenizer is not None:
                    _set_windows(tokenizer, name, config)
                else:
                    _check_text_file_bytes(name, _text_file_documents(name), ppl.seq_len)
            elif not heldout_path(name).is_file():
                raise ConfigError(f"eval.perplexity.sets: {name}'s heldout split {heldout_path(name)} not found")
    if config.tasks.names:
        # also refuses code-executing tasks (MBPP) unless eval.tasks.allow_code_execution
        resolve_tasks(task_manager(config.tasks.include_path), config.tasks.names, config.tasks.allow_code_execution)


def _text_file_path(name: str) -> Path:
    """The file a user's perplexity set names: `~` expanded, a relative path read from the current directory."""
    return Path(name).expanduser()


def _text_file_documents(name: str) -> list[str]:
    """The texts of the user's perplexity set `name`: a .txt file is one text, a .jsonl file one
    text per line (its "text" field)."""
    path = _text_file_path(name)
    where = f"eval.perplexity.sets: {name}"
    if not path.is_file():
        problem = "is not a file" if path.exists() else "not found"
        relative = "" if path.is_absolute() else f" (a relative path is read from the current directory, {Path.cwd()})"
        raise ConfigError(
            f"{where}: {path.absolute()} {problem}{relative}; give the path of a .txt or .jsonl file, or remove the set"
        )
    suffix = path.suffix.lower()
    if suffix not in TEXT_FILE_SUFFIXES:
        raise ConfigError(
            f"{where}: cannot tell the format of {path} from its name; give a .txt file (one text) "
            f'or a .jsonl file (one JSON object per line, its text under "{TEXT_SET_FIELD}")'
        )
    try:
        if suffix == ".txt":
            return [path.read_text(encoding="utf-8")]
        return read_jsonl(path, TEXT_SET_FIELD, f'put each line\'s text under the key "{TEXT_SET_FIELD}"')
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path} ({exc.strerror or exc}); make it readable") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_text_file_bytes(name: str, documents: list[str], seq_len: int) -> None:
    # An upper bound on the token count: one per UTF-8 byte, plus the EOS between documents.
    most_tokens = sum(len(document.encode("utf-8")) + 1 for document in documents if document) - 1
    if most_tokens < seq_len:
        raise ConfigError(
            f"eval.perplexity.sets: {name}: {_text_file_path(name)} has {max(most_tokens, 0)} bytes of text, too short "
            f"for one window of eval.perplexity.seq_len={seq_len} tokens; add text or lower eval.perplexity.seq_len"
        )


def _set_tokens(tokenizer, name: str, config: EvalConfig) -> np.ndarray:
    if name == "wikitext2":
        return wikitext2_tokens(tokenizer, config.perplexity.wikitext2_path)
    if names_text_file(name):
        return token_stream(tokenizer, _text_file_documents(name))
    return heldout_tokens(tokenizer, name)


def _set_windows(tokenizer, name: str, config: EvalConfig) -> np.ndarray:
    """[n, seq_len] windows of perplexity set `name`: every set is cut as WikiText-2 is (`make_windows`)."""
    ppl = config.perplexity
    tokens = _set_tokens(tokenizer, name, config)
    try:
        return make_windows(tokens, ppl.seq_len, ppl.max_windows)
    except ConfigError as exc:
        raise ConfigError(f"eval.perplexity.sets: {name}: {exc}; add text or lower eval.perplexity.seq_len") from None


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
            windows = _set_windows(model.tokenizer, name, config)
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
            if name == "wikitext2":
                files.append(resolve_wikitext2_path(ppl.wikitext2_path))
            elif names_text_file(name):
                files.append(_text_file_path(name))
            else:
                files.append(heldout_path(name))
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
