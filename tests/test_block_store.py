"""Per-block resume checkpoints (mpq_jax.block_store) and sequential_quantize on top of them:
a resumed run is bit-identical to an uninterrupted one (hidden states recomputed through the
finished blocks, quantized or original), every block is written exactly once and nothing
else large is written, another fingerprint (or the earlier single-file layout) starts over,
and an unreadable block is moved aside with the run continuing after the last good block."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
import safetensors

import mpq_jax.block_store as block_store
from mpq_jax.block_store import BlockStore
from mpq_jax.capture import sequential_quantize
from mpq_jax.packed.io import MANIFEST_FILE, TENSORS_FILE, read_metadata, save_quantized
from mpq_jax.quant.rtn_model import quantize_model_rtn

BLOCKS = 4


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    """The tiny Qwen3 test model with four blocks instead of two."""
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")
    from mpq_jax.models import load_model

    directory = tmp_path_factory.mktemp("tiny-qwen3-4")
    tiny_checkpoints.write_tiny_checkpoint("qwen3", directory, sharded=False, num_hidden_layers=BLOCKS, layer_types=["full_attention"] * BLOCKS)
    model = load_model(directory, with_tokenizer=False)
    assert len(model.params["layers"]) == BLOCKS
    return model


@pytest.fixture(scope="module")
def rtn4(tiny4):
    return quantize_model_rtn(tiny4.params, 3, 16)


def calibration_for(model, seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.integers(0, model.spec.vocab_size, (3, 12)).astype(np.int32), "b": rng.integers(0, model.spec.vocab_size, (1, 12)).astype(np.int32)}


class Interrupted(Exception):
    pass


def assert_trees_identical(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def recording_rtn(rtn, seen: dict, called: list, dies_at: int | None = None, notes: dict | None = None):
    """quantize_block returning the RTN block, recording each block's statistics (and notes)."""

    def quantize_block(index, layer, stats):
        if index == dies_at:
            raise Interrupted
        called.append(index)
        seen[index] = stats
        if notes is not None:
            notes[f"block{index}"] = float(stats["a"]["mlp_in"].hessian.sum())
        return rtn["layers"][index]

    return quantize_block


def assert_stats_identical(got: dict, want: dict):
    for src in want:
        for name in want[src]:
            for field in ("hessian", "mean", "mean_abs"):
                np.testing.assert_array_equal(getattr(got[src][name], field), getattr(want[src][name], field))


@pytest.fixture
def count_writes(monkeypatch):
    """Every save_quantized the block store makes: the folder names, in order."""
    writes = []
    real = block_store.save_quantized

    def counting(directory, params, metadata, *args, **kwargs):
        writes.append(directory.name)
        return real(directory, params, metadata, *args, **kwargs)

    monkeypatch.setattr(block_store, "save_quantized", counting)
    return writes


# ----------------------------------------------------------------------------- (1) bit-identical resume


