"""Parity of mpq-jax's decoder with transformers' PyTorch implementation.

Tiny random checkpoints of each supported family are written by transformers itself (as
one file and as shards), loaded by mpq-jax, and must give the same float32 logits within
max|Δ| / max|ref| ≤ 1e-4 (float32 matmul reassociation differs between XLA and torch; the
differences seen are ~1e-6, so 1e-4 still catches any real mistake such as a wrong RoPE
layout, which shows up at the 1e-1 level).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from mpq_jax.eval.torch_reference import torch_logits  # noqa: E402
from mpq_jax.models import forward, load_model  # noqa: E402
from tests.tiny_checkpoints import COMMON, FAMILIES, write_tiny_checkpoint  # noqa: E402

TOLERANCE = 1e-4


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tiny_checkpoint_logits_match_transformers(family, sharded, tmp_path):
    reference = write_tiny_checkpoint(family, tmp_path, sharded)
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    tokens = np.random.default_rng(1).integers(0, COMMON["vocab_size"], size=(2, 70))
    expected = torch_logits(reference, tokens)
    loaded = load_model(tmp_path, with_tokenizer=False)
    got = np.asarray(forward(loaded.params, loaded.spec, jnp.asarray(tokens)))
    assert np.abs(got - expected).max() / np.abs(expected).max() <= TOLERANCE


@pytest.mark.slow
def test_default_model_matches_transformers_gguf(default_model, default_torch_model, shared_dir):
    """SmolLM2-135M from its GGUF: same token ids and logits as transformers' own GGUF loader."""
    from transformers import AutoTokenizer

    text = (shared_dir / "data/corpora/wikitext2/wiki.test.txt").read_text()[:1500]
    path = default_model.source
    hf_tokenizer = AutoTokenizer.from_pretrained(path.rsplit("/", 1)[0], gguf_file=path.rsplit("/", 1)[1])
    ids = default_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = np.asarray([ids[:300]])
    expected = torch_logits(default_torch_model, tokens)
    got = np.asarray(forward(default_model.params, default_model.spec, jnp.asarray(tokens)))
    assert np.abs(got - expected).max() / np.abs(expected).max() <= TOLERANCE
