"""Perplexity: windowing rules, the batched jitted scorer against a float64 reference, and
the real model against transformers' PyTorch perplexity on the same windows."""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from mpq_jax.errors import ConfigError
from mpq_jax.eval.perplexity import make_windows, perplexity
from mpq_jax.models import forward


def test_windows_are_a_non_overlapping_prefix():
    tokens = np.arange(1000, dtype=np.int32)
    windows = make_windows(tokens, 128)
    assert windows.shape == (7, 128)  # 1000 // 128; the 104-token tail is dropped
    np.testing.assert_array_equal(windows.reshape(-1), tokens[:896])
    np.testing.assert_array_equal(make_windows(tokens, 128, max_windows=2), windows[:2])
    with pytest.raises(ConfigError, match="fewer than one window"):
        make_windows(tokens[:10], 128)


def reference_ppl(params, spec, windows) -> float:
    """exp(mean next-token NLL) from float64 log-softmax of the model's logits."""
    logits = np.asarray(forward(params, spec, jnp.asarray(windows)), np.float64)[:, :-1]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, windows[:, 1:, None], axis=-1)
    return float(np.exp(nll.mean()))


@pytest.fixture(scope="module")
def tiny_model(load_tiny_model):
    return load_tiny_model("llama")


@pytest.mark.parametrize("batch_size", [1, 2])
def test_matches_float64_reference(tiny_model, batch_size):
    # 3 windows with batch 2 exercises the padded last batch, whose copy must be ignored.
    windows = np.random.default_rng(0).integers(0, tiny_model.spec.vocab_size, size=(3, 40)).astype(np.int32)
    got = perplexity(tiny_model.params, tiny_model.spec, windows, batch_size=batch_size, progress=False)
    assert got.windows == 3 and got.predicted_tokens == 3 * 39
    # float32 logsumexp over a 211-word vocabulary: relative error ~1e-6 per token.
    assert got.ppl == pytest.approx(reference_ppl(tiny_model.params, tiny_model.spec, windows), rel=1e-5)


@pytest.mark.slow
def test_default_model_matches_transformers(default_model, default_torch_model, wikitext_tokens):
    """SmolLM2 WikiText-2 perplexity equals transformers' on the same windows within 0.1%."""
    from mpq_jax.eval.torch_reference import torch_perplexity

    windows = make_windows(wikitext_tokens, 512, max_windows=2)
    ours = perplexity(default_model.params, default_model.spec, windows, progress=False)
    theirs, _ = torch_perplexity(default_torch_model, windows)
    assert abs(ours.ppl - theirs) / theirs < 1e-3
    assert 5 < ours.ppl < 100  # a trained 135M model on Wikipedia text, not a broken one
