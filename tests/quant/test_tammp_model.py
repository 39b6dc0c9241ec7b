"""TAMMP's model walk and its CLI run: probing per source from the statistics cache,
strategies that partition every layer's columns, packed save and reload, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from mpq_jax.capture import HessianCache
from mpq_jax.packed.qlinear import DENSE_BITS, QuantizedLinear
from mpq_jax.quant import tammp
from mpq_jax.quant.method import WalkContext
from mpq_jax.quant.model import iter_block_linears
from mpq_jax.quant.tammp_model import (
    TammpOptions,
    build_model,
    per_source_statistics,
    probe_layer,
    probe_model,
    quantize_model,
    resampled_calibration,
    resampled_cache,
)
from mpq_jax.stats import token_counts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A two-block Llama 128 wide with the real tokenizer's vocabulary, and three
    calibration 'sources' of random tokens (the walk's plumbing, not quality, is tested here)."""
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    from mpq_jax.models.checkpoint import load_model

    folder = tmp_path_factory.mktemp("tammp_tiny")
    tiny_checkpoints.write_tiny_checkpoint_with_real_tokenizer("llama", folder / "model", hidden_size=128, intermediate_size=256)
    model = load_model(folder / "model", with_tokenizer=False)
    rng = np.random.default_rng(0)
    calibration = {src: rng.integers(0, 2000 * (i + 1), (4, 32)).astype(np.int32) for i, src in enumerate(("web", "code", "qa"))}
    return model, calibration, folder


def test_strategies_partition_every_layer_and_quantize_to_their_widths(tiny):
    model, calibration, folder = tiny
    cache = HessianCache(folder / "hessians", "plain")
    context = WalkContext(spec=model.spec, calibration=calibration, statistics=cache, progress=False)
    probe = probe_model(model.params, model.spec, calibration, cache, TammpOptions(), progress=False)
    assert probe.sources == ("web", "code", "qa")
    for strategy in ("strategy1", "strategy2"):
        result = build_model(model.params, model.spec, calibration, cache, probe, TammpOptions(strategy=strategy), progress=False)
        for name, _, _, _, layer in iter_block_linears(result.params):
            assert isinstance(layer, QuantizedLinear)
            note = result.notes[name]
            assert sum(note.columns.values()) == layer.in_features  # every column has exactly one width
            # The packed layer stores exactly those widths, one segment per class.
            stored = {}
            for segment in layer.segments:
                stored[segment.bits] = stored.get(segment.bits, 0) + segment.n_cols
            assert stored == note.columns
            sets = [probe.sets[src][name] for src in probe.sources]
            expected = getattr(tammp, strategy)(sets, layer.in_features).column_bits()
            assert note.columns.get(DENSE_BITS, 0) == int(np.sum(expected == DENSE_BITS))
    # The walk is probe then build.
    again = quantize_model(model.params, TammpOptions(strategy="strategy2"), context)
    assert again.summary["compactness"]["inter"]["overall"].keys() == {1, 2, 3}


def test_resampled_sources_pool_back_to_the_source(tiny):
    """Resamples are disjoint and cover the source's windows, and pooling their statistics
    gives the statistics of the whole source (same tokens; float32 sums in another order)."""
    model, calibration, folder = tiny
    split = resampled_calibration(calibration, 2)
    assert set(split) == {f"{s}#{k}" for s in calibration for k in range(2)}
    for src, windows in calibration.items():
        np.testing.assert_array_equal(np.sort(np.concatenate([split[f"{src}#0"], split[f"{src}#1"]]), axis=0), np.sort(windows, axis=0))
    plain, resampled = HessianCache(folder / "hessians", "plain"), resampled_cache(HessianCache(folder / "hessians", "plain"), 2)
    from mpq_jax.capture import fill_hessian_cache

    fill_hessian_cache(model.params, model.spec, calibration, plain, progress=False)
    fill_hessian_cache(model.params, model.spec, split, resampled, progress=False)
    pooled = per_source_statistics(resampled.load(0), token_counts(split))
    direct = plain.load(0)
    for src in calibration:
        for name, stats in direct[src].items():
            scale = np.abs(stats.hessian).max()
            # float32 Gram sums over 128 tokens: relative error ~ 128 · 6e-8; 1e-5 of the largest entry.
            np.testing.assert_allclose(pooled[src][name].hessian, stats.hessian, rtol=0, atol=1e-5 * scale)
    options = TammpOptions(resamples=2)
    probe = probe_model(model.params, model.spec, split, resampled, options, progress=False)
    assert set(probe.resample_critical) == set(calibration)
    intra = probe.compactness()["intra"]
    assert set(intra) == set(calibration) and all(0 <= j <= 1 for v in intra.values() for j in v["overall"].values())


