"""Bad input is refused before the first expensive step, with the field or file and the fix.

Each test gives `python -m mpq_jax.quantize` (or evaluate / generate) one bad input and
checks: exit status 2, a message naming what is wrong, and that no weights were loaded
(the loader is replaced by one that fails the test) and nothing half-written is left.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import mpq_jax.pipeline as pipeline
import mpq_jax.quantize as quantize_cli
from mpq_jax.data.paths import CACHE_ENV
from mpq_jax.errors import ConfigError


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any weights are loaded."""

    def refuse(*args, **kwargs):
        pytest.fail("weights were loaded before the bad input was found")

    monkeypatch.setattr(pipeline, "load_model", refuse)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny Llama folder with the real tokenizer (text pipelines run on it)."""
    tiny = pytest.importorskip("tests.tiny_checkpoints")
    folder = tmp_path_factory.mktemp("preflight") / "tiny"
    tiny.write_tiny_checkpoint_with_real_tokenizer("llama", folder)
    return folder


def run_cli(tmp_path, text: str, capsys, output=None) -> tuple[int, str]:
    config = tmp_path / "run.yaml"
    config.write_text(text)
    argv = ["--config", str(config)] + (["--output", str(output)] if output is not None else [])
    code = quantize_cli.main(argv)
    return code, capsys.readouterr().err


def test_output_path_that_is_a_file_fails_before_loading(tmp_path, capsys, no_loading, tiny_hf):
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    code, err = run_cli(tmp_path, f"model: {tiny_hf}\n", capsys, output=existing)
    assert code == 2 and "output_dir" in err and "is an existing file" in err
    assert existing.read_text() == "keep me"


def test_output_path_that_cannot_be_created_fails_before_loading(tmp_path, capsys, no_loading, tiny_hf):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = run_cli(tmp_path, f"model: {tiny_hf}\n", capsys, output=blocker / "sub" / "run")
    assert code == 2 and "cannot write into" in err and "choose a folder you can write to" in err


@pytest.mark.parametrize("name, method", [("model", "rtn"), (".resume", "gptq")])
def test_folder_the_run_writes_blocked_by_a_file_fails_before_loading(tmp_path, capsys, no_loading, tiny_hf, name, method):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text("")
    code, err = run_cli(tmp_path, f"model: {tiny_hf}\nquantization: {{method: {method}}}\n", capsys, output=out)
    assert code == 2 and f"{name} is a file where the run writes a folder" in err


def gptq_on_source(model, source) -> str:
    """A GPTQ config calibrated on one custom source `mine` at `source`."""
    return f"model: {model}\nquantization: {{method: gptq}}\ncalibration: {{sources: [mine], paths: {{mine: {source}}}}}\n"


def test_missing_calibration_file_fails_before_loading(tmp_path, capsys, no_loading, tiny_hf):
    text = gptq_on_source(tiny_hf, tmp_path / "nope.jsonl")
    code, err = run_cli(tmp_path, text, capsys, output=tmp_path / "out")
    assert code == 2 and "calibration source 'mine'" in err and "nope.jsonl not found" in err


def test_calibration_without_the_text_field_names_the_config_key(tmp_path, capsys, no_loading, tiny_hf):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"content": "some text"}) + "\n")
    text = gptq_on_source(tiny_hf, source)
    code, err = run_cli(tmp_path, text, capsys, output=tmp_path / "out")
    assert code == 2 and "set calibration.text_field" in err and "this record has: content" in err
    # ... and the key it names works.
    from mpq_jax.config import load_config

    (tmp_path / "ok.yaml").write_text(text.replace("}}\n", "}, text_field: content}\n"))
    assert load_config(tmp_path / "ok.yaml").calibration.text_field == "content"


def test_calibration_too_short_fails_before_the_weights_load(tmp_path, capsys, no_loading, tiny_hf):
    source = tmp_path / "short.jsonl"
    source.write_text(json.dumps({"text": "only a few words here"}) + "\n")
    code, err = run_cli(tmp_path, gptq_on_source(tiny_hf, source), capsys, output=tmp_path / "out")
    assert code == 2 and "calibration source 'mine'" in err and "ask for fewer samples" in err


def test_missing_tokenizer_fails_before_loading(tmp_path, capsys, no_loading):
    tiny = pytest.importorskip("tests.tiny_checkpoints")
    folder = tmp_path / "no-tokenizer"
    tiny.write_tiny_checkpoint("llama", folder, sharded=False)
    code, err = run_cli(tmp_path, f"model: {folder}\nquantization: {{method: gptq}}\n", capsys, output=tmp_path / "out")
    assert code == 2 and "has no tokenizer files" in err and "quantization.method gptq" in err
    code, err = run_cli(tmp_path, f"model: {folder}\n", capsys, output=tmp_path / "out")  # RTN, but evaluation reads text
    assert code == 2 and "has no tokenizer files" in err and "evaluation" in err


def test_unsupported_architecture_fails_from_the_config_alone(tmp_path, capsys, no_loading, tiny_hf):
    folder = tmp_path / "other"
    shutil.copytree(tiny_hf, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    code, err = run_cli(tmp_path, f"model: {folder}\n", capsys, output=tmp_path / "out")
    assert code == 2 and "config.json: architecture 'MistralForCausalLM' is not supported" in err


def test_missing_heldout_set_fails_before_loading(tmp_path, capsys, no_loading, tiny_hf, monkeypatch):
    from mpq_jax.eval import suite

    monkeypatch.setattr(suite, "heldout_path", lambda name: tmp_path / "gone" / name / "heldout.jsonl")
    code, err = run_cli(tmp_path, f"model: {tiny_hf}\neval: {{perplexity: {{sets: [code]}}}}\n", capsys, output=tmp_path / "out")
    assert code == 2 and "eval.perplexity.sets" in err and "heldout.jsonl not found" in err


def test_infeasible_amlq_budget_fails_before_measuring(tmp_path, capsys, no_loading, tiny_hf):
    text = f"model: {tiny_hf}\nquantization: {{method: amlq, amlq: {{target_bpw: 2.0}}}}\n"
    code, err = run_cli(tmp_path, text, capsys, output=tmp_path / "out")
    assert code == 2 and "quantization.amlq.target_bpw" in err and "reachable:" in err


def test_reachable_range_bounds_what_the_measured_candidates_store():
    """The range checked before measuring is what the candidates can store: the cheapest
    preset on every layer of a Llama with 576-wide layers, exactly (checked against
    QuantizedLinear storage in tests/quant/test_amlq.py), and the dearest above every one."""
    from mpq_jax.models.spec import spec_from_hf_config
    from mpq_jax.quant.amlq import DEFAULT_LOWRANK_BPW, DEFAULT_PRESETS
    from mpq_jax.quant.amlq_model import check_target_reachable, reachable_bpw

    spec = spec_from_hf_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 2,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 100,
            "rms_norm_eps": 1e-5,
        }
    )
    low, high = reachable_bpw(spec, DEFAULT_PRESETS, DEFAULT_LOWRANK_BPW)
    # 2-bit g128 everywhere: 2 bits a weight + 24 (fp16 scale, uint8 zero) per group and row
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    cheapest = sum(o * (2 * i + 24 * -(-i // 128)) for o, i in shapes) / sum(o * i for o, i in shapes)
    assert low == pytest.approx(cheapest, rel=1e-12)
    assert high > 4.9
    check_target_reachable(spec, low, DEFAULT_PRESETS, DEFAULT_LOWRANK_BPW)  # the lowest itself is fine
    with pytest.raises(ConfigError, match=rf"reachable: {cheapest:.3f} to about"):
        check_target_reachable(spec, 2.1, DEFAULT_PRESETS, DEFAULT_LOWRANK_BPW)


def test_packed_model_is_refused_up_front(tmp_path, capsys, no_loading):
    from mpq_jax.packed.io import save_quantized

    packed = tmp_path / "packed"
    save_quantized(packed, {"norm": {"weight": np.ones(4, np.float32)}}, {"spec": {}, "source": "/models/original", "run_config": {"quantization": {"method": "rtn"}}})
    code, err = run_cli(tmp_path, f"model: {packed}\n", capsys, output=tmp_path / "out")
    assert code == 2 and "is a packed mpq-jax model" in err and "model: /models/original" in err
    assert "python -m mpq_jax.evaluate" in err


def test_empty_config_is_refused(tmp_path, capsys, no_loading):
    code, err = run_cli(tmp_path, "", capsys)
    assert code == 2 and "the config file is empty" in err and not (tmp_path / "runs").exists()


def test_save_model_false_removes_an_earlier_runs_model(tmp_path, capsys):
    tiny = pytest.importorskip("tests.tiny_checkpoints")
    folder = tmp_path / "tiny"
    tiny.write_tiny_checkpoint("llama", folder, sharded=False)
    base = f"model: {folder}\nquantization: {{method: rtn, group_size: 32}}\neval: {{perplexity: {{enabled: false}}}}\n"
    out = tmp_path / "out"
    assert run_cli(tmp_path, base, capsys, output=out)[0] == 0 and (out / "model").is_dir()
    assert run_cli(tmp_path, base + "save_model: false\n", capsys, output=out)[0] == 0
    assert not (out / "model").exists() and "packed_model" not in json.loads((out / "report.json").read_text())


def test_non_finite_perplexity_is_an_error_and_the_model_is_kept(tmp_path, capsys, tiny_hf):
    folder = tmp_path / "nan"
    shutil.copytree(tiny_hf, folder)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.norm.weight"][:] = np.nan  # an FP model whose outputs are NaN
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    text = f"model: {folder}\nquantization: {{method: rtn, group_size: 32}}\neval: {{perplexity: {{seq_len: 64, max_windows: 1}}, compare_fp: false}}\n"
    code, err = run_cli(tmp_path, text, capsys, output=out)
    assert code == 2 and "perplexity on wikitext2" in err and "not a number" in err
    assert f"the quantized model is saved in {out / 'model'}" in err and (out / "model").is_dir()
    assert not (out / "report.json").exists()


def test_generate_refuses_an_empty_prompt_before_loading(monkeypatch, capsys):
    import mpq_jax.generate as generate_cli

    monkeypatch.setattr(generate_cli, "load_model", lambda *a, **k: pytest.fail("loaded"))
    assert generate_cli.main(["--model", "smollm2-135m-instruct", "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_truncated_gguf_is_explained(tmp_path):
    from mpq_jax.errors import CheckpointError
    from mpq_jax.models.checkpoint import default_model_path, load_model

    try:
        original = default_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(str(exc))
    cut = tmp_path / "cut.gguf"
    with original.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(50_000_000))
    with pytest.raises(CheckpointError, match="truncated or damaged .* copy or download it again"):
        load_model(cut)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_model(not_gguf)
    assert os.path.getsize(cut) == 50_000_000
