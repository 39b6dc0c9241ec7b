"""AMLQ (§3.1-3.2, Algorithm 1): per-layer candidates, measured once, then allocated.

For one linear W [out, in] with captured input statistics (H = 2 E[x xᵀ], E[x], E|x|):

1. **α** (AWQ scaling): for each α on the grid, s = S_x^α; the stored input scale is
   c = fp16(1/s), and W_s = W / c. Each α is scored by the δ of round-to-nearest at
   `ALPHA_PROBE` (3-bit, g128), all α at once in one jitted program, as AWQ searches it.
   GPTQ's error feedback already protects salient inputs, so the RTN-best α can hurt
   after GPTQ; the winner is therefore kept only if GPTQ at the probe width gives a lower
   δ with it than with α = 0, and that α serves every candidate of the layer.
   (Algorithm 1 scores α jointly with each preset by the full quantizer: 20 x presets GPTQ
   runs per layer, against 2 here.)
2. **Importance-ordered groups**: column importance from the scaled problem,
   imp_i = Σ_out W_s[:, i]² / [H_s⁻¹]_ii² (the OBS saliency the TAMMP paper also uses);
   groups of `group_size` consecutive columns are ranked by summed importance, and a
   preset q_j's widths (its share of groups at each width) go widest-first down that
   ranking.
3. **GPTQ** on W_s against H_s = diag(s)⁻¹ H diag(s)⁻¹ (eq. 6), columns processed in
   act-order (descending diag H_s), with the per-group widths and static group grids
   (mpq_jax.quant.gptq; see `quantize_preset` for why).
4. **δ and low rank**: ΔW = W − Q(W_s)·c in the original space; δ for no term (AMQ) and
   for every rank of the PCA term with the mean folded into the bias (AMLQ), all from
   one eigen-decomposition (mpq_jax.quant.lowrank).

Every candidate's bit count is what the built `QuantizedLinear` stores (`storage_bits`):
the packed GPTQ layer, plus 16·in for the input scale when α > 0, plus 16·r·(out + in) for
the factors and 16·out for a bias the original layer did not have (AMLQ always stores
one: the folded mean term). `build_layer` constructs exactly that layer, and the tests
check the two agree bit for bit.

Rank sets are given as extra bits per weight and turned into ranks per layer shape
(`lowrank.rank_for_budget`): a rank-r fp16 pair costs 16 r (out + in) / (out in) BPW, so
ranks copied from 7B settings (32-128) would cost SmolLM2's 576-wide layers 1.8-7 BPW.

Not here: capture (mpq_jax.capture), the allocation itself (mpq_jax.allocate), the model
walk (mpq_jax.quant.amlq_model).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.allocate import Candidate
from mpq_jax.stats import InputStats
from mpq_jax.packed.qlinear import DENSE_BITS, QuantizedLinear, storage_bits
from mpq_jax.quant.awq import DEFAULT_ALPHA_GRID, channel_scales
from mpq_jax.quant.gptq import InverseFactor, gptq_quantize, inverse_factor
from mpq_jax.quant.grid import dequantize_codes
from mpq_jax.quant.lowrank import covariance_root, deltas_by_rank, error_spectrum, output_error_pca, rank_for_budget
from mpq_jax.quant.rtn import rtn_codes
from mpq_jax.quant.saliency import column_saliency

ALLOWED_BITS = (2, 3, 4, 5, 6, 8, 16)
ALLOWED_GROUP_SIZES = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A mixed-precision recipe q_j: group size and the share of groups at each width."""

    group_size: int
    shares: tuple[tuple[int, float], ...]  # (bits, share of groups), any order; shares sum to 1

    def __post_init__(self):
        if self.group_size not in ALLOWED_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {ALLOWED_GROUP_SIZES}, got {self.group_size}")
        bits = [b for b, _ in self.shares]
        if not bits or any(b not in ALLOWED_BITS for b in bits) or len(set(bits)) != len(bits):
            raise ValueError(f"widths must be distinct values from {ALLOWED_BITS}, got {bits}")
        if any(share <= 0 for _, share in self.shares) or not math.isclose(sum(s for _, s in self.shares), 1.0, abs_tol=1e-6):
            raise ValueError(f"shares must be positive and sum to 1, got {[s for _, s in self.shares]}")

    @property
    def name(self) -> str:
        mix = "+".join(f"{b}b" if s == 1 else f"{b}b:{s:g}" for b, s in sorted(self.shares, reverse=True))
        return f"{mix} g{self.group_size}"

    def group_bits(self, n_groups: int) -> np.ndarray:
        """Width per group in importance order (widest first); counts by largest remainder."""
        widths = sorted(self.shares, reverse=True)
        exact = [share * n_groups for _, share in widths]
        counts = [math.floor(e) for e in exact]
        for i in sorted(range(len(widths)), key=lambda i: exact[i] - counts[i], reverse=True)[: n_groups - sum(counts)]:
            counts[i] += 1
        return np.concatenate([np.full(c, b, np.int32) for (b, _), c in zip(widths, counts)])

    def mean_bits(self) -> float:
        return sum(b * s for b, s in self.shares)


