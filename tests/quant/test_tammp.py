"""TAMMP's per-layer core (mpq_jax.quant.tammp): structural search, Algorithm 1's probing,
consensus Jaccard compactness, and the column classes and their bit accounting.

The binarization is checked against a per-row loop in float64 that computes each mean over
the selected entries only. Both sum at most 9 values per mean, so each mean, scale and
approximation agrees to ~9 ε relative to max |x|; we allow 64 ε · max |x| absolute. (The
sign of a centred entry could differ only if it were within that of 0, which continuous
random data never is; a one-entry group centres to exactly 0 in both.)
"""

from __future__ import annotations

import numpy as np
import pytest

from mpq_jax.quant.tammp import (
    ColumnClasses,
    ColumnSets,
    compactness,
    consensus_jaccard,
    layer_type,
    probe_columns,
    residual_binarize,
    single_source,
    sorted_classes,
    split_errors,
    strategy1,
    strategy2,
    structural_search,
)

EPS = np.finfo(np.float64).eps


def row_loop_binarize(x, mask, order):
    """Reference: x [rows, n], mask [rows, n]; each row's masked entries, order by order."""
    out = np.zeros_like(x, dtype=np.float64)
    for r in range(x.shape[0]):
        values = x[r, mask[r]].astype(np.float64)
        approx = np.zeros_like(values)
        for _ in range(order):
            residual = values - approx
            if len(values) == 0:
                break
            mean = residual.mean()
            scale = np.abs(residual - mean).mean()
            approx = approx + mean + scale * np.sign(residual - mean)
        out[r, mask[r]] = approx
    return out


@pytest.mark.parametrize("seed", range(4))
def test_residual_binarize_against_row_loop(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 7, 9)) * rng.uniform(0.1, 10, (3, 7, 1))
    mask = rng.random((3, 7, 9)) < 0.5
    mask[0, 0] = False  # an empty row: contributes nothing
    mask[0, 1] = True  # a full row
    mask[0, 2] = np.arange(9) == 4  # a single entry: reproduced exactly
    for order in (1, 2):
        got = residual_binarize(x, mask, order)
        expected = np.stack([row_loop_binarize(x[b], mask[b], order) for b in range(3)])
        np.testing.assert_allclose(got, expected, rtol=0, atol=64 * EPS * np.abs(x).max())
        assert np.all(got[~mask] == 0) and np.all(got[0, 0] == 0)
        assert got[0, 2, 4] == x[0, 2, 4]


def test_residual_binarize_broadcasts_masks():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 10))
    masks = rng.random((4, 1, 10)) < 0.6  # one mask per split, shared by the rows
    got = residual_binarize(x[None], masks)
    for k in range(4):
        np.testing.assert_array_equal(got[k], residual_binarize(x, np.broadcast_to(masks[k], x.shape)))


def planted_block(seed, planted, rows=64, width=128, level=50.0):
    """Saliency block: uniform [0, 1) noise, the planted columns near `level`."""
    rng = np.random.default_rng(seed)
    S = rng.random((rows, width))
    S[:, planted] = level + 0.2 * level * rng.random((rows, len(planted)))
    return S


def top_candidates(S, k=10):
    return np.argsort(-S.sum(axis=0), kind="stable")[:k]


@pytest.mark.parametrize("seed", range(3))
def test_structural_search_returns_the_planted_columns(seed):
    planted = np.random.default_rng(100 + seed).choice(128, 4, replace=False)
    S = planted_block(seed, planted)
    candidates = top_candidates(S)
    chosen = structural_search(S, candidates)
    assert sorted(chosen.tolist()) == sorted(planted.tolist())
    np.testing.assert_array_equal(chosen, candidates[:4])  # a prefix, in the candidates' order


def test_structural_search_is_not_more_is_better():
    # Two tiers: 2 columns near 1000 and 4 near 100. The split error drops until A holds
    # both tiers (i = 6), then rises again as ordinary columns join A: the argmin is
    # neither the first break (i = 2) nor the largest i.
    S = planted_block(7, [3, 9], level=1000.0)
    S[:, [20, 40, 60, 80]] = 100 + 10 * np.random.default_rng(8).random((64, 4))
    candidates = top_candidates(S)
    errors = split_errors(S, candidates)
    chosen = structural_search(S, candidates)
    assert sorted(chosen.tolist()) == [3, 9, 20, 40, 60, 80]
    assert errors[5] < errors[1] and errors[5] < errors[-1]
    assert np.all(np.diff(errors[5:]) > 0)


