"""The CLI end to end: config -> load -> RTN -> perplexity -> packed model + reports, and
the packed model reloads bit-identically (codes, scales, logits)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpq_jax.eval.perplexity import make_windows, perplexity
from mpq_jax.models import forward, load_model
from mpq_jax.packed.qlinear import QuantizedLinear
from mpq_jax.quantize import main


def packed_leaves(params):
    """Every array of every QuantizedLinear, in tree order, as numpy."""
    qlinears = [l for l in jax.tree_util.tree_leaves(params, is_leaf=lambda n: isinstance(n, QuantizedLinear)) if isinstance(l, QuantizedLinear)]
    return [np.asarray(a) for ql in qlinears for a in jax.tree_util.tree_leaves(ql)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_checkpoint_end_to_end(tmp_path, dtype):
    pytest.importorskip("torch")
    from tests.tiny_checkpoints import write_tiny_checkpoint

    source = tmp_path / "tiny"
    write_tiny_checkpoint("qwen2", source, sharded=True)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {source}\ndtype: {dtype}\nquantization:\n  method: rtn\n  bits: 3\n  group_size: 32\n"
        "eval:\n  perplexity:\n    enabled: false\n"
    )
    out = tmp_path / "out"
    assert main(["--config", str(config), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "rtn" and len(report["layers"]) == 2 * 7
    assert 3.0 < report["bits_per_weight"] < 4.5  # 3-bit codes + fp16 scales + zeros + fp16 q/k/v bias
    assert (out / "report.md").is_file() and (out / "layer_error.png").stat().st_size > 0

    original = load_model(source, dtype=dtype, with_tokenizer=False)
    reloaded = load_model(out / "model", dtype=dtype, with_tokenizer=False)
    assert reloaded.params["embed_tokens"]["weight"].dtype == jnp.dtype(dtype)
    assert reloaded.spec == original.spec
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, original.spec.vocab_size, (1, 33)))
    from mpq_jax.quant.rtn_model import quantize_model_rtn

    in_memory = quantize_model_rtn(original.params, 3, 32)
    for a, b in zip(packed_leaves(in_memory), packed_leaves(reloaded.params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        np.asarray(forward(in_memory, original.spec, tokens)), np.asarray(forward(reloaded.params, reloaded.spec, tokens))
    )


def test_bad_config_exits_with_a_message_and_writes_nothing(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("quantization:\n  method: gptq-ish\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "quantization.method" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_works(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--config" in capsys.readouterr().out


@pytest.mark.slow
def test_default_model_rtn_4bit_cli_and_reload(tmp_path, default_model, wikitext_tokens):
    """The README's main job on SmolLM2 (short windows): RTN 4-bit g128 runs, its report's
    perplexity is reproduced exactly by the reloaded packed model, and it is worse than FP."""
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: smollm2-135m-instruct\nquantization:\n  method: rtn\n  bits: 4\n  group_size: 128\n"
        "eval:\n  perplexity:\n    seq_len: 256\n    max_windows: 2\n"
    )
    out = tmp_path / "out"
    assert main(["--config", str(config), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    reloaded = load_model(out / "model")
    assert reloaded.tokenizer("The cat.", add_special_tokens=False)["input_ids"] == default_model.tokenizer(
        "The cat.", add_special_tokens=False
    )["input_ids"]
    windows = make_windows(wikitext_tokens, 256, 2)
    again = perplexity(reloaded.params, reloaded.spec, windows, progress=False)
    assert again.ppl == pytest.approx(report["perplexity"]["ppl"], rel=1e-6)
    fp = perplexity(default_model.params, default_model.spec, windows, progress=False)
    assert fp.ppl < again.ppl < 2 * fp.ppl
    assert 4.1 < report["bits_per_weight"] < 4.25


def test_missing_evaluation_text_fails_before_loading(tmp_path, capsys, monkeypatch):
    import mpq_jax.pipeline as pipeline

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing text was reported")

    monkeypatch.setattr(pipeline, "load_model", must_not_load)
    config = tmp_path / "run.yaml"
    config.write_text(f"eval:\n  perplexity:\n    wikitext2_path: {tmp_path / 'absent.txt'}\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "absent.txt" in capsys.readouterr().err
