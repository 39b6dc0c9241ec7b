"""QAT through the command line on the real default model: RTN 2-bit, then a few steps of
each stage; the report's QAT section and loss curves, the checkpoints removed, the saved
model reloads with the same widths."""

from __future__ import annotations

import json

import pytest

from mpq_jax.models import load_model
from mpq_jax.quantize import main

CONFIG = """\
quantization: {method: rtn, bits: 2, group_size: 64}
calibration: {sources: [wikipedia, code]}
qat:
  enabled: true
  seq_len: 64
  checkpoint_every: 2
  block: {samples: 4, epochs: 1, batch_size: 2, lr_weight: 1.0e-4, lr_quant: 1.0e-3}
  e2e: {samples: 4, batch_size: 2, effective_batch: 2, warmup: 0.0, lr: 1.0e-3}
eval:
  perplexity: {sets: [wikitext2], max_windows: 1, seq_len: 128}
  compare_fp: false
"""


@pytest.mark.slow
def test_qat_after_rtn_on_the_default_model(tmp_path, default_model):
    config = tmp_path / "qat.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    assert main(["--config", str(config), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    qat = report["qat"]
    assert len(qat["block"]["losses"]) == default_model.spec.num_layers
    assert all(len(curve) == 2 for curve in qat["block"]["losses"].values())
    assert len(qat["e2e"]["losses"]["e2e"]) == 2 and qat["e2e"]["trained_parameters"] > 0
    assert qat["bits_per_weight_after_ptq"] == pytest.approx(report["bits_per_weight"], abs=0)
    assert "train" in report["seconds"]
    assert "## Quantization-aware training" in (out / "report.md").read_text()
    assert (out / "qat_losses.png").stat().st_size > 0
    assert not (out / ".qat").exists() and not (out / ".resume").exists()
    reloaded = load_model(out / "model", with_tokenizer=False)
    assert len(reloaded.params["layers"]) == default_model.spec.num_layers
