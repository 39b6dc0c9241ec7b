"""The benchmark scripts run end to end on the real model (tiny slices) and write the JSON
their docstrings promise."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses defined in the script look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_eval_ppl_with_torch_comparison(tmp_path, default_model, shared_dir, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "ppl.json"
    assert load_script("eval_ppl").main(["--seq-len", "128", "--max-windows", "2", "--compare-torch", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert (row["seq_len"], row["windows"]) == (128, 2)
    assert abs(row["ppl"] - row["torch_ppl"]) / row["torch_ppl"] < 1e-3
    assert row["tokens_per_s"] > 0 and row["torch_tokens_per_s"] > 0
    assert "transformers (torch)" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_ptq_rows(tmp_path, default_model, shared_dir, monkeypatch):
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    bench = load_script("bench_ptq")
    # The widest and narrowest RTN rows only (each row quantizes the whole model).
    assert bench.main(["--windows", "1", "--seq-len", "64", "--methods", "fp,rtn", "--bits", "8,2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    expected = [row for row in bench.ROWS if row[0] == "fp" or (row[0] == "rtn" and row[1] in (8, 2))]
    assert [(r["method"], r["bits"], r["group_size"]) for r in rows] == expected
    assert all({"method", "bits", "group_size", "bpw", "ppl", "seconds"} <= set(r) for r in rows)
    by_key = {(r["method"], r["bits"], r["group_size"]): r for r in rows}
    # fewer bits never store more, and 8-bit RTN stays close to FP even on one short window
    assert by_key[("rtn", 2, 64)]["bpw"] < by_key[("rtn", 8, 128)]["bpw"] < by_key[("rtn", 8, 64)]["bpw"]
    assert by_key[("rtn", 8, 64)]["ppl"] == pytest.approx(by_key[("fp", 32, 0)]["ppl"], rel=0.05)
    assert out.with_suffix(".png").stat().st_size > 0

    # One GPTQ row on a tiny calibration: the row is written and its Hessians were cached.
    argv = ["--windows", "1", "--seq-len", "64", "--methods", "gptq", "--bits", "4", "--groups", "64",
            "--calib-samples", "4", "--calib-seq-len", "64", "--json", str(out)]
    assert bench.main(argv) == 0
    (row,) = json.loads(out.read_text())
    assert (row["method"], row["bits"], row["group_size"]) == ("gptq", 4, 64) and row["ppl"] > 1
    assert len(list((tmp_path / "cache" / "hessians").glob("*/stats_*.npz"))) == default_model.spec.num_layers


def test_bench_attention_agrees_with_torch(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "attention.json"
    assert load_script("bench_attention").main(["--seq-len", "300", "--repeats", "2", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    # float32 softmax-weighted sums of unit-normal values: differences at rounding level
    assert row["max_abs_difference"] < 1e-4 and row["mpq_jax_s"] > 0 and row["torch_sdpa_s"] > 0


@pytest.mark.slow
def test_bench_ptq_peer_columns(tmp_path, default_model, shared_dir, monkeypatch):
    """--peer adds llm-compressor's GPTQ side by side (runs only where the compare extra is installed)."""
    pytest.importorskip("llmcompressor", reason='needs the compare extra: pip install -e ".[compare]"')
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "peer.json"
    # 8 x 128 calibration tokens: fewer leave GPTQ's Hessians so rank-deficient that two
    # correct implementations can land far apart.
    argv = ["--windows", "1", "--seq-len", "256", "--methods", "gptq", "--bits", "4", "--calib-samples", "8",
            "--calib-seq-len", "128", "--peer", "--json", str(out)]
    assert load_script("bench_ptq").main(argv) == 0
    rows = {r["group_size"]: r for r in json.loads(out.read_text())}
    assert "peer_ppl" not in rows[128]  # 576 inputs are not a multiple of 128: the peer refuses
    assert rows[64]["peer_ppl"] > 1 and rows[64]["peer_seconds"] > 0
    # Same scheme, same calibration: on one short window the two land close together.
    assert rows[64]["ppl"] == pytest.approx(rows[64]["peer_ppl"], rel=0.1)


