"""Calibration data: reading each source format, non-overlapping window sampling, per-source
seeds that are stable across processes, the default sources (calib splits only), and the real
tokenizer on all five default sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpq_jax.data.calibration import (
    DEFAULT_SOURCE_NAMES,
    CalibrationConfig,
    CalibrationSource,
    calibration_tokens,
    default_sources,
    read_documents,
    sample_windows,
    source_seed,
    sources_from_config,
)
from mpq_jax.errors import ConfigError

EOS = 300  # outside the byte range, so separators cannot be confused with text


class ByteTokenizer:
    """One token per UTF-8 byte, like a tokenizer with add_special_tokens=False."""

    def __init__(self, eos_token_id: int | None = EOS):
        self.eos_token_id = eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        assert not add_special_tokens
        return {"input_ids": list(text.encode("utf-8"))}


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "source": "test"}) + "\n" for t in texts), encoding="utf-8")
    return path


# --- reading sources ---------------------------------------------------------------------


def test_reads_jsonl_text_and_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = ["first document", "second, with ünïcode", "third\nwith a line break"]

    jsonl = write_jsonl(tmp_path / "docs.jsonl", texts)
    assert read_documents(CalibrationSource(name="j", path=str(jsonl))) == texts

    custom = write_jsonl(tmp_path / "body.jsonl", texts, field="body")
    assert read_documents(CalibrationSource(name="j", path=str(custom), text_field="body")) == texts

    text = tmp_path / "doc.txt"
    text.write_text("\n\n".join(texts), encoding="utf-8")
    assert read_documents(CalibrationSource(name="t", path=str(text))) == ["\n\n".join(texts)]

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": texts, "id": [0, 1, 2]}).save_to_disk(str(saved))
    assert read_documents(CalibrationSource(name="d", path=str(saved))) == texts

    split = tmp_path / "split"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": texts})}).save_to_disk(str(split))
    assert read_documents(CalibrationSource(name="d", path=str(split), text_field="content")) == texts
    with pytest.raises(ConfigError, match="no column 'text'"):
        read_documents(CalibrationSource(name="d", path=str(split)))


def test_explicit_format_overrides_suffix(tmp_path):
    path = write_jsonl(tmp_path / "docs.data", ["a", "b"])
    assert read_documents(CalibrationSource(name="x", path=str(path), format="jsonl")) == ["a", "b"]
    with pytest.raises(ConfigError, match="cannot tell the format"):
        read_documents(CalibrationSource(name="x", path=str(path)))


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{path.name}:4: not a JSON object"):
        read_documents(CalibrationSource(name="bad", path=str(path)))


def test_missing_field_names_the_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", ["a", "b"], field="body")
    with pytest.raises(ConfigError, match=rf"{path.name}:1: no field 'text'"):
        read_documents(CalibrationSource(name="x", path=str(path)))


def test_missing_path_is_named(tmp_path):
    path = tmp_path / "nowhere" / "calib.jsonl"
    with pytest.raises(ConfigError, match=f"{path} not found"):
        read_documents(CalibrationSource(name="x", path=str(path)))


# --- sampling windows ----------------------------------------------------------------------


def test_windows_are_distinct_aligned_slices():
    tokens = np.arange(10_007, dtype=np.int64)  # position == value, so a window reveals its offset
    windows = sample_windows(tokens, n_samples=20, seq_len=100, seed=3)
    assert windows.shape == (20, 100) and windows.dtype == np.int32
    offsets = windows[:, 0]
    assert np.all(offsets % 100 == 0)
    assert np.all(np.diff(offsets) > 0)  # distinct and in stream order, so no two overlap
    for window in windows:
        np.testing.assert_array_equal(window, tokens[window[0] : window[0] + 100])


def test_every_slot_can_be_used():
    tokens = np.arange(1_050)
    windows = sample_windows(tokens, n_samples=10, seq_len=100, seed=0)
    np.testing.assert_array_equal(windows.reshape(-1), tokens[:1_000])  # the 50-token tail is dropped


def test_same_seed_same_windows_different_seed_different():
    tokens = np.arange(100_000)
    a = sample_windows(tokens, 8, 64, seed=1)
    np.testing.assert_array_equal(a, sample_windows(tokens, 8, 64, seed=1))
    assert not np.array_equal(a, sample_windows(tokens, 8, 64, seed=2))


def test_too_short_stream_says_what_was_asked():
    with pytest.raises(ConfigError, match=r"has 999 tokens but 10 x 100 = 1000 were asked.*fewer samples"):
        sample_windows(np.arange(999), n_samples=10, seq_len=100, seed=0)


# --- calibration_tokens ---------------------------------------------------------------------


@pytest.fixture
def two_sources(tmp_path):
    texts = [f"document number {i} " * 5 for i in range(200)]  # ~100 bytes each, ~20 kB per source
    return [
        CalibrationSource(name="alpha", path=str(write_jsonl(tmp_path / "alpha.jsonl", texts))),
        CalibrationSource(name="beta", path=str(write_jsonl(tmp_path / "beta.jsonl", texts))),
    ]


def test_calibration_tokens_deterministic_per_source(two_sources):
    first = calibration_tokens(ByteTokenizer(), two_sources, n_samples=6, seq_len=64, seed=0)
    again = calibration_tokens(ByteTokenizer(), two_sources[::-1], n_samples=6, seq_len=64, seed=0)
    assert set(first) == {"alpha", "beta"}
    for name in first:
        assert first[name].shape == (6, 64) and first[name].dtype == np.int32
        np.testing.assert_array_equal(first[name], again[name])  # independent of list order
    # Same text, different names: the per-source seeds differ, so the windows do too.
    assert not np.array_equal(first["alpha"], first["beta"])
    assert not np.array_equal(first["alpha"], calibration_tokens(ByteTokenizer(), two_sources, 6, 64, seed=1)["alpha"])


def test_documents_are_joined_with_eos(tmp_path):
    docs = ["ab", "", "cde", "f"]  # the empty document adds no separator
    source = CalibrationSource(name="s", path=str(write_jsonl(tmp_path / "s.jsonl", docs)))
    expected = [97, 98, EOS, 99, 100, 101, EOS, 102]
    (windows,) = calibration_tokens(ByteTokenizer(), [source], n_samples=1, seq_len=8).values()
    np.testing.assert_array_equal(windows[0], expected)
    (no_eos,) = calibration_tokens(ByteTokenizer(eos_token_id=None), [source], n_samples=1, seq_len=6).values()
    np.testing.assert_array_equal(no_eos[0], [97, 98, 99, 100, 101, 102])


def test_duplicate_source_names_are_refused(two_sources):
    with pytest.raises(ConfigError, match="'alpha' is listed more than once"):
        calibration_tokens(ByteTokenizer(), [two_sources[0], two_sources[0]], 1, 8)


def test_too_short_source_is_named(two_sources):
    with pytest.raises(ConfigError, match=r"'alpha'.*1000 x 1000"):
        calibration_tokens(ByteTokenizer(), two_sources, n_samples=1000, seq_len=1000)


def test_source_seed_is_stable_across_processes():
    # CRC-32 of "0/wikipedia": a constant, unlike Python's per-process str hash.
    code = "from mpq_jax.data.calibration import source_seed; print(source_seed(0, 'wikipedia'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out) == source_seed(0, "wikipedia") == 887747726
    assert source_seed(0, "web") != source_seed(0, "wikipedia") != source_seed(1, "wikipedia")


def test_data_does_not_import_eval():
    # Layering: evaluation reads data, never the other way round.
    code = (
        "import sys, mpq_jax.data.calibration, mpq_jax.data.text; "
        "print(sorted(m for m in sys.modules if m.startswith('mpq_jax.eval')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- default sources and config --------------------------------------------------------------


def test_default_sources_are_existing_calib_splits(shared_dir):
    sources = default_sources()
    assert [s.name for s in sources] == list(DEFAULT_SOURCE_NAMES)
    for source in sources:
        path = Path(source.path)
        assert path.name == "calib.jsonl" and "heldout" not in source.path
        assert path.is_file() and path.parent.name == source.name


def test_unknown_default_source_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown calibration source 'wikitext'.*web, wikipedia, code, qa, arxiv"):
        default_sources(("wikitext",))


def test_sources_from_config_custom_path_wins(shared_dir, tmp_path):
    custom = str(tmp_path / "mine.jsonl")
    cfg = CalibrationConfig(sources=("wikipedia", "code", "mine"), paths={"code": custom, "mine": custom})
    sources = sources_from_config(cfg)
    assert [s.name for s in sources] == ["wikipedia", "code", "mine"]
    assert sources[0].path.endswith("wikipedia/calib.jsonl")
    assert sources[1].path == sources[2].path == custom
    with pytest.raises(ConfigError, match="calibration.paths.extra: not listed"):
        sources_from_config(CalibrationConfig(paths={"extra": custom}))
    with pytest.raises(ConfigError, match="unknown calibration source 'mine'"):
        sources_from_config(CalibrationConfig(sources=("mine",)))


# --- the real tokenizer -------------------------------------------------------------------------


@pytest.mark.slow
def test_default_sources_with_the_real_tokenizer(default_model, shared_dir):
    """4 windows of 128 tokens from each default source: in-vocabulary ids, distinct text per source."""
    windows = calibration_tokens(default_model.tokenizer, default_sources(), n_samples=4, seq_len=128)
    assert list(windows) == list(DEFAULT_SOURCE_NAMES)
    for name, w in windows.items():
        assert w.shape == (4, 128) and w.dtype == np.int32, name
        assert 0 <= w.min() and w.max() < default_model.spec.vocab_size, name
        assert len({tuple(row) for row in w}) == 4, name  # non-overlapping windows hold different text
    names = list(windows)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not np.array_equal(windows[a], windows[b]), (a, b)
