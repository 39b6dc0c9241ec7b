"""AMLQ's low-rank reconstruction of a layer's output error, and its sensitivity δ.

For a quantized layer Ŵ = W − ΔW on inputs x (columns of X), the output error is
y = ΔW x. AMLQ (§3.2, eqs. 8-14) takes the PCA of y over the calibration tokens:

    Cov(y) = ΔW Σ ΔWᵀ,  Σ = E[x xᵀ] − μ μᵀ,  μ = E[x]          (eq. 9, from input moments)
    Cov(y) = U S Uᵀ;  B = U_k,  A = U_kᵀ ΔW                     (eqs. 10-14)
    b_add = E[y] − U_k U_kᵀ E[y] = (I − U_k U_kᵀ) ΔW μ            (folded into the bias)

so the layer computes Ŵ x + B A x + (bias + b_add) ≈ W x + bias. Everything needed is the
second moment E[x xᵀ] (= H / 2 for GPTQ's H = 2 X Xᵀ / N) and the mean μ: X itself is never
kept. The sensitivity (eq. 2 and Algorithm 1 line 11) follows from the same moments,

    δ = E‖W x − (Ŵ x + B A x + b_add)‖² / E‖W x‖²
      = E‖R x − b_add‖² / tr(W M Wᵀ),   R = ΔW − B A,  M = E[x xᵀ]
      = (tr(R M Rᵀ) − 2 b_addᵀ R μ + ‖b_add‖²) / tr(W M Wᵀ).

(The bias of the original layer cancels in the difference and is left out of both norms.)
All of it runs in float64 on the host: these are [out, out] and [out, in] products per
layer and candidate, small next to a forward pass.

Not here: choosing ranks or bits (allocate.py), quantizing (gptq.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LowRankTerm:
    """B [out, rank], A [rank, in] and the bias correction [out] of one layer."""

    b: np.ndarray
    a: np.ndarray
    bias_add: np.ndarray

    @property
    def rank(self) -> int:
        return self.b.shape[1]


def output_error_pca(delta_w, second_moment, mean, rank: int) -> LowRankTerm:
    """The rank-`rank` PCA term of y = ΔW x (see the module docstring); rank 0 keeps only the mean.

    delta_w [out, in] = W − Ŵ; second_moment [in, in] = E[x xᵀ]; mean [in] = E[x].
    """
    delta_w = np.asarray(delta_w, np.float64)
    second_moment = np.asarray(second_moment, np.float64)
    mean = np.asarray(mean, np.float64)
    n_out, n_in = delta_w.shape
    if second_moment.shape != (n_in, n_in) or mean.shape != (n_in,):
        raise ValueError(f"moments must be [{n_in}, {n_in}] and [{n_in}], got {second_moment.shape} and {mean.shape}")
    if not 0 <= rank <= n_out:
        raise ValueError(f"rank must be in 0..{n_out}, got {rank}")
    mean_y = delta_w @ mean
    if rank == 0:
        return LowRankTerm(np.zeros((n_out, 0)), np.zeros((0, n_in)), mean_y)
    covariance = delta_w @ (second_moment - np.outer(mean, mean)) @ delta_w.T
    covariance = (covariance + covariance.T) / 2  # exact symmetry for eigh
    _, vectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    u_k = vectors[:, ::-1][:, :rank]
    return LowRankTerm(b=u_k, a=u_k.T @ delta_w, bias_add=mean_y - u_k @ (u_k.T @ mean_y))


def sensitivity(w, w_hat, second_moment, mean, term: LowRankTerm | None = None) -> float:
    """δ = E‖W x − (Ŵ x + B A x + b_add)‖² / E‖W x‖², from the input moments (float64)."""
    w = np.asarray(w, np.float64)
    m = np.asarray(second_moment, np.float64)
    mu = np.asarray(mean, np.float64)
    residual = w - np.asarray(w_hat, np.float64)
    shift = np.zeros(w.shape[0])
    if term is not None:
        residual = residual - term.b @ term.a
        shift = term.bias_add
    error = np.sum((residual @ m) * residual) - 2 * shift @ (residual @ mu) + shift @ shift
    signal = np.sum((w @ m) * w)
    return float(max(error, 0.0) / signal)


def covariance_root(second_moment, mean) -> np.ndarray:
    """R [in, in] with R Rᵀ = Σ = E[x xᵀ] − μ μᵀ (Cholesky, with a tiny jitter for singular Σ)."""
    mean = np.asarray(mean, np.float64)
    sigma = np.asarray(second_moment, np.float64) - np.outer(mean, mean)
    sigma = (sigma + sigma.T) / 2
    jitter = 1e-10 * max(np.trace(sigma) / len(sigma), 1e-30)
    for _ in range(6):
        try:
            return np.linalg.cholesky(sigma + jitter * np.eye(len(sigma)))
        except np.linalg.LinAlgError:
            jitter *= 100
    values, vectors = np.linalg.eigh(sigma)
    return vectors * np.sqrt(np.clip(values, 0, None))


def error_spectrum(delta_w, root, mean, top: int) -> tuple[np.ndarray, float, float]:
    """(the `top` largest eigenvalues of Cov(y), descending; tr Cov(y); ‖E[y]‖²) for y = ΔW x.

    `root` is `covariance_root` of the layer's inputs (computed once per layer). What δ
    needs for every rank at once: with the PCA term of rank r and the mean folded into the
    bias, E‖residual‖² = tr Cov(y) − Σ_{i < r} λ_i; with no term at all it is
    tr Cov(y) + ‖E y‖². With P = ΔW R, Cov(y) = P Pᵀ, whose nonzero spectrum is that of the
    smaller of P Pᵀ and Pᵀ P; only its top eigenvalues are computed (LAPACK's subset
    solver). The products run in float32 (δ is a ratio needing a few digits; the layer
    widths make float64 here the measuring pass's largest cost), the sums in float64.
    """
    import scipy.linalg

    delta_w = np.asarray(delta_w, np.float32)
    product = delta_w @ np.asarray(root, np.float32)
    gram = product @ product.T if product.shape[0] <= product.shape[1] else product.T @ product
    gram = (gram + gram.T) / 2
    n = gram.shape[0]
    k = min(top, n)
    if k:
        eigenvalues = scipy.linalg.eigh(gram, eigvals_only=True, subset_by_index=[n - k, n - 1], driver="evr")
        eigenvalues = np.clip(eigenvalues[::-1].astype(np.float64), 0, None)
    else:
        eigenvalues = np.zeros(0)
    total = float(np.sum(np.square(product, dtype=np.float64)))
    mean_y = delta_w.astype(np.float64) @ np.asarray(mean, np.float64)
    return eigenvalues, total, float(mean_y @ mean_y)


def deltas_by_rank(eigenvalues, total: float, mean_sq: float, signal: float, ranks) -> dict:
    """δ for each rank from `error_spectrum` (called with top >= max(ranks)) and the signal
    E‖W x‖²; key None = no term."""
    head = np.concatenate([[0.0], np.cumsum(eigenvalues)])  # head[r] = Σ_{i < r} λ_i
    out = {None: float((total + mean_sq) / signal)}
    for r in ranks:
        out[r] = float(max(total - head[min(r, len(eigenvalues))], 0.0) / signal)
    return out


def lowrank_bits(n_out: int, n_in: int, rank: int) -> int:
    """Stored bits of a rank-`rank` fp16 pair B [out, r], A [r, in] (the bias is counted with the layer)."""
    return 16 * rank * (n_out + n_in)


def rank_for_budget(n_out: int, n_in: int, extra_bpw: float) -> int:
    """Largest rank whose fp16 factors cost at most `extra_bpw` bits per weight of the layer.

    The rule behind default rank sets: a rank-r pair costs 16 r (out + in) / (out in) bits
    per weight, so on SmolLM2's 576 x 576 layers rank 32 already costs 1.78 BPW, while on a
    4096 x 4096 layer it costs 0.25. Ranks are therefore chosen per layer as fractions of a
    BPW budget, not as absolute numbers copied from 7B-scale settings.
    """
    return int(extra_bpw * n_out * n_in // (16 * (n_out + n_in)))