def test_structural_search_can_take_every_candidate_and_validates():
    S = planted_block(9, [1, 2, 3])
    # Exactly the planted columns as candidates: i runs to k inclusive (not BiLLM's k - 1).
    np.testing.assert_array_equal(structural_search(S, [2, 1, 3]), [2, 1, 3])
    assert structural_search(S, []).size == 0
    with pytest.raises(ValueError, match="candidates"):
        structural_search(S, [1, 1])
    with pytest.raises(ValueError, match="candidates"):
        structural_search(S, [128])


def test_split_errors_are_the_sum_over_both_groups():
    rng = np.random.default_rng(11)
    S = rng.random((5, 12)) ** 3
    candidates = np.array([4, 0, 7])
    expected = []
    for i in range(1, 4):
        in_a = np.zeros((5, 12), bool)
        in_a[:, candidates[:i]] = True
        approx = row_loop_binarize(S, in_a, 2) + row_loop_binarize(S, ~in_a, 2)
        expected.append(np.sum((S - approx) ** 2))
    # Each residual r agrees to 64 ε · max S (module docstring), so each of the 60 terms r²
    # to 2 · |r| · 64 ε · max S, and |r| ≤ 9 max S: each order's |b| ≤ |μ| + α is at most
    # twice the largest |entry| it approximates, so |r₁| ≤ 3 max S and |r₂| ≤ 3 |r₁|.
    atol = S.size * 2 * 9 * 64 * EPS * S.max() ** 2
    np.testing.assert_allclose(split_errors(S, candidates), expected, rtol=0, atol=atol)


def test_probe_columns_finds_planted_columns_per_block():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((32, 262)) * 0.1  # blocks of 128, 128 and a narrow one of 6
    salient, tiny = [5, 17, 90, 130, 200], [3, 60, 140]
    w[:, salient] *= 20
    w[:, tiny] *= 1e-3
    inv_diag = rng.uniform(0.9, 1.1, 262)
    sets = probe_columns(w, inv_diag, topk=10, block_size=128)
    assert sets.critical.dtype == np.int64 and np.all(np.diff(sets.critical) > 0)
    assert set(sets.critical[sets.critical < 256].tolist()) == set(salient)
    assert set(tiny) <= set(sets.non_critical.tolist())
    assert not set(sets.critical.tolist()) & set(sets.non_critical.tolist())
    score = ((w / inv_diag) ** 2).sum(axis=0)
    for start in (0, 128):
        bottom = set((start + np.argsort(score[start : start + 128])[:10]).tolist())
        in_block = [c for c in sets.non_critical.tolist() if start <= c < start + 128]
        assert 1 <= len(in_block) <= 10 and set(in_block) <= bottom
    narrow = [c for c in np.concatenate([sets.critical, sets.non_critical]).tolist() if c >= 256]
    assert 1 <= len([c for c in sets.critical if c >= 256]) and len(narrow) <= 6


def test_probe_columns_narrow_block_keeps_the_sets_disjoint():
    rng = np.random.default_rng(13)
    for width in (1, 2, 7, 15):
        w = rng.standard_normal((16, width))
        sets = probe_columns(w, np.ones(width), topk=10)
        assert len(sets.critical) >= 1
        assert not set(sets.critical.tolist()) & set(sets.non_critical.tolist())
        assert set(sets.critical.tolist()) | set(sets.non_critical.tolist()) <= set(range(width))
    with pytest.raises(ValueError, match="topk"):
        probe_columns(np.ones((2, 4)), np.ones(4), topk=0)
    with pytest.raises(ValueError, match="inv_diag"):
        probe_columns(np.ones((2, 4)), np.ones(3))


def test_consensus_jaccard_hand_computed():
    sets = [{1, 2}, {2, 3}, {2}]
    # p=1: core {1,2,3}: J = 2/3, 2/3, 1/3. p=2 and p=3: core {2}: J = 1/2, 1/2, 1.
    assert consensus_jaccard(sets, 1) == pytest.approx(5 / 9, rel=4 * EPS)
    assert consensus_jaccard(sets, 2) == pytest.approx(2 / 3, rel=4 * EPS)
    assert consensus_jaccard(sets, 3) == pytest.approx(2 / 3, rel=4 * EPS)
    assert consensus_jaccard([np.array([1, 2]), [2, 3], (2,)], 1) == consensus_jaccard(sets, 1)


def test_consensus_jaccard_edge_cases():
    assert consensus_jaccard([set(), set()], 1) == 1.0  # both A_k and A_core empty
    assert consensus_jaccard([{1}, {2}], 2) == 0.0  # nothing shared by both
    assert consensus_jaccard([{1}, set()], 2) == 0.5  # empty core: 0 for {1}, 1 for the empty set
    assert consensus_jaccard([{4, 5}], 1) == 1.0
    for p in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="p must"):
            consensus_jaccard([{1}, {2}, {3}], p)
    with pytest.raises(ValueError, match="sets"):
        consensus_jaccard([], 1)


