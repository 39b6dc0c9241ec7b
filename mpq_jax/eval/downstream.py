"""Downstream tasks through lm-evaluation-harness, grouped into TAMMP's five capability dimensions.

`run_tasks` evaluates an `MpqJaxLM` on lm-eval tasks read only from a local folder of task
YAMLs (default: the shared `data/tasks/lm_eval`; lm-eval's built-in, hub-reading tasks are
not indexed), and returns one headline score per task, as a fraction in 0..1 (SQuAD's
exact/F1, which lm-eval reports in percent, are divided by 100, so that a dimension's mean
never mixes scales). `capability_table` and `task_table` put a quantized model's scores
beside the unquantized model's with the retained fraction (quantized / FP), the measure
TAMMP reports per dimension.

Dimensions follow TAMMP's evaluation section: commonsense reasoning (PIQA, Social IQa,
HellaSwag, WinoGrande, ARC-c, ARC-e, OpenBookQA, CommonsenseQA), world knowledge (NQ-Open,
TriviaQA), reading comprehension (SQuAD, BoolQ), math (GSM8K, MathQA), code (MBPP). Only the
tasks with a local copy count: TriviaQA has none, and SQuAD is SQuAD 1.1 dev scored by
lm-eval's SQuAD 2.0 task. LAMBADA, which TAMMP does not use, is placed under reading
comprehension (predicting a passage's last word needs the whole passage).

A task that executes model-written code (lm-eval's `unsafe_code`, here MBPP) is refused by
`resolve_tasks` unless `allow_code_execution` is set (config `eval.tasks.allow_code_execution`);
with it, `run_tasks` sets `HF_ALLOW_CODE_EVAL=1` for the run and confirms lm-eval's
unsafe-code prompt.

Not for: the lm-eval model itself (`mpq_jax.eval.harness`) or perplexity.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

from mpq_jax.data.paths import shared_dir
from mpq_jax.errors import ConfigError

log = logging.getLogger(__name__)

CAPABILITIES: dict[str, tuple[str, ...]] = {
    "commonsense reasoning": (
        "local_piqa",
        "local_social_iqa",
        "local_hellaswag",
        "local_winogrande",
        "local_arc_challenge",
        "local_arc_easy",
        "local_openbookqa",
        "local_commonsense_qa",
    ),
    "reading comprehension": ("local_boolq", "local_squad", "local_lambada_openai"),
    "world knowledge": ("local_nq_open",),  # TAMMP also uses TriviaQA (no local copy)
    "math": ("local_gsm8k", "local_mathqa"),
    "code": ("local_mbpp",),
}
OTHER = "other"  # tasks outside the five dimensions

# The headline metric of a task, as lm-eval names it; accuracy unless listed.
TASK_METRIC = {
    "local_gsm8k": "exact_match,strict-match",
    "local_nq_open": "exact_match,remove_whitespace",
    # F1, not exact match: an instruct model answers in sentences, which exact match scores 0
    "local_squad": "f1,none",
    "local_mbpp": "pass_at_1,none",
}
DEFAULT_METRIC = "acc,none"
# Tasks whose headline lm-eval reports in percent (0..100); divided by 100 here.
PERCENT_TASKS = frozenset({"local_squad"})


def capability_of(task: str) -> str:
    for dimension, tasks in CAPABILITIES.items():
        if task in tasks:
            return dimension
    return OTHER


def default_include_path() -> Path:
    return shared_dir() / "data" / "tasks" / "lm_eval"


def task_manager(include_path: str | Path | None = None):
    """lm-eval's TaskManager over the local task folder only (indexed once per folder)."""
    return _task_manager(Path(include_path) if include_path else default_include_path())


@functools.lru_cache(maxsize=4)
def _task_manager(path: Path):
    from lm_eval.tasks import TaskManager

    if not path.is_dir():
        raise ConfigError(f"eval.tasks.include_path: {path} is not a folder of lm-eval task YAMLs")
    # Local loaders only: no dataset may come from a hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return TaskManager(include_path=str(path), include_defaults=False)


def resolve_tasks(manager, names: tuple[str, ...] | list[str], allow_code_execution: bool = False) -> list[str]:
    """Task names with tags (e.g. `local_tasks`) expanded, in the given order, each once.
    A task that executes model-written code is an error unless `allow_code_execution`."""
    index = manager.task_index
    resolved: list[str] = []
    for name in names:
        if name in manager.all_subtasks:
            members = [name]
        elif name in manager.all_tags:
            members = sorted(task for task, entry in index.items() if name in entry.tags)
        else:
            raise ConfigError(
                f"eval.tasks.names: unknown task {name!r}; local tasks: {', '.join(manager.all_subtasks)}; "
                f"tags: {', '.join(manager.all_tags)}"
            )
        resolved += [task for task in members if task not in resolved]
    unsafe = [task for task in resolved if executes_code(manager, task)]
    if unsafe and not allow_code_execution:
        raise ConfigError(
            f"eval.tasks.names: {', '.join(unsafe)} runs model-written code on this machine to score it "
            "(not sandboxed); set eval.tasks.allow_code_execution: true to run it where that is acceptable, "
            "or leave it out"
        )
    return resolved