@pytest.mark.parametrize("propagate_quantized", [True, False])
def test_resumed_gptq_run_is_bit_identical_to_an_uninterrupted_one(tiny4, tmp_path, monkeypatch, caplog, propagate_quantized):
    """Real GPTQ (its output and losses depend on every Hessian bit), killed inside block 2 and
    run again: the blocks quantized after the resume got bit-identical statistics, so the
    layers and the losses are bit-identical too."""
    import mpq_jax.quant.gptq_model as gptq_model
    from mpq_jax.quant.method import WalkContext

    options = gptq_model.GptqOptions(bits=3, group_size=32, propagate_quantized=propagate_quantized, batch_size=2)
    calibration = calibration_for(tiny4, 1)
    pooled_seen: list = []
    real_pooled, real_gptq = gptq_model.pooled_statistics, gptq_model.gptq_quantize

    def recording_pooled(stats, tokens):
        pooled = real_pooled(stats, tokens)
        pooled_seen.append(pooled)
        return pooled

    monkeypatch.setattr(gptq_model, "pooled_statistics", recording_pooled)
    context = WalkContext(spec=tiny4.spec, calibration=calibration, progress=False)
    uninterrupted = gptq_model.quantize_model(tiny4.params, options, context)
    uninterrupted_pooled = list(pooled_seen)
    assert len(uninterrupted_pooled) == BLOCKS

    gptq_calls = []

    def dies_inside_block_2(*args, **kwargs):
        gptq_calls.append(1)
        if len(gptq_calls) == 2 * 7 + 3:  # seven linears a block: the third linear of block 2
            raise Interrupted
        return real_gptq(*args, **kwargs)

    resumable = WalkContext(spec=tiny4.spec, calibration=calibration, progress=False, resume_dir=tmp_path / ".resume", fingerprint="f1")
    monkeypatch.setattr(gptq_model, "gptq_quantize", dies_inside_block_2)
    with pytest.raises(Interrupted):
        gptq_model.quantize_model(tiny4.params, options, resumable)
    assert sorted(p.name for p in (tmp_path / ".resume").iterdir()) == ["block_000", "block_001"]

    monkeypatch.setattr(gptq_model, "gptq_quantize", real_gptq)
    pooled_seen.clear()
    with caplog.at_level(logging.INFO, logger="mpq_jax.capture"):
        resumed = gptq_model.quantize_model(tiny4.params, options, resumable)
    assert "recomputing hidden states through 2 finished blocks" in caplog.text
    assert len(pooled_seen) == 2  # blocks 0 and 1 came from the checkpoint
    for got, want in zip(pooled_seen, uninterrupted_pooled[2:], strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name].hessian, want[name].hessian)
            np.testing.assert_array_equal(got[name].mean, want[name].mean)
    assert_trees_identical(resumed.params["layers"], uninterrupted.params["layers"])
    # Every block's loss is reported, the finished blocks' from their checkpoints, bit for bit.
    assert {k: v.loss for k, v in resumed.notes.items()} == {k: v.loss for k, v in uninterrupted.notes.items()}


@pytest.mark.parametrize("propagate_quantized", [True, False])
def test_resume_feeds_the_chosen_blocks_to_the_recomputed_hidden_states(tiny4, rtn4, tmp_path, propagate_quantized):
    """RTN blocks differ from the originals, so statistics after a resume equal the
    uninterrupted run's only if the recomputation fed the same blocks (quantized or original)."""
    calibration = calibration_for(tiny4, 2)
    want = {}
    sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, want, []), propagate_quantized=propagate_quantized, progress=False)
    seen, called, notes = {}, [], {}
    run = dict(propagate_quantized=propagate_quantized, progress=False, resume_dir=tmp_path / "ckpt", fingerprint="f1")
    with pytest.raises(Interrupted):
        sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, seen, called, dies_at=3, notes=notes), block_notes=notes, **run)
    seen, called, notes_after = {}, [], {}
    sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, seen, called, notes=notes_after), block_notes=notes_after, **run)
    assert called == [3]
    assert_stats_identical(seen[3], want[3])
    assert set(notes_after) == {f"block{i}" for i in range(BLOCKS)} and notes_after["block0"] == notes["block0"]
    # The other choice of feed gives other statistics: the check above can tell them apart.
    other = {}
    sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, other, []), propagate_quantized=not propagate_quantized, progress=False)
    assert not np.array_equal(other[3]["a"]["mlp_in"].hessian, want[3]["a"]["mlp_in"].hessian)


# ----------------------------------------------------------------------------- (2) each block written once


