"""Task resolution over the local task folder, and the FP-versus-quantized tables."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

from mpq_jax.errors import ConfigError  # noqa: E402
from mpq_jax.eval.downstream import CAPABILITIES, capability_table, resolve_tasks, task_manager, task_table  # noqa: E402


def _score(task: str, value: float, dimension: str) -> dict:
    return {"metric": "acc,none", "value": value, "stderr": None, "samples": 10, "dimension": dimension}


def test_tags_expand_to_their_tasks_and_unknown_names_are_named(shared_dir):
    manager = task_manager()
    tasks = resolve_tasks(manager, ["local_boolq", "local_tasks"])
    assert tasks[0] == "local_boolq" and len(tasks) == 9 and len(set(tasks)) == 9
    assert set(tasks) == set(CAPABILITIES["commonsense reasoning"]) | {"local_boolq"}
    assert resolve_tasks(manager, ["local_tasks_extra"]) == ["local_gsm8k", "local_lambada_openai"]
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