def executes_code(manager, task: str) -> bool:
    """Whether lm-eval's config of `task` marks it `unsafe_code` (it runs the model's output)."""
    return bool((getattr(manager.task_index[task], "cfg", None) or {}).get("unsafe_code"))


def run_tasks(
    lm,
    names: tuple[str, ...] | list[str],
    limit: int = 0,
    limits: dict[str, int] | None = None,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    manager=None,
    allow_code_execution: bool = False,
) -> dict[str, dict]:
    """{task: {"metric", "value", "stderr", "samples", "dimension"}} for every task in `names`.

    `limit` is the number of documents per task (the first ones; 0 = all), `limits`
    overrides it per task. Tasks sharing a limit run in one lm-eval call.
    `allow_code_execution` lets tasks run model-written code (see `resolve_tasks`).
    """
    from lm_eval import simple_evaluate

    manager = manager or task_manager(include_path)
    tasks = resolve_tasks(manager, names, allow_code_execution)
    by_limit: dict[int, list[str]] = {}
    for task in tasks:
        by_limit.setdefault((limits or {}).get(task, limit), []).append(task)
    scores: dict[str, dict] = {}
    with _code_eval_allowed(allow_code_execution):
        for task_limit, group in by_limit.items():
            log.info("lm-eval: %s (limit %s)", ", ".join(group), task_limit or "none")
            output = simple_evaluate(
                model=lm,
                tasks=group,
                task_manager=manager,
                limit=task_limit or None,
                num_fewshot=num_fewshot,
                log_samples=False,
                bootstrap_iters=0,  # stderr from the closed form, not resampling (seconds per task)
                confirm_run_unsafe_code=allow_code_execution,
            )
            for task in group:
                scores[task] = headline_score(task, output["results"][task], output["n-samples"][task]["effective"])
    return {task: scores[task] for task in tasks}


@contextlib.contextmanager
def _code_eval_allowed(allowed: bool):
    """HF_ALLOW_CODE_EVAL=1 during the run when allowed (the code-eval loaders and metric
    read it), the previous value restored after."""
    previous = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allowed:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        if allowed and previous is None:
            del os.environ["HF_ALLOW_CODE_EVAL"]
        elif allowed:
            os.environ["HF_ALLOW_CODE_EVAL"] = previous


def headline_score(task: str, results: dict, samples: int) -> dict:
    metric = TASK_METRIC.get(task, DEFAULT_METRIC)
    if metric not in results:
        raise ConfigError(f"lm-eval task {task} reports no {metric} (it reports {', '.join(results)})")
    name, _, filter_name = metric.partition(",")
    stderr = results.get(f"{name}_stderr,{filter_name}")
    scale = 0.01 if task in PERCENT_TASKS else 1.0
    return {
        "metric": metric,
        "value": float(results[metric]) * scale,
        "stderr": float(stderr) * scale if isinstance(stderr, (int, float)) else None,
        "samples": int(samples),
        "dimension": capability_of(task),
    }


def retained(quantized: float | None, fp: float | None) -> float | None:
    """quantized / FP, or None where the FP score is zero or missing (nothing to retain)."""
    if quantized is None or not fp:
        return None
    return quantized / fp


def task_table(quantized: dict[str, dict], fp: dict[str, dict] | None) -> list[dict]:
    """One row per task: dimension, metric, FP, quantized, retained."""
    rows = []
    for task, score in quantized.items():
        fp_value = fp[task]["value"] if fp and task in fp else None
        rows.append(
            {
                "task": task,
                "dimension": score["dimension"],
                "metric": score["metric"],
                "samples": score["samples"],
                "fp": fp_value,
                "quantized": score["value"],
                "retained": retained(score["value"], fp_value),
            }
        )
    return rows


def capability_table(quantized: dict[str, dict], fp: dict[str, dict] | None) -> list[dict]:
    """One row per dimension (the five, then `other` if used): mean score over its evaluated
    tasks for FP and quantized, and retained = mean quantized / mean FP. A dimension with no
    evaluated task has tasks [] and no scores."""
    dimensions = list(CAPABILITIES) + ([OTHER] if any(s["dimension"] == OTHER for s in quantized.values()) else [])
    rows = []
    for dimension in dimensions:
        tasks = [task for task, score in quantized.items() if score["dimension"] == dimension]
        quant_mean = _mean([quantized[t]["value"] for t in tasks])
        fp_mean = _mean([fp[t]["value"] for t in tasks]) if fp and all(t in fp for t in tasks) else None
        rows.append(
            {
                "dimension": dimension,
                "tasks": tasks,
                "fp": fp_mean,
                "quantized": quant_mean,
                "retained": retained(quant_mean, fp_mean),
            }
        )
    return rows


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