def test_each_block_is_written_exactly_once_and_nothing_else(tiny4, rtn4, tmp_path, count_writes):
    calibration = calibration_for(tiny4, 3)
    folder = tmp_path / "ckpt"
    run = dict(progress=False, resume_dir=folder, fingerprint="f1")
    sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, {}, []), **run)
    assert count_writes == [f"block_{i:03d}" for i in range(BLOCKS)]
    assert sorted(p.name for p in folder.iterdir()) == count_writes  # no hidden states, no leftovers
    for i in range(BLOCKS):
        with safetensors.safe_open(str(folder / f"block_{i:03d}" / TENSORS_FILE), framework="numpy") as f:
            keys = list(f.keys())
        assert keys and all(key.startswith("block.") for key in keys)  # that block's params only

    # Killed in block 2, then resumed: the first run wrote blocks 0 and 1, the second only 2 and 3,
    # and the files of blocks 0 and 1 are the very ones the first run wrote.
    count_writes.clear()
    folder = tmp_path / "ckpt2"
    run["resume_dir"] = folder
    with pytest.raises(Interrupted):
        sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, {}, [], dies_at=2), **run)
    assert count_writes == ["block_000", "block_001"]
    files = {i: folder / f"block_{i:03d}" / name for i in (0, 1) for name in (TENSORS_FILE, MANIFEST_FILE)}
    before = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files.values()}
    count_writes.clear()
    sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, {}, []), **run)
    assert count_writes == ["block_002", "block_003"]
    assert {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in files.values()} == before


# ----------------------------------------------------------------------------- (3) other settings


def test_another_fingerprint_starts_over(tiny4, rtn4, tmp_path, caplog):
    calibration = calibration_for(tiny4, 4)
    folder = tmp_path / "ckpt"
    notes = {}
    with pytest.raises(Interrupted):
        sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, {}, [], dies_at=2, notes=notes), progress=False,
                            resume_dir=folder, fingerprint="f1", block_notes=notes)
    called, notes_other = [], {"kept": 1}
    with caplog.at_level(logging.WARNING, logger="mpq_jax.block_store"):
        sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, {}, called), progress=False,
                            resume_dir=folder, fingerprint="f2", block_notes=notes_other)
    assert called == list(range(BLOCKS))
    assert notes_other == {"kept": 1}  # nothing of f1's notes
    assert str(folder) in caplog.text and "other settings; starting over" in caplog.text
    assert [read_metadata(folder / f"block_{i:03d}")["fingerprint"] for i in range(BLOCKS)] == ["f2"] * BLOCKS


def test_a_checkpoint_in_the_earlier_single_file_layout_starts_over(tiny4, rtn4, tmp_path, caplog):
    folder = tmp_path / ".resume"
    save_quantized(folder, {"layers": rtn4["layers"][:1], "hidden": {"a": np.zeros((3, 12, 64), np.float32)}}, {"fingerprint": "f1", "block_notes": {}})
    called = []
    with caplog.at_level(logging.WARNING, logger="mpq_jax.block_store"):
        sequential_quantize(tiny4.params, tiny4.spec, calibration_for(tiny4, 5), recording_rtn(rtn4, {}, called), progress=False,
                            resume_dir=folder, fingerprint="f1")
    assert called == list(range(BLOCKS)) and "earlier layout" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == [f"block_{i:03d}" for i in range(BLOCKS)]  # old files gone


# ----------------------------------------------------------------------------- (4) unreadable block


def test_a_corrupt_block_is_moved_aside_and_the_run_continues_after_the_last_good_one(tiny4, rtn4, tmp_path, caplog, count_writes):
    calibration = calibration_for(tiny4, 6)
    want = {}
    sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, want, []), progress=False)
    folder = tmp_path / ".resume"
    run = dict(progress=False, resume_dir=folder, fingerprint="f1")
    with pytest.raises(Interrupted):
        sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, {}, [], dies_at=3), **run)
    tensors = folder / "block_001" / TENSORS_FILE
    raw = bytearray(tensors.read_bytes())
    raw[-64:] = bytes(64)  # same size, other bytes: what a disk error leaves
    tensors.write_bytes(bytes(raw))
    seen, called = {}, []
    count_writes.clear()
    with caplog.at_level(logging.WARNING, logger="mpq_jax.block_store"):
        result = sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, seen, called), **run)
    assert called == [1, 2, 3]  # block 0 trusted, block 1 broken, block 2 after it redone
    assert count_writes == ["block_001", "block_002", "block_003"]
    for index in called:
        assert_stats_identical(seen[index], want[index])
    assert all(a is b for a, b in zip(result["layers"][1:], rtn4["layers"][1:], strict=True))
    assert_trees_identical(result["layers"][0], rtn4["layers"][0])
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".resume.corrupt-")]
    assert len(aside) == 1 and (aside[0] / "block_001" / TENSORS_FILE).read_bytes() == bytes(raw)
    assert str(folder / "block_001") in caplog.text and str(aside[0] / "block_001") in caplog.text
    assert "continuing after block 0" in caplog.text


