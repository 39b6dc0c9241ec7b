"""TAMMP's post-training half per layer: column probing, compactness, column classes.

TAMMP (the paper in shared/papers/tammp.md) probes each layer's input columns with the
Hessian saliency of eq. 4 (`mpq_jax.quant.saliency`), once per calibration source:
  - `probe_columns`: Algorithm 1 per block of β consecutive input columns: the top-k and
    bottom-k columns by summed saliency, each list cut by BiLLM's structural search
    (`structural_search`), give the source's critical and non-critical columns (§4.1);
  - `consensus_jaccard`, `compactness`: how much the sources agree (Appendix A, eqs. 5-8;
    Figure 4);
  - `strategy1`, `strategy2`, `single_source`: the sources' sets made into three column
    classes kept in float16 / 3-bit / 2-bit (§4.2, Table 5; SMP of §5.4);
  - `sorted_classes`: Figure 5's grouping by sorted importance instead (§5.1, PPL runs).

Representations. A source's probe is a `ColumnSets`; the three-class allocation is a
`ColumnClasses` (a partition of range(n_in)); what a quantizer consumes is a per-column
width array, int32 [n_in], which `ColumnClasses.column_bits` produces and `sorted_classes`
returns directly (its widths are not three fixed classes).

  - `quantize_layer`: a layer quantized by GPTQ with those widths, each class a contiguous
    run of columns (`class_order`), giving an ordinary `QuantizedLinear`.

Arrays in, arrays, sets and layers out, numpy on the host. Not here: collecting Hessians per
source, walking the model (mpq_jax.quant.tammp_model), configuration or training (QAT).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.packed.qlinear import DENSE_BITS
from mpq_jax.quant.gptq import gptq_quantize
from mpq_jax.quant.saliency import saliency

BINARIZATION_ORDER = 2  # BiLLM's structural search approximates each group at residual order 2
SORTED_WIDTHS = (2, 3, 4)  # Figure 5: averages spaced between 2 and 4 bits
# Entries of one [splits, rows, width] temporary in the structural search (32 MiB of
# float64): rows are independent, so they are processed in chunks of this size.
_SEARCH_CHUNK_ENTRIES = 1 << 22
# Slack on the width the non-critical columns of `sorted_classes` need, for the float
# rounding of target_bits · n_in (~1e-15 relative); far below one column's 1 / n_in.
_TARGET_SLACK = 1e-9


# ---------------------------------------------------------------------------------------
# Column probing (§4.1, Algorithm 1)


@dataclasses.dataclass(frozen=True, eq=False)
class ColumnSets:
    """One source's probe of a layer: disjoint sorted int64 arrays of original input columns."""

    critical: np.ndarray  # columns the source finds salient (float16 candidates)
    non_critical: np.ndarray  # columns it finds least salient (2-bit candidates)

    def __post_init__(self):
        for name in ("critical", "non_critical"):
            object.__setattr__(self, name, np.unique(np.asarray(getattr(self, name), np.int64)))
        if np.intersect1d(self.critical, self.non_critical).size:
            raise ValueError("ColumnSets: critical and non_critical must be disjoint")


def residual_binarize(x, mask, order: int = BINARIZATION_ORDER) -> np.ndarray:
    """BiLLM's row-wise residual binarization of the entries of x [..., n] where mask is set.

    Per row (last axis) and order: μ = mean of the residual r over the masked entries,
    α = mean |r − μ| over them, b = μ + α·sign(r − μ); the approximation is the sum of the
    b's, the next order working on r − b. Entries outside the mask are 0 in the result and
    take no part in any mean; a row with no masked entry is all 0. Returns float64 of the
    broadcast shape of x and mask.
    """
    x, mask = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(mask, bool))
    # Explicit masks, not BiLLM's NaN fill: it relies on torch.sign(nan) == 0, numpy gives nan.
    count = np.maximum(mask.sum(axis=-1, keepdims=True), 1)  # empty rows: sums are 0, so μ = α = 0
    approx = np.zeros(x.shape)
    for _ in range(order):
        residual = np.where(mask, x - approx, 0.0)
        mean = residual.sum(axis=-1, keepdims=True) / count
        centred = np.where(mask, residual - mean, 0.0)
        scale = np.abs(centred).sum(axis=-1, keepdims=True) / count
        approx = approx + np.where(mask, mean + scale * np.sign(centred), 0.0)
    return approx


