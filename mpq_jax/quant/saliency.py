"""Hessian-based weight saliency, s = w² / [H⁻¹]ᵢᵢ² (TAMMP eq. 4, after BiLLM and OBS).

The one home of this metric: TAMMP's column probing (`mpq_jax.quant.tammp`) and AMLQ's
column importance read it from here. H [in, in] is the layer Hessian 2 X Xᵀ / N; it is
damped exactly as GPTQ damps it (`mpq_jax.quant.gptq.inverse_factor`), so a saliency and a
GPTQ run on the same H see the same matrix.

Two readings of the denominator [H⁻¹]ᵢᵢ (`VARIANTS`):
  - "inverse": the diagonal of the damped H⁻¹, eq. 4 as the paper writes it;
  - "cholesky": the diagonal of the upper Cholesky factor U of the damped H⁻¹ (UᵀU = H⁻¹,
    natural column order), which is what BiLLM's code divides by (its H is already that
    factor when the metric is taken). Uᵢᵢ² = 1 / (conditional variance of input i given the
    inputs after it), the pivot GPTQ divides each column's error by.

Host-side numpy float64: these numbers choose allocations, not weights, and in ≤ ~15k.
Not here: collecting H (calibration), choosing columns from the saliency (tammp, amlq),
GPTQ's float32 factor and its damping retries (gptq).
"""

from __future__ import annotations

import numpy as np

VARIANTS = ("inverse", "cholesky")


def damped_hessian(hessian, percdamp: float = 0.01) -> np.ndarray:
    """H [in, in] as GPTQ inverts it, float64 [in, in].

    Inputs that never fire (diag(H) == 0) are pinned to 1 first, so H stays invertible;
    then percdamp · mean(diag H) is added to the diagonal, the mean taken over the pinned
    diagonal (gptq.inverse_factor pins before `_damped_inverse_cholesky` takes its mean).
    Raises ValueError naming `hessian` (not square, not finite) or `percdamp` (< 0).
    """
    H = np.array(hessian, dtype=np.float64)  # a copy: pinned and damped in place
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"hessian must be a square [in, in] matrix, got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError("hessian must be finite; check the calibration activations")
    if not (np.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp}")
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    diagonal = np.diag_indices_from(H)
    H[diagonal] += percdamp * float(np.mean(H[diagonal]))
    return H


def inverse_hessian_diagonal(hessian, percdamp: float = 0.01, variant: str = "inverse") -> np.ndarray:
    """The denominator of eq. 4 for every input, float64 [in]; see VARIANTS.

    Both variants factor the damped H once (no explicit inverse of an inverse).
    Raises ValueError naming `hessian` if the damped H is not positive definite, and
    naming `variant` for an unknown one.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    H = damped_hessian(hessian, percdamp)
    try:
        if variant == "inverse":
            return _inverse_diagonal(H)
        return _inverse_cholesky_diagonal(H)
    except np.linalg.LinAlgError as exc:
        raise ValueError(
            f"hessian is not positive definite after damping percdamp={percdamp}; raise percdamp "
            "or check the calibration data"
        ) from exc


def _inverse_diagonal(H: np.ndarray) -> np.ndarray:
    """diag(H⁻¹) [n] of SPD H [n, n] from its Cholesky factor: H = LLᵀ, H⁻¹ = L⁻ᵀL⁻¹, so
    [H⁻¹]ᵢᵢ = Σ_k (L⁻¹)ₖᵢ², the squared norm of column i of L⁻¹.

    numpy's LAPACK, not scipy's potrf/potri: on the 2-core CI machines scipy's took
    1.8 + 2.0 s for one 576 x 576 matrix against 0.04 + 0.1 s here (measured, the same
    process), and TAMMP probes every layer once per source and resample.
    """
    L = np.linalg.cholesky(H)  # raises LinAlgError when H is not positive definite
    return np.sum(np.linalg.inv(L) ** 2, axis=0)


def _inverse_cholesky_diagonal(H: np.ndarray) -> np.ndarray:
    """diag(U) [n] where U is upper triangular with UᵀU = H⁻¹, H [n, n] SPD.

    H = U⁻¹U⁻ᵀ with U⁻¹ upper, i.e. H = R Rᵀ with R = U⁻¹ upper; reversing the order (J)
    makes J R J the ordinary lower Cholesky factor of J H J. So diag(U) = 1 / diag(R) is
    the reversed reciprocal pivots of chol(J H J): one factorisation, no inverse formed.
    """
    pivots = np.diag(np.linalg.cholesky(H[::-1, ::-1]))
    return 1.0 / pivots[::-1]


def saliency(w, inv_diag) -> np.ndarray:
    """Per-weight saliency w² / inv_diag² (eq. 4), float64 [out, in].

    w: [out, in]; inv_diag: [in] from `inverse_hessian_diagonal`, broadcast over rows.
    """
    w, inv_diag = _checked(w, inv_diag)
    return w**2 / inv_diag**2


def column_saliency(w, inv_diag) -> np.ndarray:
    """Summed saliency of each input column, (Σ_rows w²) / inv_diag², float64 [in].

    Sums before dividing, in that order, so that AMLQ's column importance computed here is
    bit-identical to the one it computed itself.
    """
    w, inv_diag = _checked(w, inv_diag)
    return np.sum(w**2, axis=0) / inv_diag**2


def _checked(w, inv_diag) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, np.float64)
    inv_diag = np.asarray(inv_diag, np.float64)
    if w.ndim != 2:
        raise ValueError(f"w must be [out, in], got shape {w.shape}")
    if inv_diag.shape != (w.shape[1],):
        raise ValueError(f"inv_diag must be [in] = [{w.shape[1]}], got shape {inv_diag.shape}")
    return w, inv_diag