# ----------------------------------------------------------------------------- BlockStore on its own


def test_block_store_round_trips_any_block_pytree_with_its_notes(tmp_path):
    """Generic: what a QAT stage stores per block is not a decoder block."""
    store = BlockStore(tmp_path / "s", "fp")
    assert store.finished() == [] and store.notes() == {}
    blocks = [{"w": np.arange(6, dtype=np.float32).reshape(2, 3) + i, "parts": [np.int32(i), None]} for i in range(3)]
    for i, block in enumerate(blocks):
        store.write(i, block, {f"loss{i}": 0.25 * i, "last": i})
    with pytest.raises(ValueError, match="in order"):
        store.write(5, blocks[0], {})
    again = BlockStore(tmp_path / "s", "fp")
    assert_trees_identical(again.finished(), blocks)
    assert again.notes() == {"loss0": 0.0, "loss1": 0.25, "loss2": 0.5, "last": 2}


def test_block_store_cleans_up_after_a_kill_and_leaves_other_files_alone(tmp_path, caplog):
    store = BlockStore(tmp_path / "s", "fp")
    for i in range(3):
        store.write(i, {"w": np.full(4, i, np.float32)}, {})
    (tmp_path / "s" / ".block_003.tmp-abc").mkdir()  # a save_quantized killed mid-write
    (tmp_path / "s" / "block_005").mkdir()  # after a gap: not trusted
    (tmp_path / "s" / "notes.txt").write_text("mine")
    (tmp_path / "s" / "block_001" / MANIFEST_FILE).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="mpq_jax.block_store"):
        finished = BlockStore(tmp_path / "s", "fp").finished()
    assert len(finished) == 1 and "continuing after block 0" in caplog.text
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["block_000", "notes.txt"]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("s.corrupt-")]
    assert len(aside) == 1 and (aside[0] / "block_001" / MANIFEST_FILE).read_text() == "{not json"


def test_resume_with_a_hessian_cache_runs_no_forward_pass(tiny4, rtn4, tmp_path, monkeypatch):
    """With the statistics cache no hidden states are needed: resuming recomputes none."""
    import mpq_jax.capture as capture

    calibration = calibration_for(tiny4, 7)
    cache = capture.HessianCache(tmp_path / "hessians", "calib")
    want = {}
    sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, want, []), propagate_quantized=False, hessian_cache=cache, progress=False)
    run = dict(propagate_quantized=False, hessian_cache=cache, progress=False, resume_dir=tmp_path / "ckpt", fingerprint="f1")
    with pytest.raises(Interrupted):
        sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, {}, [], dies_at=2), **run)

    def no_forward(*args, **kwargs):
        raise AssertionError("forward pass despite a complete cache")

    for name in ("block_statistics", "block_outputs", "embed_tokens"):
        monkeypatch.setattr(capture, name, no_forward)
    seen, called = {}, []
    result = sequential_quantize(tiny4.params, tiny4.spec, calibration, recording_rtn(rtn4, seen, called), **run)
    assert called == [2, 3]
    for index in called:
        assert_stats_identical(seen[index], want[index])
    assert_trees_identical(result["layers"], rtn4["layers"])