def _p(group_size: int, **shares: float) -> Preset:
    return Preset(group_size, tuple((int(k[1:]), v) for k, v in shares.items()))


# From 2.2 to ~4.9 stored BPW on SmolLM2's widths, so that every budget from 2.3 to 4.3 has
# choices on both sides.
DEFAULT_PRESETS = (
    _p(128, b2=1.0),
    _p(64, b2=1.0),
    _p(64, b3=0.25, b2=0.75),
    _p(64, b3=0.5, b2=0.5),
    _p(128, b3=1.0),
    _p(64, b3=1.0),
    _p(64, b4=0.5, b3=0.5),
    _p(128, b4=1.0),
    _p(64, b4=1.0),
    _p(64, b8=0.125, b4=0.875),
    _p(32, b16=0.0625, b4=0.9375),
)
DEFAULT_LOWRANK_BPW = (0.0625, 0.125, 0.25, 0.5)  # rank sets as extra BPW per layer


def presets_from_config(presets) -> tuple[Preset, ...]:
    """Presets from config entries (group_size, bits {width: share}); None = the defaults."""
    if presets is None:
        return DEFAULT_PRESETS
    if not presets:
        raise ValueError("give at least one preset")
    out = []
    for i, p in enumerate(presets):
        try:
            out.append(Preset(p.group_size, tuple(sorted(p.bits.items(), reverse=True))))
        except ValueError as exc:
            raise ValueError(f"[{i}]: {exc}") from None
    return tuple(out)