def test_compactness_overall_and_by_type():
    q0, q1, d0 = "layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", "layers.0.mlp.down_proj"
    per_set = {
        "c4": {q0: [1, 2], q1: [1], d0: np.array([5])},
        "github": {q0: [2], q1: [1], d0: np.array([6])},
    }
    result = compactness(per_set, thresholds=(1, 2))
    # overall: c4 = {q0:1, q0:2, q1:1, d0:5}, github = {q0:2, q1:1, d0:6}.
    # p=1: core = 5 pairs: 4/5, 3/5. p=2: core = {q0:2, q1:1}: 2/4, 2/3.
    assert result["overall"] == pytest.approx({1: 0.7, 2: 7 / 12}, rel=4 * EPS)
    assert result["by_type"]["q_proj"] == pytest.approx({1: 5 / 6, 2: 5 / 6}, rel=4 * EPS)
    # The same column number in another layer is another element: 5 and 6 never agree.
    assert result["by_type"]["down_proj"] == pytest.approx({1: 0.5, 2: 0.0}, abs=0)
    assert set(result["by_type"]) == {"q_proj", "down_proj"}
    assert layer_type("model.layers.3.mlp.gate_proj") == "gate_proj"
    with pytest.raises(ValueError, match="per_set_columns"):
        compactness({"c4": {q0: [1]}, "github": {q1: [1]}}, (1,))


def test_strategies_hand_computed():
    a = ColumnSets(critical=[0, 1, 2], non_critical=[7, 8, 9])
    b = ColumnSets(critical=[3, 2, 1], non_critical=[6, 7, 8])
    c = ColumnSets(critical=[1, 2, 9], non_critical=[0, 5])

    def as_lists(classes):
        return [x.tolist() for x in (classes.critical, classes.sub_critical, classes.non_critical)]

    assert as_lists(strategy1([a, b], 10)) == [[1, 2], [0, 3], [4, 5, 6, 7, 8, 9]]
    assert as_lists(strategy2([a, b], 10)) == [[1, 2], [0, 3, 4, 5], [6, 7, 8, 9]]
    # 9 is critical for c but non-critical for a: non-critical; 0 likewise (critical in a).
    assert as_lists(strategy2([a, b, c], 10)) == [[1, 2], [3, 4], [0, 5, 6, 7, 8, 9]]
    assert as_lists(single_source(a, 10)) == [[0, 1, 2], [], [3, 4, 5, 6, 7, 8, 9]]
    with pytest.raises(ValueError, match="columns must lie"):
        strategy1([a], 5)
    with pytest.raises(ValueError, match="disjoint"):
        ColumnSets(critical=[1], non_critical=[1])


def random_sets(rng, n_in, n_sources):
    sets = []
    for _ in range(n_sources):
        chosen = rng.permutation(n_in)[: rng.integers(0, n_in + 1)]
        split = rng.integers(0, len(chosen) + 1)
        sets.append(ColumnSets(critical=chosen[:split], non_critical=chosen[split:]))
    return sets


def test_strategies_partition_the_columns():
    rng = np.random.default_rng(14)
    for _ in range(200):
        n_in = int(rng.integers(1, 40))
        sets = random_sets(rng, n_in, int(rng.integers(1, 6)))
        critical_all = set.intersection(*(set(s.critical.tolist()) for s in sets))
        critical_any = set.union(*(set(s.critical.tolist()) for s in sets))
        non_any = set.union(*(set(s.non_critical.tolist()) for s in sets))
        for classes in (strategy1(sets, n_in), strategy2(sets, n_in), single_source(sets[0], n_in)):
            parts = [classes.critical, classes.sub_critical, classes.non_critical]
            np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n_in))
            assert all(np.all(np.diff(part) > 0) for part in parts)
            assert sum(classes.shares()) == pytest.approx(1.0, abs=4 * EPS)
        one, two = strategy1(sets, n_in), strategy2(sets, n_in)
        assert set(one.critical.tolist()) == critical_all == set(two.critical.tolist())
        assert set(one.sub_critical.tolist()) == critical_any - critical_all
        assert set(two.non_critical.tolist()) == non_any - critical_all


# Table 5: (critical, sub, non-critical) shares, reported average, for both strategies.
TABLE5 = [
    ((0.018, 0.117, 0.865), 2.367),
    ((0.021, 0.226, 0.753), 2.518),
    ((0.027, 0.091, 0.882), 2.465),
    ((0.015, 0.062, 0.923), 2.278),
    ((0.017, 0.044, 0.939), 2.286),
    ((0.019, 0.654, 0.327), 2.918),
    ((0.020, 0.660, 0.320), 2.944),
    ((0.020, 0.652, 0.328), 2.930),
    ((0.015, 0.709, 0.276), 2.926),
    ((0.017, 0.720, 0.263), 2.962),
]


