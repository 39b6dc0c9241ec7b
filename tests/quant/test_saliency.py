"""Hessian saliency (mpq_jax.quant.saliency) against plain float64 numpy, and against GPTQ.

Tolerances. Both variants come from one Cholesky factorisation of the damped H, which is
backward stable: the result is exact for some H + E with ‖E‖ ≲ c·n·ε·‖H‖. A diagonal entry
of H⁻¹ (or of its Cholesky factor) then moves by at most ~c·n·ε·cond(H) times ‖H⁻¹‖, and
‖H⁻¹‖ / [H⁻¹]ᵢᵢ ≤ cond(H) for SPD H, so the relative error is ≲ c·n·ε·cond(H)². The
numpy reference (LU inverse, then Cholesky) carries an error of the same form, so we allow
twice it with c = 4: `rtol(H, eps)`. The matrices are Wisharts 2 X Xᵀ / N with N ≈ 8 n, so
cond(H) is ~4 (asserted below to stay under 20), and with ε = 2.2e-16 the bound is ~1e-12:
tight enough to catch any wrong formula, far from float64 noise. GPTQ's factor is float32
(ε = 1.2e-7), so the same bound there is ~4e-4 (cond 4); a wrong damping convention moves
the result by ~1e-2 and is shown to fall outside it.
"""

from __future__ import annotations

import numpy as np
import pytest

from mpq_jax.quant.amlq import column_importance
from mpq_jax.quant.gptq import inverse_factor
from mpq_jax.quant.saliency import (
    VARIANTS,
    column_saliency,
    damped_hessian,
    inverse_hessian_diagonal,
    saliency,
)

SEEDS = range(5)
PERCDAMPS = (1e-3, 1e-2, 1e-1)


def wishart_hessian(seed, n=48, tokens=400, dead=(7,)):
    """H = 2 X Xᵀ / N [n, n] float64, with the `dead` inputs never firing (zero rows of X)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, tokens))
    x[list(dead)] = 0.0
    return 2 * x @ x.T / tokens


def reference_damped(hessian, percdamp):
    """GPTQ's recipe written out: pin dead inputs to 1, then add percdamp · mean(diag) · I."""
    H = np.array(hessian, np.float64)
    for i in np.flatnonzero(np.diag(H) == 0):
        H[i, i] = 1.0
    return H + percdamp * np.mean(np.diag(H)) * np.eye(len(H))


def rtol(H, eps):
    cond = np.linalg.cond(H)
    assert cond < 20, "keep the test matrices well conditioned; the bound grows as cond²"
    return 2 * 4 * len(H) * eps * cond**2


def test_damped_hessian_is_gptqs_recipe():
    # The same float64 operations in the same order (the diagonal mean, one addition per
    # diagonal entry, + 0.0 off it), so equal bit for bit.
    for seed in SEEDS:
        H = wishart_hessian(seed, dead=(3, 11))
        for percdamp in PERCDAMPS:
            damped = damped_hessian(H, percdamp)
            np.testing.assert_array_equal(damped, reference_damped(H, percdamp))
            assert damped[3, 11] == 0 and damped[3, 3] == damped[11, 11] > 1  # pinned, uncoupled, damped


def test_input_is_not_modified():
    H = wishart_hessian(0)
    before = H.copy()
    damped_hessian(H)
    inverse_hessian_diagonal(H, variant="cholesky")
    np.testing.assert_array_equal(H, before)


