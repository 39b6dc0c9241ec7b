"""AMLQ per layer: presets, the α search against an explicit reference, importance order,
exact bit accounting of every candidate, and δ of the built layer on explicit activations."""

from __future__ import annotations

import numpy as np
import pytest

from mpq_jax.stats import InputStats
from mpq_jax.packed.qlinear import storage_bits
from mpq_jax.quant.amlq import (
    Preset,
    build_layer,
    choose_scaling,
    column_importance,
    group_ranks,
    input_scale_for,
    measure_layer,
    presets_from_config,
    search_alpha,
)
from mpq_jax.quant.gptq import inverse_factor
from mpq_jax.quant.rtn import rtn_quantize

PRESETS = (
    Preset(32, ((2, 1.0),)),
    Preset(32, ((3, 0.5), (2, 0.5))),
    Preset(64, ((4, 1.0),)),
    Preset(32, ((16, 0.25), (3, 0.75))),
)


def layer_problem(seed, n_out=48, n_in=128, tokens=600):
    """Weights, explicit activations X [in, tokens] with a few outlier channels, and stats."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * 0.05
    magnitude = rng.uniform(0.3, 1.5, n_in)
    magnitude[rng.choice(n_in, 4, replace=False)] *= 12  # salient input channels
    x = rng.standard_normal((n_in, tokens)) * magnitude[:, None] + 0.3 * rng.standard_normal((n_in, 1))
    stats = InputStats(hessian=2 * x @ x.T / tokens, mean=x.mean(axis=1), mean_abs=np.abs(x).mean(axis=1))
    return w, x, stats


def explicit_delta(w, layer, x, bias=None):
    """‖WX − (layer(X) − bias)‖² / ‖WX‖² on the explicit activations, with the layer's stored
    arrays (the original bias cancels, as in the paper's δ)."""
    y = np.asarray(layer.apply(x.T.astype(np.float32)), np.float64).T
    if bias is not None:
        y = y - bias.astype(np.float64)[:, None]
    wx = w.astype(np.float64) @ x
    return np.sum((wx - y) ** 2) / np.sum(wx**2)


def test_preset_group_counts_and_validation():
    assert Preset(64, ((3, 0.5), (2, 0.5))).group_bits(9).tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2] or (
        Preset(64, ((3, 0.5), (2, 0.5))).group_bits(9).tolist() == [3, 3, 3, 3, 2, 2, 2, 2, 2]
    )
    bits = Preset(32, ((16, 0.0625), (4, 0.9375))).group_bits(18)
    assert bits[0] == 16 and (bits == 16).sum() == 1 and len(bits) == 18  # widest first
    assert Preset(128, ((2, 1.0),)).mean_bits() == 2
    with pytest.raises(ValueError, match="group_size"):
        Preset(48, ((2, 1.0),))
    with pytest.raises(ValueError, match="widths"):
        Preset(64, ((7, 1.0),))
    with pytest.raises(ValueError, match="sum to 1"):
        Preset(64, ((3, 0.5), (2, 0.4)))
    with pytest.raises(ValueError, match=r"\[0\]"):

        class Entry:
            group_size, bits = 64, {3: 0.7}

        presets_from_config([Entry()])


def test_alpha_search_matches_explicit_rtn_reference():
    w, x, stats = layer_problem(0)
    grid = (0.0, 0.25, 0.5, 0.75)
    m = stats.hessian / 2

    def rtn_error(alpha):
        c = input_scale_for(stats.mean_abs, alpha)
        c = np.ones(w.shape[1]) if c is None else c
        w_hat = np.asarray(rtn_quantize(w / c[None, :], 3, 128).dequantize(), np.float64) * c[None, :]
        d = w.astype(np.float64) - w_hat
        return np.sum((d @ m) * d)

    errors = [rtn_error(a) for a in grid]
    assert search_alpha(w, stats, grid) == grid[int(np.argmin(errors))]
    # With outlier channels, scaling helps: the best α is not 0.
    assert np.argmin(errors) > 0


def test_importance_ranks_the_salient_group_first():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 64))
    a = rng.standard_normal((64, 200))
    h = a @ a.T / 200
    w[:, 37] *= 20
    factor = inverse_factor(h, rng.permutation(64), 0.01)
    importance = column_importance(w, h, factor)
    # Float64 reference from the explicit damped inverse.
    inv_diag = np.diag(np.linalg.inv(h + 0.01 * np.mean(np.diag(h)) * np.eye(64)))
    np.testing.assert_allclose(importance, np.sum(w**2, axis=0) / inv_diag**2, rtol=1e-4)
    assert group_ranks(importance, 32).tolist() == [1, 0]  # the group holding column 37 first
    ranks = group_ranks(importance, 24)  # 3 groups, the last one short
    assert ranks[1] == 0 and sorted(ranks.tolist()) == [0, 1, 2]
    # An input that never fires counts as unimportant.
    h[40, :] = h[:, 40] = 0
    assert column_importance(w, h, inverse_factor(h, np.arange(64)))[40] == -1


