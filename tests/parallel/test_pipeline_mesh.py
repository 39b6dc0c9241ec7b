"""`python -m mpq_jax.quantize` with a `parallel` section on eight CPU devices: GPTQ's capture
runs data-parallel over the (data 4, model 2) mesh and QAT runs sharded; the statistics equal
a one-device capture's within float32 rounding, and, from the same statistics, the QAT losses
and the perplexity equal a run without a mesh."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mpq_jax.quantize import main

CONFIG = """\
model: {model}
quantization: {{method: gptq, bits: 2, group_size: 16, propagate: fp}}
calibration: {{sources: [wikipedia, code], n_samples: 8, seq_len: 32}}
qat:
  enabled: true
  seq_len: 32
  checkpoint_every: 0
  block: {{samples: 8, epochs: 1, batch_size: 4, lr_weight: 2.0e-5, lr_quant: 2.0e-5}}
  e2e: {{samples: 8, epochs: 1, batch_size: 4, effective_batch: 4, warmup: 0.0, lr: 1.0e-3}}
eval:
  perplexity: {{sets: [wikitext2], max_windows: 1, seq_len: 64}}
  compare_fp: false
parallel: {{enabled: {enabled}, data: 4, model: 2}}
"""


@pytest.mark.slow
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
def test_quantize_cli_on_a_mesh_matches_one_device(tmp_path, monkeypatch, shared_dir):
    from tests.tiny_checkpoints import write_tiny_checkpoint_with_real_tokenizer

    from mpq_jax.capture import HessianCache, fill_hessian_cache
    from mpq_jax.config import load_config
    from mpq_jax.models import load_model
    from mpq_jax.pipeline import calibration_for

    model_dir = tmp_path / "tiny"
    write_tiny_checkpoint_with_real_tokenizer("llama", model_dir)
    monkeypatch.setenv("MPQ_CACHE_DIR", str(tmp_path / "cache"))
    reports = {}
    for enabled in ("true", "false"):  # the mesh run fills the statistics cache, the other reads it
        config = tmp_path / f"{enabled}.yaml"
        config.write_text(CONFIG.format(model=model_dir, enabled=enabled))
        assert main(["--config", str(config), "--output", str(tmp_path / enabled)]) == 0
        reports[enabled] = json.loads((tmp_path / enabled / "report.json").read_text())
    mesh, alone = reports["true"], reports["false"]
    assert mesh["qat"]["mesh"] == {"data": 4, "model": 2} and alone["qat"]["mesh"] == {"data": 1, "model": 1}
    for stage in ("block", "e2e"):
        for name, curve in alone["qat"][stage]["losses"].items():
            np.testing.assert_allclose(mesh["qat"][stage]["losses"][name], curve, rtol=2e-5, err_msg=f"{stage} {name}")
        # the trainable state spread over the model axis (and the data axis for nothing but batches)
        assert mesh["qat"][stage]["param_bytes_per_device"] < alone["qat"][stage]["param_bytes_per_device"]
    assert mesh["perplexity"]["ppl"] == pytest.approx(alone["perplexity"]["ppl"], rel=1e-4)

    # The cached statistics came from the mesh: compare them with a one-device capture.
    model = load_model(model_dir)
    calibration = calibration_for(model.tokenizer, load_config(tmp_path / "true.yaml"))
    (folder,) = [p for p in (tmp_path / "cache" / "hessians").iterdir() if p.is_dir()]
    fill_hessian_cache(model.params, model.spec, calibration, HessianCache(tmp_path / "one", "x"), progress=False)
    for index in range(model.spec.num_layers):
        got, want = HessianCache(folder.parent, folder.name).load(index), HessianCache(tmp_path / "one", "x").load(index)
        for src in want:
            for name, stats in want[src].items():
                scale = np.max(np.abs(stats.hessian))
                np.testing.assert_allclose(got[src][name].hessian, stats.hessian, rtol=1e-4, atol=1e-5 * scale, err_msg=f"{index} {src} {name}")
