"""GGUF reading: the q/k row un-permutation, and the real default model's GGUF.

llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders each head's
q/k rows so that RoPE's rotated pairs are adjacent; `unpermute_qk_rows` must undo exactly
that. The forward permutation is restated here from the converter, not imported.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpq_jax.models.gguf_loader import unpermute_qk_rows


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp: rows as [heads, 2, head_dim/2], swap the last two of those axes."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize(
    "heads, shape",
    [(9, (9 * 64, 24)), (3, (3 * 64, 24)), (3, (3 * 64,))],
    ids=["q-weight", "k-weight", "k-bias"],
)
def test_unpermute_inverts_llama_cpp_permutation(heads, shape):
    w = np.random.default_rng(heads).standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(w, heads)
    assert not np.array_equal(permuted, w)  # the permutation is not trivially the identity
    np.testing.assert_array_equal(unpermute_qk_rows(permuted, heads), w)

    # What the permutation means: in head h, stored row 2i is HF row i and row 2i+1 is
    # HF row i + head_dim/2 (the two halves RoPE rotates together, interleaved).
    head_dim = shape[0] // heads
    h, i = heads - 1, 5
    np.testing.assert_array_equal(permuted[h * head_dim + 2 * i], w[h * head_dim + i])
    np.testing.assert_array_equal(permuted[h * head_dim + 2 * i + 1], w[h * head_dim + i + head_dim // 2])


@pytest.mark.slow
def test_default_model_gguf_reads_as_smollm2(default_model):
    """The default GGUF gives SmolLM2-135M's architecture and finite float32 tensors."""
    spec = default_model.spec
    assert spec.family == "llama"
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (30, 576, 9, 3)
    assert (spec.head_dim, spec.intermediate_size, spec.vocab_size) == (64, 1536, 49152)
    assert spec.tie_word_embeddings and spec.rope_scaling is None
    assert spec.rope_theta == 1e5
    assert "lm_head" not in default_model.params

    import jax

    leaves = jax.tree_util.tree_leaves_with_path(default_model.params)
    assert len(leaves) == 2 + 9 * 30  # embedding, final norm; 2 norms + 7 linears per block
    for path, leaf in leaves:
        assert leaf.dtype == np.float32, jax.tree_util.keystr(path)
        assert bool(np.isfinite(np.asarray(leaf)).all()), jax.tree_util.keystr(path)


def test_tokenizer_cache_folder_has_umask_mode(tmp_path, monkeypatch):
    """The cache folder (made by mkdtemp, 0700) ends up 0o777 & ~umask, like a plain mkdir."""
    import os
    import stat

    import mpq_jax.models.checkpoint as checkpoint
    from mpq_jax.data.paths import CACHE_ENV

    class FakeTokenizer:
        def save_pretrained(self, folder):
            with open(os.path.join(folder, "tokenizer.json"), "w") as handle:
                handle.write("{}")

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "gguf_tokenizer", lambda path: FakeTokenizer())
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    old = os.umask(0o022)
    try:
        checkpoint._cached_gguf_tokenizer(gguf)
    finally:
        os.umask(old)
    (folder,) = (tmp_path / "cache" / "tokenizers").iterdir()
    assert (folder / "tokenizer.json").is_file()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


@pytest.mark.slow
def test_tokenizer_cache_round_trip(default_model, shared_dir, tmp_path, monkeypatch):
    """The tokenizer converted from GGUF metadata and the one reloaded from the cache agree."""
    from pathlib import Path

    from mpq_jax.data.paths import CACHE_ENV
    from mpq_jax.models.checkpoint import load_tokenizer

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    text = (shared_dir / "data/corpora/sources/code/heldout.jsonl").read_text()[:3000]
    fresh = load_tokenizer(Path(default_model.source))  # converts, then writes the cache
    assert list(tmp_path.glob("tokenizers/*/tokenizer.json"))
    cached = load_tokenizer(Path(default_model.source))
    ids = fresh(text, add_special_tokens=False)["input_ids"]
    assert ids == cached(text, add_special_tokens=False)["input_ids"]
    assert ids == default_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert (fresh.bos_token, fresh.eos_token) == (cached.bos_token, cached.eos_token)