def test_probe_layer_uses_one_source_alone(tiny):
    """A source's sets depend on its own Hessian only: probing with another source's
    statistics can change them, and with its own reproduces them."""
    model, calibration, folder = tiny
    cache = HessianCache(folder / "hessians", "plain")
    probe = probe_model(model.params, model.spec, calibration, cache, TammpOptions(), progress=False)
    stats = cache.load(1)
    weight = model.params["layers"][1]["mlp"]["down_proj"]["weight"]
    for src in calibration:
        mine = probe_layer(weight, stats[src]["down_proj_in"], TammpOptions())
        np.testing.assert_array_equal(mine.critical, probe.sets[src]["layers.1.mlp.down_proj"].critical)


def test_tammp_cli_saves_reloads_and_reports(tiny, tmp_path):
    """`method: tammp` through the CLI on a tiny model: packed, reloaded to the same
    function, report with the allocation and compactness sections and the figures."""
    from mpq_jax.models.checkpoint import load_model
    from mpq_jax.packed.params import dequantized_params
    from mpq_jax.quantize import main

    model, _, folder = tiny
    config = {
        "quantization": {"method": "tammp", "tammp": {"strategy": "strategy2", "resamples": 2}},
        "calibration": {"sources": ["web", "wikipedia", "code"], "n_samples": 4, "seq_len": 32},
        "eval": {"perplexity": {"seq_len": 32, "max_windows": 1, "sets": ["wikitext2", "code"]}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["--config", str(path), "--model", str(folder / "model"), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "tammp" and len(report["layers"]) == 2 * 7
    assert all(sum(layer["tammp_columns"].values()) == layer["shape"][1] for layer in report["layers"])
    assert set(report["tammp"]["compactness"]["intra"]) == {"web", "wikipedia", "code"}
    markdown = (out / "report.md").read_text()
    assert "TAMMP allocation (strategy2" in markdown and "Compactness of critical columns" in markdown
    for figure in ("tammp_compactness.png", "tammp_critical_columns.png"):
        assert (out / figure).stat().st_size > 0
    reloaded = load_model(out / "model", with_tokenizer=False)
    by_name = {row["name"]: row for row in report["layers"]}
    for name, _, _, _, layer in iter_block_linears(reloaded.params):
        assert isinstance(layer, QuantizedLinear)
        widths = {}
        for segment in layer.segments:
            widths[str(segment.bits)] = widths.get(str(segment.bits), 0) + segment.n_cols
        assert widths == by_name[name]["tammp_columns"]  # the saved layer has the reported widths
    from mpq_jax.models import forward

    logits = forward(dequantized_params(reloaded.params), reloaded.spec, np.arange(16, dtype=np.int32)[None])
    assert np.all(np.isfinite(np.asarray(logits))) and np.isfinite(report["perplexity"]["ppl"])


@pytest.mark.parametrize(
    "tammp, calibration, field",
    [
        ({"strategy": "smp", "sources": ["web", "code"]}, {"sources": ["web", "code"]}, "quantization.tammp.sources"),
        ({"strategy": "strategy1"}, {"sources": ["web"]}, "quantization.tammp.sources"),
        ({"sources": ["arxiv"]}, {"sources": ["web", "code"]}, "quantization.tammp.sources"),
        ({"topk": 0}, {"sources": ["web", "code"]}, "quantization.tammp.topk"),
        ({"resamples": 1}, {"sources": ["web", "code"]}, "quantization.tammp.resamples"),
        ({"resamples": 8}, {"sources": ["web", "code"], "n_samples": 4}, "quantization.tammp.resamples"),
        ({"thresholds": [3]}, {"sources": ["web", "code"]}, "quantization.tammp.thresholds"),
        ({"strategy": "sorted", "target_bits": 1.9}, {"sources": ["web"]}, "quantization.tammp.target_bits"),
        ({"saliency": "magnitude"}, {"sources": ["web", "code"]}, "quantization.tammp.saliency"),
    ],
)
def test_bad_tammp_config_names_the_field(tmp_path, tammp, calibration, field):
    from mpq_jax.config import load_config
    from mpq_jax.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"quantization": {"method": "tammp", "tammp": tammp}, "calibration": calibration}))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(path)
