"""AMLQ's PCA reconstruction and sensitivity, from input moments, against float64 references
computed from the explicit activations X."""

from __future__ import annotations

import numpy as np
import pytest

from mpq_jax.quant.lowrank import covariance_root, deltas_by_rank, error_spectrum, lowrank_bits, output_error_pca, rank_for_budget, sensitivity


def layer_problem(seed, n_out=24, n_in=40, tokens=500):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in))
    w_hat = w + 0.1 * rng.standard_normal((n_out, n_in)) @ np.diag(rng.uniform(0.2, 3, n_in))
    x = rng.standard_normal((n_in, tokens)) * rng.uniform(0.5, 2, (n_in, 1)) + rng.standard_normal((n_in, 1))
    return w, w_hat, x, x @ x.T / tokens, x.mean(axis=1)


def direct_delta(w, w_hat, x, term):
    """‖WX − (ŴX + BAX + b)‖² / ‖WX‖² summed over the explicit tokens."""
    approx = w_hat @ x + term.b @ (term.a @ x) + term.bias_add[:, None]
    return np.sum((w @ x - approx) ** 2) / np.sum((w @ x) ** 2)


@pytest.mark.parametrize("rank", [0, 1, 5, 24])
def test_pca_term_and_delta_match_explicit_activations(rank):
    w, w_hat, x, m, mu = layer_problem(rank)
    term = output_error_pca(w - w_hat, m, mu, rank)
    assert term.b.shape == (24, rank) and term.a.shape == (rank, 40)
    assert sensitivity(w, w_hat, m, mu, term) == pytest.approx(direct_delta(w, w_hat, x, term), rel=1e-10)
    # Reference PCA of ΔY = ΔW X straight from its samples.
    dy = (w - w_hat) @ x
    eigenvalues, vectors = np.linalg.eigh(np.cov(dy, bias=True))
    u_k = vectors[:, ::-1][:, :rank]
    np.testing.assert_allclose(term.b @ term.a, u_k @ u_k.T @ (w - w_hat), atol=1e-9)
    # PCA is optimal: the mean-square residual is the sum of the discarded eigenvalues.
    residual = dy - term.b @ (term.a @ x) - term.bias_add[:, None]
    assert np.mean(np.sum(residual**2, axis=0)) == pytest.approx(np.sum(eigenvalues[::-1][rank:]), rel=1e-9, abs=1e-12)


def test_delta_falls_with_rank_and_vanishes_at_full_rank():
    w, w_hat, x, m, mu = layer_problem(7)
    deltas = [sensitivity(w, w_hat, m, mu, output_error_pca(w - w_hat, m, mu, r)) for r in (0, 2, 4, 8, 16, 24)]
    assert all(a >= b for a, b in zip(deltas, deltas[1:]))
    assert deltas[-1] < 1e-12
    # Without any term, δ is the plain GPTQ-style output error ratio.
    assert sensitivity(w, w_hat, m, mu) == pytest.approx(np.sum(((w - w_hat) @ x) ** 2) / np.sum((w @ x) ** 2))


def test_rank_rule_and_bits():
    assert lowrank_bits(576, 576, 32) == 16 * 32 * 1152
    assert lowrank_bits(576, 576, 32) / (576 * 576) == pytest.approx(1.778, abs=1e-3)
    assert rank_for_budget(576, 576, 0.25) == 4 and rank_for_budget(4096, 4096, 0.25) == 32
    with pytest.raises(ValueError, match="rank"):
        output_error_pca(np.zeros((3, 4)), np.eye(4), np.zeros(4), 5)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["narrow", "wide"])
def test_deltas_by_rank_from_the_spectrum_match_explicit_terms(shape):
    rng = np.random.default_rng(sum(shape))
    n_out, n_in = shape
    w = rng.standard_normal((n_out, n_in))
    w_hat = w + 0.1 * rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((n_in, 400)) * rng.uniform(0.5, 2, (n_in, 1)) + rng.standard_normal((n_in, 1))
    m, mu = x @ x.T / 400, x.mean(axis=1)
    ranks = [0, 1, 3, min(shape), min(shape) + 5]
    eigenvalues, total, mean_sq = error_spectrum(w - w_hat, covariance_root(m, mu), mu, top=max(ranks))
    signal = np.sum((w @ m) * w)
    got = deltas_by_rank(eigenvalues, total, mean_sq, signal, ranks)
    # float32 products: a few parts in 1e6 of δ
    assert got[None] == pytest.approx(sensitivity(w, w_hat, m, mu), rel=1e-5)
    # At full rank δ is tr Cov(y) − Σλ, a cancellation: float32 GEMMs and eigensolver leave
    # ~n·u32 = 40 · 6e-8 = 2.4e-6 of tr Cov (δ at rank 0), so allow 1e-5 of it; the smallest
    # eigenvalue dropped would leave > 1e-3 of it.
    floor = 1e-5 * got[0]
    for r in ranks:
        term = output_error_pca(w - w_hat, m, mu, min(r, n_out))
        assert got[r] == pytest.approx(direct_delta(w, w_hat, x, term), rel=1e-4, abs=floor), r
    # Only the top eigenvalues are computed; fewer give the same δ for the ranks they cover.
    few = deltas_by_rank(*error_spectrum(w - w_hat, covariance_root(m, mu), mu, top=3), signal, [0, 1, 3])
    assert all(few[r] == pytest.approx(got[r], rel=1e-5) for r in (0, 1, 3))