def test_bench_kernels_cpu_correctness_path(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert load_script("bench_kernels").main(["--json", str(out)]) == 0
    assert "correctness path only" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert {r["backend"] for r in rows} == {"gpu", "tpu"} and {r["mix"] for r in rows} >= {"uniform-3", "amlq-like-r64"}
    assert all(r["interpret"] and r["max_rel_error"] < 1e-4 for r in rows)


def test_bench_amlq_rows_on_a_tiny_model(tmp_path, capsys):
    """Every row kind, exact budgets, the target checks and the plot, on a tiny Llama with
    the real tokenizer (the real-model passes are tested in tests/quant/test_amlq_model.py)."""
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    source = tmp_path / "tiny"
    tiny_checkpoints.write_tiny_checkpoint_with_real_tokenizer("llama", source, hidden_size=128, intermediate_size=256)
    out = tmp_path / "amlq.json"
    argv = ["--model", str(source), "--json", str(out), "--windows", "1", "--seq-len", "64", "--targets", "2.6,3.4",
            "--gptq-bits", "3", "--calib-samples", "2", "--calib-seq-len", "64", "--presets", "small", "--alpha-points", "2"]
    assert load_script("bench_amlq").main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["method"], r["target_bpw"]) for r in rows] == [
        ("fp", None), ("gptq", None), ("amq", 2.6), ("amlq", 2.6), ("amq", 3.4), ("amlq", 3.4)
    ]
    for row in rows:
        assert {"method", "target_bpw", "bpw", "ppl", "seconds"} <= set(row) and row["ppl"] > 1
        if row["target_bpw"] is not None:
            assert row["bpw"] <= row["target_bpw"] and row["seconds"] >= row["capture_seconds"] + row["measure_seconds"]
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "AMLQ <= AMQ at every budget" in printed and "3x GPTQ run wall time" in printed


def test_bench_eval_rows_on_a_tiny_model(tmp_path, shared_dir, capsys):
    pytest.importorskip("lm_eval")
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    source = tmp_path / "tiny"
    tiny_checkpoints.write_tiny_checkpoint_with_real_tokenizer("llama", source)
    out = tmp_path / "eval.json"
    argv = ["--model", str(source), "--methods", "fp,rtn3", "--limit", "1", "--gsm8k-limit", "1", "--json", str(out)]
    assert load_script("bench_eval").main(argv) == 0
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"fp", "rtn3"} and result["methods"]["rtn3"]["bpw"] < 4
    assert len(result["methods"]["fp"]["tasks"]) == 11 and all(row["samples"] == 1 for row in result["methods"]["rtn3"]["tasks"])
    for timing in ("mpq_jax_cold_seconds", "mpq_jax_warm_seconds", "hf_seconds"):
        assert set(result["speed"][timing]) == {"loglikelihood", "generation"} and min(result["speed"][timing].values()) > 0
    assert all(result["speed"]["same_scores"].values())
    assert out.with_suffix(".png").is_file() and "identical scores on every task: True" in capsys.readouterr().out


def test_bench_tammp_rows_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    """Every row kind of the TAMMP benchmark, the compactness table, the directions checked,
    the plot, and a second run that resumes from the JSON instead of recomputing, on a tiny
    Llama with the real tokenizer (quality is measured on the real model by the script)."""
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "tiny"
    tiny_checkpoints.write_tiny_checkpoint_with_real_tokenizer("llama", source, hidden_size=128, intermediate_size=256)
    out = tmp_path / "tammp.json"
    argv = ["--model", str(source), "--json", str(out), "--seq-len", "64", "--calib-seq-len", "32", "--calib-samples", "4",
            "--resamples", "2", "--windows", "1", "--heldout-windows", "1", "--alpha-points", "1", "--sorted", "3",
            "--ablations", "strategy1,strategy2"]
    assert load_script("bench_tammp").main(argv) == 0
    result = json.loads(out.read_text())
    methods = [r["method"] for r in result["rows"]]
    assert methods[:6] == ["fp", "strategy1", "strategy2", "smp-web", "smp-wikipedia", "smp-code"]
    assert "sorted-3" in methods and {"gptq-2bit-g128", "gptq-2bit-g64", "gptq-3bit-g128", "gptq-3bit-g64"} <= set(methods)
    assert sum(m.startswith("amlq-") for m in methods) == 2 and sum(m.startswith("amq-") for m in methods) == 2
    assert {r["method"] for r in result["ablations"]} == {f"strategy{s}-{v}" for s in (1, 2) for v in ("cholesky", "dense-first")}
    for row in result["rows"] + result["ablations"]:
        assert {"method", "bpw", "code_bpw", "ppl", "heldout", "heldout_mean"} <= set(row)
        assert set(row["heldout"]) == {"web", "wikipedia", "code", "qa", "arxiv"} and row["ppl"] > 1
    by = {r["method"]: r for r in result["rows"]}
    assert by["gptq-3bit-g64"]["code_bpw"] == 3.0 and by["sorted-3"]["code_bpw"] == pytest.approx(3.0, abs=0.01)
    assert set(result["compactness"]["inter"]) == {"1", "2", "3", "4", "5"}
    assert set(result["compactness"]["intra"]) == {"web", "wikipedia", "code", "qa", "arxiv"}
    assert out.with_suffix(".png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "inter-source compactness below intra-source" in printed and "Strategy 2 beats each SMP" in printed
    # Started again, it reuses every row it holds (the seconds of a recomputed row would change).
    assert load_script("bench_tammp").main(argv) == 0
    assert json.loads(out.read_text())["rows"] == result["rows"]