def split_errors(S_block, candidates) -> np.ndarray:
    """Structural search error of each split, float64 [len(candidates)].

    Entry i − 1 is Σ (S − Ŝ_i)² over the block, where Ŝ_i binarizes (`residual_binarize`)
    group A = the first i candidates and group B = every other column of the block apart.
    Group A lives in the candidate columns alone, so it is binarized on those [rows, k];
    group B on the whole block: O(k · rows · width) work, in chunks of rows.
    """
    S = np.asarray(S_block, np.float64)  # [rows, width]
    n_splits = len(candidates)
    prefix = np.tri(n_splits, dtype=bool)[:, None, :]  # [splits, 1, k]: split i takes candidates[:i]
    in_b = np.ones((n_splits, 1, S.shape[1]), bool)  # [splits, 1, width]
    for i in range(n_splits):
        in_b[i, 0, candidates[: i + 1]] = False
    chunk = max(1, _SEARCH_CHUNK_ENTRIES // max(1, n_splits * S.shape[1]))
    errors = np.zeros(n_splits)
    for start in range(0, S.shape[0], chunk):
        rows = S[None, start : start + chunk]  # [1, chunk, width]
        a = rows[..., candidates]  # [1, chunk, k]
        errors += np.sum(np.where(prefix, a - residual_binarize(a, prefix), 0.0) ** 2, axis=(1, 2))
        errors += np.sum(np.where(in_b, rows - residual_binarize(rows, in_b), 0.0) ** 2, axis=(1, 2))
    return errors


def structural_search(S_block, candidates) -> np.ndarray:
    """BiLLM's structural search: the prefix of `candidates` that best splits the block.

    S_block: [rows, width] saliency of one block; candidates: [k] distinct column indices
    of the block, in the order they are tried (most salient first for critical columns).
    For every i = 1..k, group A = candidates[:i] and group B = all other columns of the
    block are each approximated by order-2 row-wise residual binarization
    (`residual_binarize`), and error_i = Σ_{rows, columns} (S − approx)². Returns
    candidates[:i*], int64, for the smallest i* minimising error_i (first of ties).

    BiLLM's loop is `range(1, up_lim)`, so it never tries all up_lim candidates; here i
    runs to k inclusive, so that `topk` is the largest number of columns a block can keep,
    as TAMMP states it (§5.1: "we cap the maximum number (topk) of critical columns at 10").
    BiLLM's error is a mean over the block, a constant multiple of this sum: same argmin.
    """
    S = np.asarray(S_block, np.float64)
    candidates = np.asarray(candidates, np.int64)
    if S.ndim != 2:
        raise ValueError(f"S_block must be [rows, width], got shape {S.shape}")
    if candidates.ndim != 1 or len(np.unique(candidates)) != len(candidates):
        raise ValueError(f"candidates must be distinct column indices, got {candidates.tolist()}")
    if len(candidates) and not (0 <= candidates.min() and candidates.max() < S.shape[1]):
        raise ValueError(f"candidates must lie in 0..{S.shape[1] - 1}, got {candidates.tolist()}")
    if len(candidates) == 0:
        return candidates
    best = int(np.argmin(split_errors(S, candidates)))
    return candidates[: best + 1]


def probe_columns(w, inv_diag, topk: int = 10, block_size: int = 128, non_critical: bool = True) -> ColumnSets:
    """Algorithm 1 on w [out, in]: critical and non-critical columns per block of columns.

    inv_diag: [in] from `saliency.inverse_hessian_diagonal` (per-column values of eq. 4,
    where Algorithm 1's line 1 writes the block of the Hessian inverse). Each block of
    `block_size` consecutive columns (the last may be narrower) is probed alone, as
    `probe_columns_reference` does with `structural_search`; at most min(topk, width) columns
    of a block are critical and as many non-critical. Inputs that never fire should have
    their columns of w zeroed first (GPTQ drops them), so they score 0 and never look critical.

    Candidates are chosen on the host in float64 exactly as the reference chooses them; the
    split errors of every block come from one jitted float32 program (`_split_errors`,
    summed over rows in float64 here), 20-50x faster than the numpy reference. Float32 can
    only change a choice between two splits whose errors agree to ~1e-5 relative.
    `non_critical=False` skips the second search (compactness needs critical columns only).
    """
    w, inv_diag = _checked_probe_args(w, inv_diag, topk, block_size)
    S = saliency(w, inv_diag)  # [out, in] float64
    n_out, n_in = S.shape
    n_blocks = math.ceil(n_in / block_size)
    padded = np.zeros((n_out, n_blocks * block_size), np.float32)
    padded[:, :n_in] = S
    blocks = jnp.asarray(padded.reshape(n_out, n_blocks, block_size).transpose(1, 0, 2))  # [blocks, out, β]
    starts = range(0, n_in, block_size)
    scores = [S[:, start : min(start + block_size, n_in)].sum(axis=0) for start in starts]  # as the reference sums
    k = min(topk, block_size)
    valid = (np.arange(n_blocks * block_size) < n_in).reshape(n_blocks, block_size)
    critical = _search_blocks(blocks, valid, [np.argsort(-score, kind="stable")[:topk] for score in scores], k)
    offsets = list(starts)
    if not non_critical:
        return ColumnSets(np.concatenate([c + o for c, o in zip(critical, offsets)]), np.zeros(0, np.int64))
    bottoms = []
    for score, chosen in zip(scores, critical):
        rest = np.setdiff1d(np.arange(len(score)), chosen)
        bottoms.append(rest[np.argsort(score[rest], kind="stable")][:topk])
    found = _search_blocks(blocks, valid, bottoms, k)
    return ColumnSets(
        np.concatenate([c + o for c, o in zip(critical, offsets)]),
        np.concatenate([c + o for c, o in zip(found, offsets)]),
    )


def _checked_probe_args(w, inv_diag, topk, block_size) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w)
    inv_diag = np.asarray(inv_diag, np.float64)
    for name, value in (("topk", topk), ("block_size", block_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if w.ndim != 2 or inv_diag.shape != (w.shape[1],):
        raise ValueError(f"w must be [out, in] and inv_diag [in]; got {w.shape} and {inv_diag.shape}")
    return w, inv_diag


def _search_blocks(blocks, valid, candidates: list[np.ndarray], k: int) -> list[np.ndarray]:
    """`structural_search` of every block at once: candidates[b] (at most k, local indices)
    -> the chosen prefix per block."""
    table = np.full((len(candidates), k), -1, np.int32)
    for b, cand in enumerate(candidates):
        table[b, : len(cand)] = cand
    per_row = np.asarray(_split_errors(blocks, jnp.asarray(table), jnp.asarray(valid)), np.float64)  # [blocks, k, out]
    errors = per_row.sum(axis=-1)
    counts = np.array([len(c) for c in candidates])
    errors[np.arange(k)[None, :] >= counts[:, None]] = np.inf  # splits past a short list do not exist
    return [cand[: int(np.argmin(e)) + 1] if len(cand) else cand for cand, e in zip(candidates, errors)]


@jax.jit
def _split_errors(blocks, candidates, valid):
    """Per-row split errors, float32 [blocks, k, rows]: entry [b, i, r] is row r's
    Σ (S − Ŝ_i)² in block b (the terms of `split_errors`).

    blocks [blocks, rows, β]; candidates [blocks, k] local indices, −1 = none; valid
    [blocks, β] marks the layer's real columns (the last block may be padded: padding is
    zero and in neither group, so it adds nothing). Blocks run one after another
    (lax.map), so memory is one [k, rows, β] block.
    """
    width = blocks.shape[-1]
    in_a = jnp.cumsum(candidates[..., None] == jnp.arange(width), axis=1) > 0  # [blocks, k, β]: group A of split i

    def one_block(args):
        S, a, real = args  # [rows, β], [k, β], [β]
        b = real[None, :] & ~a
        approx = _binarize(S[None], a[:, None, :]) + _binarize(S[None], b[:, None, :])  # [k, rows, β]
        return jnp.sum((S[None] - approx) ** 2, axis=-1)

    return jax.lax.map(one_block, (blocks, in_a, valid))


def _binarize(x, mask):
    """`residual_binarize` in jnp on x [k, rows, β] with masks [k, 1, β]."""
    count = jnp.maximum(mask.sum(axis=-1, keepdims=True), 1)
    approx = jnp.zeros(x.shape, x.dtype)
    for _ in range(BINARIZATION_ORDER):
        residual = jnp.where(mask, x - approx, 0.0)
        mean = residual.sum(axis=-1, keepdims=True) / count
        centred = jnp.where(mask, residual - mean, 0.0)
        scale = jnp.abs(centred).sum(axis=-1, keepdims=True) / count
        approx = approx + jnp.where(mask, mean + scale * jnp.sign(centred), 0.0)
    return approx


def probe_columns_reference(w, inv_diag, topk: int = 10, block_size: int = 128) -> ColumnSets:
    """`probe_columns` in plain float64 numpy, block by block through `structural_search`:
    the definition the fast path is tested against."""
    w, inv_diag = _checked_probe_args(w, inv_diag, topk, block_size)
    critical, non_critical = [], []
    for start in range(0, w.shape[1], block_size):
        stop = min(start + block_size, w.shape[1])
        block_critical, block_non_critical = _probe_block(saliency(w[:, start:stop], inv_diag[start:stop]), topk)
        critical.append(block_critical + start)
        non_critical.append(block_non_critical + start)
    return ColumnSets(np.concatenate(critical), np.concatenate(non_critical))


def _probe_block(S, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """(critical, non-critical) column indices of one block S [rows, width], local.

    Candidates are ranked by summed saliency (Algorithm 1, lines 2-3), ties by column
    index. The non-critical candidates are the k least salient columns *among those not
    already critical*, so the two sets are disjoint even when the block is narrower than
    2k; in a block of width ≥ 2k this is exactly Algorithm 1's bottom-k.
    """
    score = S.sum(axis=0)  # [width]
    critical = structural_search(S, np.argsort(-score, kind="stable")[:topk])
    rest = np.setdiff1d(np.arange(S.shape[1]), critical)
    bottom = rest[np.argsort(score[rest], kind="stable")][:topk]
    return critical, structural_search(S, bottom)


# ---------------------------------------------------------------------------------------
# Compactness (Appendix A, eqs. 5-8)


def consensus_jaccard(sets: Sequence, p: int) -> float:
    """Mean consensus Jaccard similarity J̄ of K sets at threshold p (eqs. 5-8).

    sets: K collections of hashable elements (sets, lists or 1-D arrays). f(x) = number
    of sets holding x; A_core = {x : f(x) ≥ p}; J_k = |A_k ∩ A_core| / |A_k ∪ A_core|;
    returns the mean of J_k over k. Convention: J_k = 1 when A_k and A_core are both empty
    (two empty sets are identical). Raises ValueError naming p unless p is in 1..K.
    """
    sets = [_as_set(s) for s in sets]
    if not sets:
        raise ValueError("sets must hold at least one set")
    if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or not 1 <= p <= len(sets):
        raise ValueError(f"p must be an integer in 1..{len(sets)} (the number of sets), got {p!r}")
    frequency = collections.Counter(x for s in sets for x in s)
    core = {x for x, f in frequency.items() if f >= p}
    return float(np.mean([_jaccard(s, core) for s in sets]))


def _as_set(elements) -> set:
    if isinstance(elements, np.ndarray):
        return set(elements.tolist())  # Python ints, so arrays and sets of ints compare alike
    return set(elements)


def _jaccard(a: set, b: set) -> float:
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def layer_type(layer_name: str) -> str:
    """The last dotted part of a layer name: "layers.3.self_attn.q_proj" -> "q_proj"."""
    return layer_name.rsplit(".", 1)[-1]


def compactness(per_set_columns: Mapping[str, Mapping[str, Iterable]], thresholds: Iterable[int]) -> dict:
    """Compactness of the sources' critical columns, overall and per layer type (Figure 4).

    per_set_columns[set_name][layer_name]: critical columns of that layer probed on that
    calibration set; every set must name the same layers. Elements are (layer_name, column)
    pairs, so a column agrees only with the same column of the same layer. Returns
    {"overall": {p: J̄}, "by_type": {layer_type: {p: J̄}}}, "overall" pooling every layer
    and each type pooling the layers of that type (`layer_type`).
    """
    columns = list(per_set_columns.values())
    if not columns:
        raise ValueError("per_set_columns must hold at least one calibration set")
    layers = set(columns[0])
    for set_name, by_layer in per_set_columns.items():
        if set(by_layer) != layers:
            raise ValueError(f"per_set_columns[{set_name!r}] names other layers than the first set")
    thresholds = list(thresholds)
    by_type = collections.defaultdict(list)
    for layer in sorted(layers):
        by_type[layer_type(layer)].append(layer)

    def pooled(layer_names):
        sets = [_layer_column_pairs(by_layer, layer_names) for by_layer in columns]
        return {p: consensus_jaccard(sets, p) for p in thresholds}

    return {"overall": pooled(sorted(layers)), "by_type": {t: pooled(names) for t, names in by_type.items()}}


def _layer_column_pairs(by_layer: Mapping[str, Iterable], layer_names: Iterable[str]) -> set:
    """{(layer_name, column)} of one calibration set over the named layers."""
    return {(layer, int(c)) for layer in layer_names for c in np.asarray(by_layer[layer]).ravel()}


# ---------------------------------------------------------------------------------------
# Column classes (§4.2, Table 5; §5.1)


@dataclasses.dataclass(frozen=True, eq=False)
class ColumnClasses:
    """A partition of range(n_in) into TAMMP's three classes: sorted int64 column arrays."""

    critical: np.ndarray  # kept in float16
    sub_critical: np.ndarray  # 3-bit in the paper
    non_critical: np.ndarray  # 2-bit in the paper

    def __post_init__(self):
        for name in ("critical", "sub_critical", "non_critical"):
            object.__setattr__(self, name, np.sort(np.asarray(getattr(self, name), np.int64)))
        every = np.sort(np.concatenate([self.critical, self.sub_critical, self.non_critical]))
        if not np.array_equal(every, np.arange(len(every))):
            raise ValueError("ColumnClasses: the three classes must partition range(n_in)")

    @property
    def n_in(self) -> int:
        return len(self.critical) + len(self.sub_critical) + len(self.non_critical)

    def shares(self) -> tuple[float, float, float]:
        """(critical, sub-critical, non-critical) fractions of the columns (Table 5)."""
        return tuple(len(c) / self.n_in for c in (self.critical, self.sub_critical, self.non_critical))

    def column_bits(self, critical_bits: int = DENSE_BITS, sub_bits: int = 3, non_bits: int = 2) -> np.ndarray:
        """Width of every input column, int32 [n_in]."""
        bits = np.empty(self.n_in, np.int32)
        bits[self.critical] = critical_bits
        bits[self.sub_critical] = sub_bits
        bits[self.non_critical] = non_bits
        return bits

    def code_bits(self, critical_bits: int = DENSE_BITS, sub_bits: int = 3, non_bits: int = 2) -> float:
        """Mean bits per weight of the codes alone, no scales or zeros (Table 5's average)."""
        critical, sub, non = self.shares()
        return critical * critical_bits + sub * sub_bits + non * non_bits


def strategy1(sets: Sequence[ColumnSets], n_in: int) -> ColumnClasses:
    """Strategy 1 (§4.2): critical = ∩ of the sources' critical columns, sub-critical = the
    rest of their ∪, non-critical = every other column."""
    critical, _ = _source_masks(sets, n_in)
    return _classes(critical.all(axis=0), ~critical.any(axis=0))


def strategy2(sets: Sequence[ColumnSets], n_in: int) -> ColumnClasses:
    """Strategy 2 (§4.2): critical = ∩ of the critical columns, non-critical = ∪ of the
    non-critical columns less the critical ones, sub-critical = every other column.

    A column critical for one source and non-critical for another is non-critical.
    """
    critical, non_critical = _source_masks(sets, n_in)
    shared = critical.all(axis=0)
    return _classes(shared, non_critical.any(axis=0) & ~shared)


def single_source(source: ColumnSets, n_in: int) -> ColumnClasses:
    """Single-source mixed precision (SMP, §5.4): that source's critical columns and the
    rest non-critical; no sub-critical class."""
    (critical,), _ = _source_masks([source], n_in)
    return _classes(critical, ~critical)


def _source_masks(sets: Sequence[ColumnSets], n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """(critical, non-critical) membership of each source, bool [sources, n_in] each."""
    if not sets:
        raise ValueError("sets must hold at least one source's ColumnSets")
    critical = np.stack([_mask(s.critical, n_in) for s in sets])
    non_critical = np.stack([_mask(s.non_critical, n_in) for s in sets])
    return critical, non_critical


def _mask(columns, n_in: int) -> np.ndarray:
    columns = np.asarray(columns, np.int64)
    if columns.size and not (0 <= columns.min() and columns.max() < n_in):
        raise ValueError(f"columns must lie in 0..{n_in - 1} (n_in = {n_in}), got {columns.min()}..{columns.max()}")
    mask = np.zeros(n_in, bool)
    mask[columns] = True
    return mask


def _classes(critical: np.ndarray, non_critical: np.ndarray) -> ColumnClasses:
    """ColumnClasses from disjoint bool [n_in] masks; the columns in neither are sub-critical."""
    sub_critical = ~(critical | non_critical)
    return ColumnClasses(*(np.flatnonzero(m) for m in (critical, sub_critical, non_critical)))


def sorted_classes(column_score, n_in: int, target_bits: float, critical_share: float = 0.01) -> np.ndarray:
    """Figure 5's importance-sorted widths, int32 [n_in].

    The ⌊critical_share · n_in + ½⌋ highest-scoring columns (column_score: [n_in], e.g.
    `saliency.column_saliency`) are float16; the others need a mean x of SORTED_WIDTHS
    bits for the code-only mean to be target_bits, and get ⌈x⌉ for the most important
    fraction (x − ⌊x⌋), ⌊x⌋ for the rest (ties by column index). The mean is within half a
    column's worth (0.5 / n_in bits) of target_bits. Raises ValueError naming target_bits
    outside the reachable range, or the argument that is malformed.
    """
    score = np.asarray(column_score, np.float64)
    if score.shape != (n_in,):
        raise ValueError(f"column_score must be [n_in] = [{n_in}], got shape {score.shape}")
    if not 0 <= critical_share < 1:
        raise ValueError(f"critical_share must be in [0, 1), got {critical_share}")
    n_critical = math.floor(critical_share * n_in + 0.5)
    n_rest = n_in - n_critical
    if n_rest == 0:
        raise ValueError(f"critical_share={critical_share} leaves no column of {n_in} to quantize")
    lowest, highest = min(SORTED_WIDTHS), max(SORTED_WIDTHS)
    rest_bits = (target_bits * n_in - DENSE_BITS * n_critical) / n_rest
    if not lowest - _TARGET_SLACK <= rest_bits <= highest + _TARGET_SLACK:
        reachable = [(DENSE_BITS * n_critical + b * n_rest) / n_in for b in (lowest, highest)]
        raise ValueError(
            f"target_bits={target_bits} is not reachable with {n_critical} float16 columns of {n_in}: "
            f"it must lie in [{reachable[0]:.4f}, {reachable[1]:.4f}]"
        )
    rest_bits = min(max(rest_bits, lowest), highest)
    floor_bits = min(math.floor(rest_bits), highest - 1)  # so that floor_bits + 1 is a width, even at x = 4
    n_ceil = min(n_rest, math.floor((rest_bits - floor_bits) * n_rest + 0.5))
    order = np.argsort(-score, kind="stable")
    bits = np.full(n_in, floor_bits, np.int32)
    bits[order[:n_critical]] = DENSE_BITS
    bits[order[n_critical : n_critical + n_ceil]] = floor_bits + 1
    return bits


# ---------------------------------------------------------------------------------------
# Quantization of a layer with its column widths (§4.2, quantized by GPTQ)

DENSE_POSITIONS = ("last", "first")


def class_order(column_bits, hessian, dense_position: str = "last") -> tuple[np.ndarray, list[tuple[int, int]]]:
    """GPTQ's processing order and runs for per-column widths, int32 [in] and [(n_cols, bits)].

    Columns of one width are contiguous, narrowest first, and act-ordered inside a width
    (descending diag H, as GPTQ orders columns), so every later column can absorb the error
    of the coarser ones before it. Dense (16-bit) columns come last or first: processed
    last, they take the compensation of every other column and store it almost exactly (as
    OWQ keeps its weak columns); `scripts/bench_tammp.py` measures both.
    """
    if dense_position not in DENSE_POSITIONS:
        raise ValueError(f"dense_position must be one of {DENSE_POSITIONS}, got {dense_position!r}")
    column_bits = np.asarray(column_bits)
    act = np.argsort(-np.diag(np.asarray(hessian)), kind="stable")
    widths = sorted(set(column_bits.tolist()) - {DENSE_BITS})
    if DENSE_BITS in column_bits:
        widths = widths + [DENSE_BITS] if dense_position == "last" else [DENSE_BITS] + widths
    perm = np.concatenate([act[column_bits[act] == bits] for bits in widths]).astype(np.int32)
    runs = [(int(np.sum(column_bits == bits)), int(bits)) for bits in widths]
    return perm, runs


def quantize_layer(w, hessian, column_bits, group_size: int, *, dense_position: str = "last", percdamp: float = 0.01, bias=None):
    """GPTQ of w [out, in] on hessian [in, in] with the given width of every input column
    (int [in]; 16 = kept in float16): one packed segment per width, groups of `group_size`
    inside each. Returns mpq_jax.quant.gptq.GPTQResult (layer, loss, damping)."""
    perm, runs = class_order(column_bits, hessian, dense_position)
    return gptq_quantize(w, hessian, None, group_size, perm=perm, runs=runs, percdamp=percdamp, bias=bias)
