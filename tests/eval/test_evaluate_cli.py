"""The evaluation stage end to end on a tiny Llama with the real tokenizer: quantize with
perplexity sets and lm-eval tasks beside the FP baseline, then `python -m mpq_jax.evaluate`
on the saved packed model reproduces the same numbers."""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("lm_eval")

RUN_CONFIG = {
    "quantization": {"method": "rtn", "bits": 3, "group_size": 32},
    "eval": {
        "perplexity": {"sets": ["wikitext2", "code"], "seq_len": 64, "max_windows": 2},
        "tasks": {"names": ["local_arc_easy", "local_boolq"], "limit": 3, "limits": {"local_boolq": 2}, "max_length": 128},
    },
}


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory, shared_dir):
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    from mpq_jax.quantize import main

    root = tmp_path_factory.mktemp("eval-cli")
    patch = pytest.MonkeyPatch()
    patch.setenv("MPQ_CACHE_DIR", str(root / "cache"))
    source = root / "tiny"
    tiny_checkpoints.write_tiny_checkpoint_with_real_tokenizer("llama", source)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(RUN_CONFIG))
    assert main(["--config", str(config), "--model", str(source), "--output", str(root / "out")]) == 0
    yield root, config, json.loads((root / "out" / "report.json").read_text())
    patch.undo()


def test_quantize_reports_tasks_and_sets_beside_the_fp_baseline(quantized_run):
    root, _, report = quantized_run
    evaluation = report["eval"]
    assert set(evaluation["quantized"]["perplexity"]) == {"wikitext2", "code"}
    assert report["perplexity"] == evaluation["quantized"]["perplexity"]["wikitext2"]
    assert {t: s["samples"] for t, s in evaluation["quantized"]["tasks"].items()} == {"local_arc_easy": 3, "local_boolq": 2}
    dimensions = {row["dimension"]: row for row in evaluation["capabilities"]}
    assert dimensions["commonsense reasoning"]["tasks"] == ["local_arc_easy"]
    assert dimensions["reading comprehension"]["tasks"] == ["local_boolq"]
    for row in evaluation["tasks"]:
        fp_value = evaluation["fp"]["tasks"][row["task"]]["value"]
        assert row["fp"] == fp_value and row["quantized"] == evaluation["quantized"]["tasks"][row["task"]]["value"]
        assert row["retained"] == (pytest.approx(row["quantized"] / fp_value) if fp_value else None)
    for row in evaluation["perplexity"]:
        assert row["ratio"] == pytest.approx(row["quantized"] / row["fp"])
    markdown = (root / "out" / "report.md").read_text()
    assert "## Capabilities" in markdown and "| world knowledge | not run |" in markdown and "| math | not run |" in markdown
    assert (root / "out" / "capabilities.png").stat().st_size > 0
    assert len(list((root / "cache" / "eval").glob("*.json"))) == 1  # the FP baseline, cached


def test_evaluate_cli_reproduces_the_run_on_the_packed_model(quantized_run, monkeypatch):
    from mpq_jax.evaluate import main

    root, config, report = quantized_run
    monkeypatch.setenv("MPQ_CACHE_DIR", str(root / "cache"))
    assert main(["--model", str(root / "out" / "model"), "--config", str(config), "--output", str(root / "again")]) == 0
    again = json.loads((root / "again" / "eval_report.json").read_text())["eval"]
    assert again["fp"] == report["eval"]["fp"]  # same model and settings: read from the cache
    for task, score in report["eval"]["quantized"]["tasks"].items():
        assert again["quantized"]["tasks"][task]["value"] == score["value"]
    for name, outcome in report["eval"]["quantized"]["perplexity"].items():
        assert again["quantized"]["perplexity"][name]["ppl"] == pytest.approx(outcome["ppl"], rel=1e-5)
    assert (root / "again" / "capabilities.png").is_file() and "## Perplexity" in (root / "again" / "eval_report.md").read_text()


def test_evaluate_cli_errors_name_the_fix(quantized_run, tmp_path, capsys):
    from mpq_jax.evaluate import main

    root, config, _ = quantized_run
    assert main(["--model", str(root / "tiny"), "--config", str(config), "--output", str(tmp_path)]) == 2
    assert "--fp-model SOURCE or --no-fp" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"eval": {"tasks": {"names": ["arc_easy"]}}}))
    assert main(["--model", str(root / "out" / "model"), "--config", str(bad), "--no-fp"]) == 2
    assert "unknown task 'arc_easy'" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["--model", str(root / "out" / "model"), "--config", str(config), "--output", str(blocker), "--no-fp"]) == 2
    assert "--output:" in (err := capsys.readouterr().err) and "is an existing file" in err
    assert main(["--model", str(tmp_path / "nowhere"), "--config", str(config), "--no-fp"]) == 2
    assert "--model: model" in capsys.readouterr().err