@pytest.mark.parametrize("seed", SEEDS)
def test_inverse_variant_against_numpy_inverse(seed):
    H = wishart_hessian(seed)
    for percdamp in PERCDAMPS:
        damped = reference_damped(H, percdamp)
        expected = np.diag(np.linalg.inv(damped))
        got = inverse_hessian_diagonal(H, percdamp, variant="inverse")
        assert got.dtype == np.float64 and got.shape == (len(H),)
        np.testing.assert_allclose(got, expected, rtol=rtol(damped, np.finfo(np.float64).eps), atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_cholesky_variant_against_numpy_cholesky_of_inverse(seed):
    H = wishart_hessian(seed)
    for percdamp in PERCDAMPS:
        damped = reference_damped(H, percdamp)
        upper = np.linalg.cholesky(np.linalg.inv(damped)).T  # UᵀU = H⁻¹, U upper
        got = inverse_hessian_diagonal(H, percdamp, variant="cholesky")
        np.testing.assert_allclose(got, np.diag(upper), rtol=rtol(damped, np.finfo(np.float64).eps), atol=0)


def test_variants_agree_where_they_must_and_differ_elsewhere():
    # U's first column has one entry, so [H⁻¹]₀₀ = U₀₀²; elsewhere Uᵢᵢ² < [H⁻¹]ᵢᵢ strictly
    # (the conditional variance given the later inputs is smaller than the marginal one).
    H = wishart_hessian(1)
    inverse = inverse_hessian_diagonal(H, variant="inverse")
    cholesky = inverse_hessian_diagonal(H, variant="cholesky")
    np.testing.assert_allclose(cholesky[0] ** 2, inverse[0], rtol=1e-12)
    live = np.arange(1, len(H) - 1)
    live = live[live != 7]  # the dead input is uncoupled: both are 1 / (1 + damping) there
    assert np.all(cholesky[live] ** 2 < inverse[live])


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_cholesky_variant_matches_gptq_factor(seed):
    # A quarter of the inputs dead and pinned to 1 (live diagonal ≈ 2): the mean over the
    # pinned diagonal and over the raw one differ by 1/7, so the convention is visible.
    H = wishart_hessian(seed, dead=tuple(range(0, 48, 4)))
    for percdamp in PERCDAMPS:
        factor = inverse_factor(H, np.arange(len(H)), percdamp)
        assert factor.damping == percdamp  # no retry: we reproduce the first damping
        tol = rtol(reference_damped(H, percdamp), np.finfo(np.float32).eps)
        got = inverse_hessian_diagonal(H, percdamp, variant="cholesky")
        np.testing.assert_allclose(got, np.diag(factor.upper), rtol=tol, atol=0)
    # The raw-diagonal mean (dead inputs counted as 0) at percdamp 0.1 falls outside that.
    raw_damping = 0.1 * np.mean(np.diag(H))
    wrong_H = H + np.diag(np.where(np.diag(H) == 0, 1.0, 0.0) + raw_damping)  # pinned, damped by the raw mean
    wrong_diag = inverse_hessian_diagonal(wrong_H, 0.0, variant="cholesky")
    gptq_diag = np.diag(inverse_factor(H, np.arange(len(H)), 0.1).upper)
    assert np.max(np.abs(wrong_diag / gptq_diag - 1)) > 10 * tol


def test_saliency_and_column_saliency():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 48)).astype(np.float32)
    inv_diag = inverse_hessian_diagonal(wishart_hessian(3), variant="cholesky")
    s = saliency(w, inv_diag)
    assert s.dtype == np.float64 and s.shape == w.shape
    # Each entry is one square, one square and one division in float64: ≤ 3 roundings.
    expected = np.array([[float(w[i, j]) ** 2 / float(inv_diag[j]) ** 2 for j in range(48)] for i in range(40)])
    np.testing.assert_allclose(s, expected, rtol=4 * np.finfo(np.float64).eps, atol=0)
    # Summing before or after dividing: 40 additions of positive terms, ≤ ~42 roundings.
    np.testing.assert_allclose(column_saliency(w, inv_diag), s.sum(axis=0), rtol=64 * np.finfo(np.float64).eps)


def test_column_saliency_is_amlqs_column_importance_bit_for_bit():
    rng = np.random.default_rng(4)
    H = wishart_hessian(4, dead=(5,))
    w = rng.standard_normal((32, 48)).astype(np.float32)
    factor = inverse_factor(H, rng.permutation(48), 0.01)
    inv_diag = np.empty(48)
    inv_diag[factor.perm] = np.sum(np.asarray(factor.upper, np.float64) ** 2, axis=0)  # as AMLQ reads it
    importance = column_importance(w, H, factor)
    live = np.diag(H) != 0
    np.testing.assert_array_equal(column_saliency(w, inv_diag)[live], importance[live])


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="hessian"):
        inverse_hessian_diagonal(np.ones((3, 4)))
    with pytest.raises(ValueError, match="hessian"):
        inverse_hessian_diagonal(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="hessian"):
        inverse_hessian_diagonal(-np.eye(3))  # negative definite: no Cholesky factor
    with pytest.raises(ValueError, match="hessian"):
        inverse_hessian_diagonal(-np.eye(3), variant="cholesky")
    with pytest.raises(ValueError, match="percdamp"):
        damped_hessian(np.eye(3), percdamp=-0.1)
    with pytest.raises(ValueError, match="variant"):
        inverse_hessian_diagonal(np.eye(3), variant="pseudo")
    with pytest.raises(ValueError, match="inv_diag"):
        saliency(np.ones((2, 3)), np.ones(4))
    assert VARIANTS == ("inverse", "cholesky")
