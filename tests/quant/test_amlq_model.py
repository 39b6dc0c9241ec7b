"""AMLQ over whole models: the shipped config through the CLI on a tiny Qwen2 (biases) with
the real tokenizer, and the measuring / allocation / build passes on the real model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mpq_jax.packed.qlinear import QuantizedLinear, storage_bits
from mpq_jax.quant.model import iter_block_linears

CONFIG = Path(__file__).parents[2] / "configs" / "smollm2-135m-amlq-3.3bpw.yaml"


@pytest.mark.parametrize("lowrank", [True, False], ids=["amlq", "amq"])
def test_shipped_config_runs_saves_and_reloads_on_a_tiny_qwen(lowrank, tmp_path, monkeypatch):
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    from mpq_jax.eval.perplexity import make_windows, perplexity, wikitext2_tokens
    from mpq_jax.models import load_model
    from mpq_jax.quantize import main

    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "tiny"
    tiny_checkpoints.write_tiny_checkpoint_with_real_tokenizer("qwen2", source, hidden_size=128, intermediate_size=256)
    config = yaml.safe_load(CONFIG.read_text())
    assert config["quantization"]["method"] == "amlq"
    config["quantization"]["amlq"].update(lowrank=lowrank, alpha_grid=[0.0, 0.5])
    config["calibration"].update(n_samples=2, seq_len=64)
    config["eval"]["perplexity"].update(seq_len=64, max_windows=2)
    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["--config", str(run_config), "--model", str(source), "--output", str(out)]) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "amlq" and len(report["layers"]) == 2 * 7
    assert report["bits_per_weight"] <= 3.3
    for layer in report["layers"]:
        assert {"amlq_preset", "amlq_alpha", "amlq_rank", "amlq_delta"} <= set(layer)
        assert (layer["amlq_rank"] is None) or lowrank
    assert "AMLQ choices" in (out / "report.md").read_text()
    assert (out / "amlq_allocation.png").stat().st_size > 0 and (out / "amlq_delta.png").stat().st_size > 0

    # The reloaded packed model computes exactly the perplexity the run reported: input
    # scales, low-rank factors and folded biases all survive saving and are used.
    reloaded = load_model(out / "model")
    linears = [layer for *_, layer in iter_block_linears(reloaded.params)]
    assert all(isinstance(layer, QuantizedLinear) for layer in linears)
    weights = sum(layer.in_features * layer.out_features for layer in linears)
    assert sum(storage_bits(layer) for layer in linears) / weights == pytest.approx(report["bits_per_weight"], rel=1e-12)
    windows = make_windows(wikitext2_tokens(reloaded.tokenizer), 64, 2)
    assert perplexity(reloaded.params, reloaded.spec, windows, progress=False).ppl == pytest.approx(report["perplexity"]["ppl"], rel=1e-5)


@pytest.mark.slow
def test_real_model_measure_allocate_build(default_model, wikitext_tokens, tmp_path):
    from mpq_jax.capture import HessianCache
    from mpq_jax.data.calibration import calibration_tokens, default_sources
    from mpq_jax.eval.perplexity import make_windows, perplexity
    from mpq_jax.quant.amlq import Preset
    from mpq_jax.quant.amlq_model import allocate_model, build_model, measure_model
    from mpq_jax.quant.gptq_model import GptqOptions, quantize_model
    from mpq_jax.quant.method import WalkContext
    from mpq_jax.quant.model import average_bits_per_weight, linear_stats

    model = default_model
    calibration = calibration_tokens(model.tokenizer, default_sources(["wikipedia"]), 8, 256, seed=0)
    cache = HessianCache(tmp_path, "real")
    presets = (Preset(128, ((2, 1.0),)), Preset(128, ((4, 1.0),)))
    measurement = measure_model(
        model.params, model.spec, calibration, cache, presets=presets, alpha_grid=(0.0,), lowrank_bpw=(0.25,), progress=False
    )
    windows = make_windows(wikitext_tokens, 512, 1)
    results = {}
    for method, lowrank in (("amq", False), ("amlq", True)):
        choices = allocate_model(measurement, 3.0, lowrank)
        params, rows = build_model(model.params, model.spec, calibration, cache, measurement, choices, progress=False)
        bpw = average_bits_per_weight(linear_stats(model.params, params))
        assert 2.9 < bpw <= 3.0
        # The allocation's bit count is the built model's, layer by layer.
        for (_, _, _, _, layer), choice in zip(iter_block_linears(params), choices):
            assert storage_bits(layer) == choice.bits
        results[method] = (sum(c.loss for c in choices), perplexity(params, model.spec, windows, progress=False).ppl)
    # AMLQ's options include AMQ's, so its summed δ is no larger (greedy, so allow a hair).
    assert results["amlq"][0] <= results["amq"][0] * 1.001
    context = WalkContext(spec=model.spec, calibration=calibration, statistics=cache)
    gptq2 = quantize_model(model.params, GptqOptions(bits=2, group_size=128, propagate_quantized=False), context).params
    ppl_2bit = perplexity(gptq2, model.spec, windows, progress=False).ppl
    # Half the layers at 4 bits, chosen by δ, are far better than every layer at 2 bits.
    assert max(results["amq"][1], results["amlq"][1]) < ppl_2bit / 10
    assert np.isfinite(results["amq"][1]) and np.isfinite(results["amlq"][1])