@pytest.mark.parametrize("shares, reported", TABLE5)
def test_code_bits_is_table5_arithmetic(shares, reported):
    # 1000 columns reproduce the 3-decimal shares exactly. The table's shares are rounded
    # (each by ≤ 5e-4) and sum to 1, so the average 2 + 14 c + s it implies can be off the
    # reported one by ≤ 14·5e-4 + 5e-4 = 7.5e-3 (2.369 vs 2.367 in the first row).
    counts = np.rint(np.array(shares) * 1000).astype(int)
    bounds = np.cumsum(counts)
    classes = ColumnClasses(np.arange(bounds[0]), np.arange(bounds[0], bounds[1]), np.arange(bounds[1], 1000))
    assert classes.shares() == pytest.approx(shares, abs=EPS)
    exact = 16 * shares[0] + 3 * shares[1] + 2 * shares[2]
    assert classes.code_bits() == pytest.approx(exact, abs=16 * EPS)
    assert classes.column_bits().mean() == pytest.approx(classes.code_bits(), abs=16 * EPS)
    assert abs(classes.code_bits() - reported) <= 7.5e-3


def test_column_classes_must_partition():
    with pytest.raises(ValueError, match="partition"):
        ColumnClasses([0], [1], [3])
    with pytest.raises(ValueError, match="partition"):
        ColumnClasses([0, 1], [1], [2])
    bits = ColumnClasses([2], [0], [1, 3]).column_bits()
    assert bits.dtype == np.int32 and bits.tolist() == [3, 2, 16, 2]


@pytest.mark.parametrize("n_in", [333, 1000, 4096])
def test_sorted_classes_hits_the_target(n_in):
    rng = np.random.default_rng(n_in)
    score = rng.random(n_in) ** 4
    order = np.argsort(-score, kind="stable")
    n_critical = round(0.01 * n_in)
    lowest = (16 * n_critical + 2 * (n_in - n_critical)) / n_in
    highest = (16 * n_critical + 4 * (n_in - n_critical)) / n_in
    for target in np.linspace(lowest, highest, 20):
        bits = sorted_classes(score, n_in, target)
        assert bits.dtype == np.int32 and bits.shape == (n_in,)
        # Rounding the number of wider columns moves the total by ≤ half a bit.
        assert abs(bits.mean() - target) <= 0.5 / n_in + 1e-12
        assert np.all(bits[order[:n_critical]] == 16) and np.sum(bits == 16) == n_critical
        rest = bits[order[n_critical:]]
        assert set(rest.tolist()) <= {2, 3, 4} and np.all(np.diff(rest) <= 0)  # wider first
        assert rest.max() - rest.min() <= 1


def test_sorted_classes_errors_and_no_critical_columns():
    score = np.random.default_rng(0).random(200)
    assert np.all(sorted_classes(score, 200, 2.0, critical_share=0.0) == 2)
    assert np.all(sorted_classes(score, 200, 4.0, critical_share=0.0) == 4)
    for target in (2.0, 4.2):  # 1% float16 costs 0.14 bits: 2.0 is out of reach
        with pytest.raises(ValueError, match="target_bits"):
            sorted_classes(score, 200, target)
    with pytest.raises(ValueError, match="column_score"):
        sorted_classes(score, 201, 3.0)
    with pytest.raises(ValueError, match="critical_share"):
        sorted_classes(score, 200, 3.0, critical_share=1.0)


@pytest.mark.parametrize("shape", [(48, 300), (96, 256), (40, 130)])
def test_fast_probe_matches_the_float64_reference(shape):
    """The jitted float32 search chooses what the numpy float64 reference chooses. A
    different choice is only excusable between two splits whose float64 errors agree to
    1e-5 relative (float32 per-row sums over β = 128 entries err by ~128·6e-8); none did
    on these seeds, so the sets must be equal outright."""
    from mpq_jax.quant.tammp import probe_columns_reference

    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        w = rng.standard_normal(shape) * rng.lognormal(0, 1, shape[1])
        inv_diag = rng.uniform(0.2, 3, shape[1])
        fast, reference = probe_columns(w, inv_diag, topk=10), probe_columns_reference(w, inv_diag, topk=10)
        np.testing.assert_array_equal(fast.critical, reference.critical)
        np.testing.assert_array_equal(fast.non_critical, reference.non_critical)
