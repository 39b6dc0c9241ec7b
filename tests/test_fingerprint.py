"""Caches and resume checkpoints are keyed by what the weights are, not where they are.

For every model kind (Hugging Face folder, sharded or not; GGUF file; packed mpq-jax folder),
weights replaced under the same path, with size and mtime kept (as `cp -p` or `rsync -a`
would), change the statistics, resume and FP-evaluation fingerprints; and end to end, a
second run on replaced weights does not read the first run's cached FP baseline or Hessians.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mpq_jax import fingerprint as fp
from mpq_jax.config import EvalConfig, QuantizationConfig
from mpq_jax.data.calibration import CalibrationConfig
from mpq_jax.data.paths import CACHE_ENV


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))


def _stats(paths):
    return {p: os.stat(p) for p in paths}


def _restore_times(stats):
    for path, st in stats.items():
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _all_fingerprints(path: Path) -> tuple[str, str, str]:
    identity = fp.model_identity(path, "float32")
    tokens = {"wikipedia": np.arange(8, dtype=np.int32).reshape(2, 4)}
    return (
        fp.calibration_fingerprint(identity, tokens),
        fp.run_fingerprint(identity, QuantizationConfig(), CalibrationConfig(), tokens),
        fp.eval_fingerprint(identity, EvalConfig()),
    )


def test_file_digest_follows_content_and_is_memoized(tmp_path, monkeypatch):
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    first = fp.file_digest(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    st = os.stat(path)
    path.write_bytes(b"b" * 1000)  # same size ...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime
    assert fp.file_digest(path) != first
    # Unchanged files are not read again: the memo answers.
    monkeypatch.setattr(fp, "file_sha256", lambda p: pytest.fail("hashed again"))
    assert fp.file_digest(path) == hashlib.sha256(b"b" * 1000).hexdigest()


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_folder_with_replaced_weights_misses_every_cache(tmp_path, sharded):
    tiny = pytest.importorskip("tests.tiny_checkpoints")
    folder = tmp_path / "hf"
    tiny.write_tiny_checkpoint("llama", folder, sharded=sharded, seed=0)
    weights = sorted(folder.glob("*.safetensors"))
    before = _all_fingerprints(folder)
    assert _all_fingerprints(tmp_path / "hf") == before  # deterministic
    stats = _stats(weights)
    tiny.write_tiny_checkpoint("llama", folder, sharded=sharded, seed=1)  # same shapes, same sizes
    _restore_times(stats)
    assert [os.stat(p).st_size for p in weights] == [s.st_size for s in stats.values()]
    after = _all_fingerprints(folder)
    assert all(a != b for a, b in zip(before, after))
    # The same weights under another path are the same model: the caches are shared.
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)
    assert _all_fingerprints(copy) == after


def test_gguf_with_replaced_weights_misses_every_cache(tmp_path):
    from mpq_jax.models.checkpoint import default_model_path

    try:
        original = default_model_path()
    except Exception as exc:  # noqa: BLE001 - the default model is optional here
        pytest.skip(str(exc))
    path = tmp_path / "model.gguf"
    shutil.copyfile(original, path)
    before = _all_fingerprints(path)
    tokenizer_key = fp.tokenizer_cache_key(path)
    stats = _stats([path])
    with path.open("r+b") as handle:  # one byte of the last tensor's data
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xFF]))
    _restore_times(stats)
    after = _all_fingerprints(path)
    assert all(a != b for a, b in zip(before, after))
    assert fp.tokenizer_cache_key(path) != tokenizer_key


def test_packed_folder_with_replaced_weights_misses_every_cache(tmp_path):
    from mpq_jax.packed.io import save_quantized
    from mpq_jax.quant.rtn import rtn_quantize

    def params(seed):
        w = np.random.default_rng(seed).standard_normal((8, 64)).astype(np.float32)
        return {"layers": [{"mlp": {"down_proj": rtn_quantize(w, 4, 32)}}], "norm": {"weight": np.ones(64, np.float32)}}

    folder = tmp_path / "packed"
    save_quantized(folder, params(0), {"spec": {}})
    before = _all_fingerprints(folder)
    files = [folder / "model.safetensors", folder / "mpq_manifest.json"]
    stats = _stats(files)
    save_quantized(folder, params(1), {"spec": {}})
    _restore_times(stats)
    assert all(a != b for a, b in zip(before, _all_fingerprints(folder)))


def test_second_run_on_replaced_weights_reads_no_stale_cache(tmp_path):
    """The reported bug: after replacing a HF folder's weights, the next run read the old
    weights' cached FP evaluation (quantized/FP 3460 instead of ~1.2) and Hessians."""
    tiny = pytest.importorskip("tests.tiny_checkpoints")
    from mpq_jax.quantize import main

    folder = tmp_path / "hf"
    tiny.write_tiny_checkpoint_with_real_tokenizer("llama", folder, seed=0)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {folder}\nsave_model: false\n"
        "quantization: {method: gptq, bits: 4, group_size: 32, propagate: fp}\n"
        "calibration: {n_samples: 2, seq_len: 32}\n"
        "eval: {perplexity: {seq_len: 64, max_windows: 1}}\n"
    )

    def run(out):
        assert main(["--config", str(config), "--output", str(tmp_path / out)]) == 0
        return json.loads((tmp_path / out / "report.json").read_text())["eval"]["perplexity"][0]

    first = run("one")
    weights = sorted(folder.glob("*.safetensors"))
    stats = _stats(weights)
    tiny.write_tiny_checkpoint("llama", folder, sharded=False, seed=1, vocab_size=tiny_vocab(folder))
    _restore_times(stats)
    second = run("two")
    assert second["fp"] != pytest.approx(first["fp"], rel=1e-3)  # the new weights' own FP score
    assert len(list((tmp_path / "cache" / "hessians").iterdir())) == 2  # a statistics folder per model
    # ... and it is what a fresh cache gives for the new weights.
    shutil.rmtree(tmp_path / "cache" / "eval")
    assert run("three")["fp"] == pytest.approx(second["fp"], rel=1e-6)


def tiny_vocab(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]