def test_scaling_is_kept_only_where_gptq_gains_from_it():
    w, _, stats = layer_problem(5)
    m = stats.hessian / 2
    chosen = choose_scaling(w, stats, (0.0, 0.5, 0.9))
    assert chosen.alpha in (0.0, search_alpha(w, stats, (0.0, 0.5, 0.9)))

    def probe_error(problem):
        from mpq_jax.quant.amlq import quantize_preset

        d = w.astype(np.float64) - np.asarray(quantize_preset(problem, Preset(128, ((3, 1.0),))).dequantize(), np.float64)
        return np.sum((d @ m) * d)

    unscaled = choose_scaling(w, stats, (0.0,))
    assert unscaled.alpha == 0 and unscaled.inv_scale is None
    assert probe_error(chosen) <= probe_error(unscaled)


@pytest.mark.parametrize("with_bias", [False, True])
def test_every_candidate_counts_exactly_the_bits_its_layer_stores(with_bias):
    w, x, stats = layer_problem(2)
    bias = np.random.default_rng(3).standard_normal(w.shape[0]).astype(np.float32) if with_bias else None
    keep = {}
    plan = measure_layer("l", w, stats, PRESETS, alpha_grid=(0.0, 0.5), lowrank_bpw=(0.5, 1.0), bias=bias, keep=keep)
    labels = {c.label for c in plan.candidates}
    assert {(i, None) for i in range(len(PRESETS))} <= labels  # AMQ options
    assert any(rank and rank > 0 for _, rank in labels)  # AMLQ options with factors
    for cand in plan.candidates:
        kept = keep[("l", cand.label[0])]
        layer = build_layer(w, stats, plan, cand, PRESETS, bias=bias, kept=kept)
        assert storage_bits(layer) == cand.bits, cand.label
        # The rebuilt layer (no kept GPTQ result) is the same layer.
        again = build_layer(w, stats, plan, cand, PRESETS, bias=bias)
        np.testing.assert_array_equal(np.asarray(again.effective_weight()), np.asarray(layer.effective_weight()))
        # δ as measured from moments = δ of the stored layer on the explicit activations
        # (up to fp16 rounding of the low-rank factors and bias).
        assert explicit_delta(w, layer, x, bias) == pytest.approx(cand.loss, rel=2e-2, abs=1e-6), cand.label


def test_lowrank_candidates_are_never_worse_than_amq_and_improve_with_rank():
    w, _, stats = layer_problem(4)
    plan = measure_layer("l", w, stats, PRESETS[:1], alpha_grid=(0.0,), lowrank_bpw=(0.25, 0.5, 1.0, 2.0))
    amq = [c for c in plan.candidates if c.label[1] is None][0]
    amlq = sorted((c for c in plan.candidates if c.label[1] is not None), key=lambda c: c.label[1])
    assert amlq[0].loss <= amq.loss  # the folded mean alone never hurts
    assert all(a.loss >= b.loss and a.bits < b.bits for a, b in zip(amlq, amlq[1:]))


@pytest.mark.parametrize("n_in", [128, 96, 100])
def test_reachable_bits_from_shapes_bound_every_measured_candidate(n_in):
    """What the pre-flight budget check computes from a layer's shape: a preset's packed bits
    exactly when n_in is a multiple of 32 (a lower bound otherwise: padded code words), and a
    range holding every measured candidate."""
    from mpq_jax.quant.amlq import DEFAULT_PRESETS, preset_storage_bits, quantize_preset, reachable_bits, scaled_problem

    w, _, stats = layer_problem(5, n_in=n_in)
    problem = scaled_problem(w, stats, 0.0)
    for preset in DEFAULT_PRESETS + PRESETS:
        stored = storage_bits(quantize_preset(problem, preset))
        predicted = preset_storage_bits(*w.shape, preset)
        assert predicted == stored if n_in % 32 == 0 else predicted <= stored <= preset_storage_bits(*w.shape, preset, dearest=True), preset.name
    plan = measure_layer("l", w, stats, PRESETS, alpha_grid=(0.0, 0.5), lowrank_bpw=(0.5, 1.0))
    low, high = reachable_bits(*w.shape, False, PRESETS, (0.5, 1.0))
    assert low <= min(c.bits for c in plan.candidates) and max(c.bits for c in plan.candidates) <= high
    if n_in % 32 == 0:  # the cheapest AMQ candidate is the cheapest preset, plus its input scale when α > 0
        assert min(c.bits for c in plan.candidates if c.label[1] is None) == low + (16 * n_in if plan.alpha > 0 else 0)