ALPHA_PROBE = (3, 128)  # RTN width and group size that score α


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Everything measured about one layer; candidates[i].label = (preset index, rank or None)."""

    name: str
    shape: tuple[int, int]
    alpha: float
    candidates: tuple[Candidate, ...]


def ranks_for_layer(n_out: int, n_in: int, lowrank_bpw: Sequence[float]) -> tuple[int, ...]:
    """Rank 0 plus the distinct positive ranks that fit each extra-BPW budget."""
    ranks = {0} | {rank_for_budget(n_out, n_in, b) for b in lowrank_bpw}
    return tuple(sorted(r for r in ranks if r <= min(n_out, n_in)))


def input_scale_for(mean_abs: np.ndarray, alpha: float) -> np.ndarray | None:
    """The stored (float16-representable) input scale c = 1/s, float64; None for α = 0."""
    if alpha == 0:
        return None
    return (1.0 / channel_scales(mean_abs, alpha)).astype(np.float16).astype(np.float64)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _rtn_output_errors(w, inv_scales, second_moment, *, bits, group_size):
    """E‖(W − RTN(W / c)·c) x‖² for each row c of inv_scales [A, in] (float32)."""

    def one(c):
        w_s = w / c[None, :]
        codes, scale, zero = rtn_codes(w_s, bits, group_size)
        group = jnp.arange(w.shape[1]) // group_size
        w_hat = dequantize_codes(codes, scale[:, group], zero[:, group]) * c[None, :]
        diff = w - w_hat
        return jnp.sum((diff @ second_moment) * diff)

    return jax.lax.map(one, inv_scales)


def search_alpha(w, stats: InputStats, alpha_grid: Sequence[float], probe: tuple[int, int] = ALPHA_PROBE) -> float:
    """The α of the grid whose scaling gives the least RTN output error at `probe` (bits, group)."""
    inv = [input_scale_for(stats.mean_abs, a) for a in alpha_grid]
    inv = np.stack([np.ones(w.shape[1]) if c is None else c for c in inv]).astype(np.float32)
    errors = _rtn_output_errors(
        jnp.asarray(w, jnp.float32), jnp.asarray(inv), jnp.asarray(stats.hessian / 2, jnp.float32), bits=probe[0], group_size=probe[1]
    )
    return float(alpha_grid[int(np.argmin(np.asarray(errors)))])


def column_importance(w_s, hessian_s, factor: InverseFactor) -> np.ndarray:
    """Σ_out W_s[:, i]² / [H_s⁻¹]_ii² per column, float64 [in]; inputs that never fire get -1.

    [H_s⁻¹]_ii (damped, as GPTQ uses it) is read off GPTQ's factor: with UᵀU = H⁻¹ in the
    processing order, it is the squared norm of U's column for input i — no second inverse.
    """
    upper = np.asarray(factor.upper, np.float64)
    inv_diag = np.empty(upper.shape[0])
    inv_diag[factor.perm] = np.sum(upper**2, axis=0)
    importance = column_saliency(w_s, inv_diag)  # eq. 4 summed over rows
    importance[np.diag(np.asarray(hessian_s)) == 0] = -1.0
    return importance


def group_ranks(importance: np.ndarray, group_size: int) -> np.ndarray:
    """Rank of each group of consecutive columns by summed importance (0 = most important)."""
    n_groups = math.ceil(len(importance) / group_size)
    sums = np.array([np.clip(importance[g * group_size : (g + 1) * group_size], 0, None).sum() for g in range(n_groups)])
    ranks = np.empty(n_groups, np.int64)
    ranks[np.argsort(-sums, kind="stable")] = np.arange(n_groups)
    return ranks


@dataclasses.dataclass(frozen=True)
class ScaledProblem:
    """A layer after AWQ scaling: what every preset of it quantizes."""

    w: np.ndarray  # [out, in] original weights, float32
    bias: np.ndarray | None
    alpha: float
    inv_scale: np.ndarray | None  # stored c = 1/s [in], or None for α = 0
    w_s: np.ndarray  # W / c
    hessian_s: np.ndarray  # H with inputs x * c
    importance: np.ndarray  # per column, float64 [in]
    order: np.ndarray  # importance order of the columns (GPTQ's processing order)
    factor: InverseFactor  # GPTQ's H_s⁻¹ factor in that order, shared by every preset


def scaled_problem(w, stats: InputStats, alpha: float, bias=None, percdamp: float = 0.01) -> ScaledProblem:
    w = np.asarray(w, np.float32)
    c = input_scale_for(stats.mean_abs, alpha)
    c_or_1 = np.ones(w.shape[1]) if c is None else c
    w_s = (w / c_or_1[None, :]).astype(np.float32)
    hessian_s = np.asarray(stats.hessian, np.float64) * np.outer(c_or_1, c_or_1)  # eq. 6 with s = 1/c
    order = np.argsort(-np.diag(hessian_s), kind="stable").astype(np.int32)
    factor = inverse_factor(hessian_s, order, percdamp)
    importance = column_importance(w_s, hessian_s, factor)
    return ScaledProblem(w, bias, alpha, c, w_s, hessian_s, importance, order, factor)


def quantize_preset(problem: ScaledProblem, preset: Preset, percdamp: float = 0.01) -> QuantizedLinear:
    """GPTQ of the scaled weights at the preset's widths, with the input scale attached.

    Groups are runs of consecutive original columns with grids fixed from W_s up front
    (GPTQ's static groups), the preset's widths go to the groups in order of summed column
    importance, and columns are processed in act-order. Measured on SmolLM2 (3-bit g128,
    α = 0, WikiText-2 PPL on 2 windows, ad hoc): groups formed in importance order with
    grids found on the fly 84.8; static groups processed in importance order 62.3; static
    groups in act-order 52.9, identical to our uniform GPTQ.
    """
    n_groups = math.ceil(problem.w.shape[1] / preset.group_size)
    widths_by_rank = preset.group_bits(n_groups)
    result = gptq_quantize(
        problem.w_s,
        problem.hessian_s,
        widths_by_rank[group_ranks(problem.importance, preset.group_size)],
        preset.group_size,
        perm=problem.order,
        static_groups=True,
        percdamp=percdamp,
        bias=problem.bias,
        factor=problem.factor,
        with_loss=False,  # δ is measured in the original space instead
    )
    if problem.inv_scale is None:
        return result.qlinear
    return dataclasses.replace(result.qlinear, input_scale=jnp.asarray(problem.inv_scale, jnp.float16))


def choose_scaling(w, stats: InputStats, alpha_grid: Sequence[float], bias=None, percdamp: float = 0.01) -> ScaledProblem:
    """The scaled problem at the RTN-searched α, or at α = 0 if GPTQ does better there."""
    unscaled = scaled_problem(w, stats, 0.0, bias, percdamp)
    alpha = search_alpha(w, stats, alpha_grid)
    if alpha == 0:
        return unscaled
    scaled = scaled_problem(w, stats, alpha, bias, percdamp)
    probe = Preset(ALPHA_PROBE[1], ((ALPHA_PROBE[0], 1.0),))
    m = np.asarray(stats.hessian, np.float32) / 2

    def output_error(problem):  # float32: only the comparison matters
        d = np.asarray(w, np.float32) - np.asarray(quantize_preset(problem, probe, percdamp).dequantize())
        return float(np.sum((d @ m) * d, dtype=np.float64))

    return scaled if output_error(scaled) < output_error(unscaled) else unscaled


def candidate_bits(qlinear: QuantizedLinear, rank: int | None) -> int:
    """Stored bits once the low-rank option (None = AMQ: nothing added) is attached."""
    bits = storage_bits(qlinear)
    if rank is None:
        return bits
    bits += 16 * rank * (qlinear.out_features + qlinear.in_features)
    if qlinear.bias is None:
        bits += 16 * qlinear.out_features  # the folded mean term needs a bias
    return bits


def preset_storage_bits(n_out: int, n_in: int, preset: Preset, dearest: bool = False) -> int:
    """Stored bits of a preset's packed layer (codes, scales, zeros, dense columns; no bias,
    input scale or low-rank term), from the shape alone.

    Exactly what `quantize_preset` stores whenever `n_in` is a multiple of 32 (as in every
    Llama/Qwen layer): every group then fills whole code words. Otherwise the short last
    group may get any width and its run's last code word is padded, so this gives a bound:
    the cheapest case (the widest width on the short group, no padding), or with `dearest`
    the dearest (the widest widths on full groups, the short group's run padded to 32 columns).
    """
    n_groups = math.ceil(n_in / preset.group_size)
    cols = sorted([preset.group_size] * (n_groups - 1) + [n_in - preset.group_size * (n_groups - 1)], reverse=dearest)
    widths = sorted(preset.group_bits(n_groups).tolist(), reverse=True)
    code_bits = sum(b * c for b, c in zip(widths, cols))  # dense (16-bit) columns: 16 bits each too
    grids = sum(1 for b in widths if b != DENSE_BITS)  # fp16 scale + uint8 zero per group and row
    padding = 0
    if dearest and n_in % 32:
        padding = max((b for b in widths if b != DENSE_BITS), default=0) * (32 - n_in % 32)
    return n_out * (code_bits + 24 * grids + padding)


def reachable_bits(n_out: int, n_in: int, has_bias: bool, presets: Sequence[Preset], lowrank_bpw: Sequence[float] | None) -> tuple[int, int]:
    """(at least, at most) the stored bits of any candidate `measure_layer` can give this layer,
    known before measuring: the cheapest preset with nothing added, and the dearest with an
    input scale, a bias and the largest rank (the measured candidates lie in between)."""
    bias = 16 * n_out
    rank = max(ranks_for_layer(n_out, n_in, lowrank_bpw), default=0) if lowrank_bpw is not None else 0
    low = min(preset_storage_bits(n_out, n_in, p) for p in presets) + (bias if has_bias else 0)
    dearest = max(preset_storage_bits(n_out, n_in, p, dearest=True) for p in presets)
    high = dearest + 16 * n_in + bias + 16 * rank * (n_out + n_in)
    return low, high


def measure_layer(
    name: str,
    w,
    stats: InputStats,
    presets: Sequence[Preset],
    *,
    alpha_grid: Sequence[float] = DEFAULT_ALPHA_GRID,
    lowrank_bpw: Sequence[float] | None = DEFAULT_LOWRANK_BPW,
    bias=None,
    percdamp: float = 0.01,
    keep: dict | None = None,
) -> LayerPlan:
    """Candidates (bits, δ, (preset index, rank)) of one layer.

    Every preset gives an AMQ candidate (rank None: nothing added) and, unless lowrank_bpw is
    None, one AMLQ candidate per rank (0 = the folded mean term alone), so one measuring
    pass serves both methods. With `keep`, the quantized layer of each preset is stored there under (name, index), so
    that building the chosen layers needs no second GPTQ run.
    """
    w = np.asarray(w, np.float32)
    second_moment = np.asarray(stats.hessian, np.float64) / 2
    w64 = w.astype(np.float64)
    signal = float(np.sum((w64 @ second_moment) * w64))
    root = covariance_root(second_moment, stats.mean)
    problem = choose_scaling(w, stats, alpha_grid, bias, percdamp)
    ranks = ranks_for_layer(*w.shape, lowrank_bpw) if lowrank_bpw is not None else ()
    candidates = []
    for index, preset in enumerate(presets):
        qlinear = quantize_preset(problem, preset, percdamp)
        if keep is not None:
            keep[(name, index)] = qlinear
        delta_w = w64 - np.asarray(qlinear.dequantize(), np.float64)
        spectrum = error_spectrum(delta_w, root, stats.mean, top=max(ranks, default=0))
        deltas = deltas_by_rank(*spectrum, max(signal, 1e-30), ranks)
        for rank in [None, *ranks]:
            candidates.append(Candidate(bits=candidate_bits(qlinear, rank), loss=deltas[rank], label=(index, rank)))
    return LayerPlan(name=name, shape=tuple(w.shape), alpha=problem.alpha, candidates=tuple(candidates))


def build_layer(
    w, stats: InputStats, plan: LayerPlan, choice: Candidate, presets: Sequence[Preset], *, bias=None, percdamp: float = 0.01, kept=None
) -> QuantizedLinear:
    """The QuantizedLinear of the chosen candidate: GPTQ layer (or the kept one) plus the PCA term."""
    index, rank = choice.label
    if kept is None:
        kept = quantize_preset(scaled_problem(w, stats, plan.alpha, bias, percdamp), presets[index], percdamp)
    if rank is None:
        return kept
    w64 = np.asarray(w, np.float64)
    term = output_error_pca(w64 - np.asarray(kept.dequantize(), np.float64), np.asarray(stats.hessian, np.float64) / 2, stats.mean, rank)
    old_bias = np.zeros(w64.shape[0]) if kept.bias is None else np.asarray(kept.bias, np.float64)
    return QuantizedLinear.create(
        kept.segments,
        perm=kept.perm,
        lowrank_b=term.b if rank else None,
        lowrank_a=term.a if rank else None,
        bias=old_bias + term.bias_add,
        input_scale=kept.input_scale,
    )


def layer_summary(plan: LayerPlan, choice: Candidate, presets: Sequence[Preset]) -> dict:
    """One row of the per-layer report."""
    index, rank = choice.label
    preset = presets[index]
    n_in, n_out = plan.shape[1], plan.shape[0]
    return {
        "name": plan.name,
        "shape": list(plan.shape),
        "preset": preset.name,
        "mean_code_bits": preset.mean_bits(),
        "group_size": preset.group_size,
        "alpha": plan.alpha,
        "rank": rank,
        "bits_per_weight": choice.bits / (n_in * n_out),
        "delta": choice.loss,
        "dense_share": sum(s for b, s in preset.shares if b == DENSE_BITS),
    }
