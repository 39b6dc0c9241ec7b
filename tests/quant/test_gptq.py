"""GPTQ (mpq_jax.quant.gptq) against the float64 column-by-column reference.

Tolerance. The implementation runs in float32 with lazy batch updates; the reference in
float64 without them. Both make the same discrete decisions (codes, zero-points, fp16
scales, fp16 values of 16-bit columns) unless a value lies within float32 noise of a
rounding tie; then that rounding goes the other way, and GPTQ compensates for it in every
later column of the row, so the two Ŵ rows part ways from there on (a different, equally
valid trajectory; rows never interact). Hence:
  - with no flip, Ŵ agree bit for bit (grid values and fp16 numbers are exact in float32)
    and the losses to LOSS_RTOL = 1e-4;
  - a loss further apart than that is accepted only if every row of Ŵ that differs parts,
    at its first differing column (in processing order), at a rounding the reference made
    within TIE_WINDOW of a tie (the column's code, or its group's zero-point or fp16 scale),
    or, in a 16-bit column, at the neighbouring fp16 value (float32 noise of the updated
    weight is comparable to an fp16 ulp of a small weight: 4 of 3072 such weights differ
    in "mixed_dense"), and if the losses stay within FLIP_RTOL = 1e-2: one flipped code
    moves one of out × in ≈ 1.5e4 terms of the loss by a step, ~1e-4 of it, and a few
    flips a few times that; a wrong update moves it by far more.
Measured over seeds 0..19 (out 48, in 200/320, group 64/48): losses differ in 0 to 2 of 20
problems per configuration (every "mixed_dense" problem by 1e-10 to 1e-5, from its fp16
roundings), past 1e-4 in 1 of 180 ("mixed", seed 13: 1.8e-4, a group's fp16 scale within
5e-5 ulp of a tie), and with LOSS_RTOL = 0 every differing row parts as described. TIE_WINDOW
is argued from float32: a column reaches its rounding through ~in rank-1 updates using
Hinv, which itself carries float32 error amplified by cond(H + damping) (2e3 to 4e3 here),
so |w / scale| ≲ 4 is good to ~1e-4 code units; TIE_WINDOW = 1e-3 leaves a 10x margin.
Runs (column classes of any length, groups cut from each run's start) are held to the same
comparison: the arithmetic, hence the argument, is the same.
"""

import logging

import numpy as np
import pytest

from mpq_jax.packed.planes import n_blocks
from mpq_jax.packed.qlinear import bits_per_weight, storage_bits
from mpq_jax.quant import gptq
from mpq_jax.quant.gptq import gptq_quantize, layer_loss
from mpq_jax.quant.rtn import rtn_quantize
from tests.quant.gptq_reference import processing_order, reference_gptq

LOSS_RTOL = 1e-4
TIE_WINDOW = 1e-3  # code units (see the module docstring)
FLIP_RTOL = 1e-2  # loss change that flips at ties may cause (see the module docstring)
OUT, N_TOKENS, GROUP = 48, 512, 64


def problem(seed, n_in=320, dead=()):
    """W ~ 0.05 N(0, 1) [OUT, n_in] float32; H = 2 X X^T / N with 4 outlier inputs x20."""
    rng = np.random.default_rng(seed)
    W = (0.05 * rng.standard_normal((OUT, n_in))).astype(np.float32)
    X = rng.standard_normal((n_in, N_TOKENS))
    X[rng.choice(n_in, 4, replace=False)] *= 20
    X[list(dead)] = 0
    return W, 2 * X @ X.T / N_TOKENS


def assert_matches_reference(W, H, bits, every_row=False, **kw):
    """every_row: inspect the rows that differ even when the losses agree to LOSS_RTOL (a
    wrong grid on one short group can move the loss by less than that)."""
    result = gptq_quantize(W, H, bits, GROUP, **kw)
    ref_w_hat, ref_loss, ref_damping, _, margin = reference_gptq(W, H, bits, GROUP, **kw)
    assert result.damping == ref_damping
    rel = abs(result.loss - ref_loss) / ref_loss
    if rel > LOSS_RTOL or every_row:
        # Rows are independent in GPTQ, and equal decisions give bit-equal Ŵ (grid values and
        # fp16 numbers are exact in float32), so each row that differs must part at a rounding
        # that float32 may take the other way.
        order = processing_order(H, kw.get("perm"), kw.get("act_order", False))
        w_hat, ref = np.asarray(result.qlinear.dequantize(), np.float64)[:, order], ref_w_hat[:, order]
        for row in np.flatnonzero((w_hat != ref).any(axis=1)):
            j = np.flatnonzero(w_hat[row] != ref[row])[0]
            if np.isinf(margin[row, j]):  # a 16-bit column: the fp16 neighbour of its float32 value
                one_ulp = np.spacing(np.float16(abs(ref[row, j])))
                assert abs(w_hat[row, j] - ref[row, j]) <= one_ulp, f"row {row}: 16-bit column {j} off by more than one fp16 ulp"
            else:
                assert margin[row, j] < TIE_WINDOW, f"loss differs by {rel:.2e}; row {row} parts at column {j} without a tie"
        assert rel < FLIP_RTOL, f"loss differs by {rel:.2e}, more than flips at ties explain"
    return result


CONFIGS = {
    "4bit": dict(bits=[4] * 5),
    "2bit": dict(bits=[2] * 5),
    "3bit_width200": dict(bits=[3] * 4, n_in=200),  # 200 = 1.56 blocks of 128, last group 8
    "symmetric": dict(bits=[3] * 5, symmetric=True),
    "mixed": dict(bits=[4, 4, 3, 3, 2]),
    "mixed_dense": dict(bits=[3, 16, 2, 4], n_in=200),
    "act_order": dict(bits=[3] * 5, act_order=True),
    "static_groups": dict(bits=[3] * 5, static_groups=True),
    "static_act_order": dict(bits=[3, 3, 4, 4, 2], static_groups=True, act_order=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_reference(name):
    cfg = dict(CONFIGS[name])
    W, H = problem(20 + list(CONFIGS).index(name), cfg.pop("n_in", 320))  # a fresh problem each
    assert_matches_reference(W, H, cfg.pop("bits"), **cfg)


def test_explicit_perm_matches_reference_and_is_stored():
    W, H = problem(2)
    perm = np.random.default_rng(2).permutation(W.shape[1])
    result = assert_matches_reference(W, H, [3, 4, 3, 2, 3], perm=perm, act_order=True)  # perm wins
    np.testing.assert_array_equal(np.asarray(result.qlinear.perm), perm)


def test_act_order_is_descending_diag():
    W, H = problem(3)
    result = gptq_quantize(W, H, [4] * 5, GROUP, act_order=True)
    np.testing.assert_array_equal(np.asarray(result.qlinear.perm), np.argsort(-np.diag(H), kind="stable"))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_beats_rtn(bits):
    W, H = problem(4)
    rtn_loss = layer_loss(W, rtn_quantize(W, bits, GROUP).dequantize(), H)
    assert gptq_quantize(W, H, [bits] * 5, GROUP).loss <= rtn_loss


@pytest.mark.parametrize("low, high", [([4, 4, 3, 3, 2], [4, 4, 4, 3, 2]), ([4, 4, 3, 3, 2], [4, 4, 3, 3, 3])])
def test_raising_one_group_does_not_raise_loss(low, high):
    # Empirical, not a theorem (greedy GPTQ on non-nested grids); holds with a wide margin.
    W, H = problem(5)
    assert gptq_quantize(W, H, high, GROUP).loss <= gptq_quantize(W, H, low, GROUP).loss


def test_dense_group_has_only_fp16_error():
    W, H = problem(6, n_in=200)
    bits = [3, 16, 2, 4]
    ref_w_hat, _, _, err, _ = reference_gptq(W, H, bits, GROUP)  # identity order
    dense = slice(GROUP, 2 * GROUP)
    # The 16-bit columns' only error is fp16 rounding: at most half an ulp, 2**-11 relative.
    assert np.all(np.abs(err[:, dense]) <= 2.0**-11 * np.abs(ref_w_hat[:, dense]) + 2.0**-25)
    result = gptq_quantize(W, H, bits, GROUP)
    assert [seg.bits for seg in result.qlinear.segments] == bits
    # All columns dense: fp16 rounding is the only error, and GPTQ compensates even that.
    fp16_loss = layer_loss(W, W.astype(np.float16), H)
    assert 0 < gptq_quantize(W, H, [16] * 4, GROUP).loss <= fp16_loss


def test_dead_input():
    W, H = problem(7, dead=(5, 100))
    assert H[5, 5] == 0 and not H[:, 100].any()
    result = assert_matches_reference(W, H, [3] * 5)
    w_hat = np.asarray(result.qlinear.dequantize())
    assert np.all(w_hat[:, [5, 100]] == 0) and np.all(np.isfinite(w_hat))


def test_cholesky_retry(caplog):
    rng = np.random.default_rng(8)
    W = (0.05 * rng.standard_normal((OUT, 320))).astype(np.float32)
    X = rng.standard_normal((320, 16))  # rank 16 of 320
    H = 2 * X @ X.T / 16
    with caplog.at_level(logging.WARNING, logger="mpq_jax.quant.gptq"):
        result = gptq_quantize(W, H, [4] * 5, GROUP, percdamp=1e-7)
    assert result.damping > 1e-7 and "retrying" in caplog.text
    assert np.isfinite(result.loss) and np.all(np.isfinite(np.asarray(result.qlinear.dequantize())))


@pytest.mark.parametrize("kw", [dict(act_order=True), dict(static_groups=True, symmetric=True)])
def test_dequantize_is_the_loop_w_hat_bit_for_bit(kw):
    W, H = problem(9, n_in=200)
    bits = [3, 16, 2, 4]
    perm, Q, *_ = gptq._quantize_columns(W, H, bits, GROUP, None, kw.get("act_order", False),
                                         kw.get("static_groups", False), kw.get("symmetric", False), 0.01, 128)
    result = gptq_quantize(W, H, bits, GROUP, **kw)
    w_hat = np.empty_like(Q)
    w_hat[:, perm] = Q
    np.testing.assert_array_equal(np.asarray(result.qlinear.dequantize()), w_hat)
    assert result.loss == layer_loss(W, w_hat, H)


def test_bits_per_weight_matches_segments():
    W, H = problem(10, n_in=200)
    bits = [4, 4, 16, 2]  # segments: 4-bit [0, 128), dense [128, 192), 2-bit [192, 200)
    ql = gptq_quantize(W, H, bits, GROUP).qlinear
    assert [(s.start, s.stop, s.bits) for s in ql.segments] == [(0, 128, 4), (128, 192, 16), (192, 200, 2)]
    expected = (
        32 * 4 * n_blocks(128) * OUT + (16 + 8) * OUT * 2  # 4-bit codes, fp16 scales, uint8 zeros
        + 16 * OUT * 64
        + 32 * 2 * n_blocks(8) * OUT + (16 + 8) * OUT
    )
    assert bits_per_weight(ql) == expected / (OUT * 200)
    # Uniform bits store exactly what RTN stores.
    ql = gptq_quantize(W, H, [3] * 4, GROUP).qlinear
    assert bits_per_weight(ql) == bits_per_weight(rtn_quantize(W, 3, GROUP))


def test_bias_passes_through():
    W, H = problem(11, n_in=200)
    bias = np.linspace(-1, 1, OUT).astype(np.float32)
    ql = gptq_quantize(W, H, [4] * 4, GROUP, bias=bias).qlinear
    np.testing.assert_array_equal(np.asarray(ql.bias), bias.astype(np.float16))


@pytest.mark.parametrize(
    "args, kw, field",
    [
        ((np.zeros((4, 200)), np.eye(100), [4] * 4), {}, "hessian"),
        ((np.zeros((4, 200)), np.eye(200), [4] * 3), {}, "group_bits"),
        ((np.zeros((4, 200)), np.eye(200), [4, 1, 4, 4]), {}, "group_bits"),
        ((np.zeros((4, 200)), np.eye(200), [4, 9, 4, 4]), {}, "group_bits"),
        ((np.zeros((4, 200)), np.eye(200), [4] * 4), dict(perm=np.zeros(200, int)), "perm"),
        ((np.zeros(200), np.eye(200), [4] * 4), {}, "w"),
    ],
)
def test_invalid_inputs_name_the_argument(args, kw, field):
    with pytest.raises(ValueError, match=field):
        gptq_quantize(*args, GROUP, **kw)


# (n_in, runs, extra arguments): runs of permuted columns cut into groups of GROUP from each
# run's start, so groups start off the multiples of GROUP and runs end mid-group. In
# "dense_last" and "symmetric_dead" a quantized group starts within GROUP columns of the
# block-padded width: without the extra padding its grid window would be clamped back
# (measured: then 6 of these 12 tests fail; masking to n_in or starting groups at multiples
# of GROUP fails all 12).
RUNS = {
    "dense_first": (200, [(5, 16), (70, 3), (125, 2)], {}),  # groups 64 + 6, 64 + 61
    "dense_last": (250, [(90, 4), (155, 2), (5, 16)], {}),  # last 2-bit group 27 columns, at 218 of 256
    "short_runs": (200, [(10, 3), (3, 16), (40, 2), (64, 4), (83, 3)], {}),  # runs shorter than a group
    "symmetric_dead": (256, [(100, 3), (6, 16), (150, 2)], dict(symmetric=True, dead=(3, 150))),  # a group at 234
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", RUNS)
def test_runs_match_reference(name, seed):
    n_in, runs, kw = RUNS[name]
    kw = dict(kw)
    W, H = problem(60 + 10 * seed + list(RUNS).index(name), n_in, dead=kw.pop("dead", ()))
    perm = np.random.default_rng(seed).permutation(n_in)
    result = assert_matches_reference(W, H, None, every_row=True, perm=perm, runs=runs, **kw)
    assert [(seg.n_cols, seg.bits) for seg in result.qlinear.segments] == runs  # one segment per run


@pytest.mark.parametrize(
    "n_in, bits, runs",
    [
        (320, [3, 3, 4, 16, 2], [(128, 3), (64, 4), (64, 16), (64, 2)]),
        (200, [16, 3, 2, 4], [(64, 16), (64, 3), (64, 2), (8, 4)]),  # last group 8 columns
    ],
)
def test_runs_of_whole_groups_are_the_group_bits_path_bit_for_bit(n_in, bits, runs):
    # Another program (group bounds from the host, fewer slots), the same arithmetic.
    W, H = problem(12, n_in)
    perm = np.random.default_rng(12).permutation(n_in)
    args = (GROUP, perm, False, False, False, 0.01, 128)
    by_groups = gptq._quantize_columns(W, H, bits, *args)
    by_runs = gptq._quantize_columns(W, H, None, *args, runs=runs)
    for a, b in zip(by_groups, by_runs):  # perm, Q, codes, scale, zero, damping
        np.testing.assert_array_equal(a, b)
    ql_groups = gptq_quantize(W, H, bits, GROUP, perm=perm).qlinear
    ql_runs = gptq_quantize(W, H, None, GROUP, perm=perm, runs=runs).qlinear
    layout = [(s.start, s.stop, s.bits, s.group_size) for s in ql_groups.segments]
    assert layout == [(s.start, s.stop, s.bits, s.group_size) for s in ql_runs.segments]
    for s, t in zip(ql_groups.segments, ql_runs.segments):
        for a, b in ((s.codes, t.codes), (s.scale, t.scale), (s.zero, t.zero), (s.dense, t.dense)):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_runs_effective_weight_is_the_loop_w_hat_bit_for_bit():
    W, H = problem(13, n_in=200)
    perm = np.random.default_rng(13).permutation(200)
    runs = [(7, 16), (130, 3), (63, 2)]
    _, Q, *_ = gptq._quantize_columns(W, H, None, GROUP, perm, False, False, False, 0.01, 128, runs=runs)
    result = gptq_quantize(W, H, None, GROUP, perm=perm, runs=runs)
    w_hat = np.empty_like(Q)
    w_hat[:, perm] = Q
    np.testing.assert_array_equal(np.asarray(result.qlinear.effective_weight()), w_hat)
    assert result.loss == layer_loss(W, w_hat, H)


def test_runs_storage_is_the_sum_over_segments():
    W, H = problem(14, n_in=200)
    runs = [(11, 16), (70, 3), (119, 2)]  # 3-bit groups of 64 + 6 columns, 2-bit 64 + 55
    ql = gptq_quantize(W, H, None, GROUP, perm=np.arange(200), runs=runs).qlinear
    assert [(s.start, s.stop, s.bits) for s in ql.segments] == [(0, 11, 16), (11, 81, 3), (81, 200, 2)]
    expected = (
        16 * OUT * 11
        + 32 * 3 * n_blocks(70) * OUT + (16 + 8) * OUT * 2  # codes, fp16 scales, uint8 zeros
        + 32 * 2 * n_blocks(119) * OUT + (16 + 8) * OUT * 2
    )
    assert storage_bits(ql) == expected


@pytest.mark.parametrize(
    "bits, kw, field",
    [
        ([4] * 4, dict(runs=[(200, 4)]), "group_bits"),
        (None, dict(runs=[(200, 4)], perm=None), "perm"),
        (None, dict(runs=[(200, 4)], static_groups=True), "static_groups"),
        (None, dict(runs=[(0, 4), (200, 4)]), "runs"),
        (None, dict(runs=[(100, 4), (100, 9)]), "runs"),
        (None, dict(runs=[(100, 1), (100, 4)]), "runs"),
        (None, dict(runs=[(100, 4), (99, 4)]), "runs"),
        (None, dict(runs=[(100.0, 4), (100, 4)]), "runs"),
        (None, dict(runs=[(200, 4, 1)]), "runs"),
        (None, dict(runs=[]), "runs"),
    ],
)
def test_invalid_runs_name_the_argument(bits, kw, field):
    kw = dict(perm=np.arange(200)) | kw
    with pytest.raises(ValueError, match=field) as excinfo:
        gptq_quantize(np.zeros((4, 200)), np.eye(200), bits, GROUP, **kw)
    assert "runs" in str(excinfo.value)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_static_act_order_matches_llm_compressor_layer_loss(bits):
    """Where the compare extra is installed: on the same W and H, our act-order GPTQ with
    static groups and llm-compressor's (actorder="static") reach the same layer loss; the
    only difference is that ours rounds scales to their fp16 storage value first."""
    pytest.importorskip("llmcompressor", reason='needs the compare extra: pip install -e ".[compare]"')
    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers.base import Observer

    W, H = problem(40 + bits, n_in=256)
    ours = gptq_quantize(W, H, [bits] * 4, 64, act_order=True, static_groups=True).loss
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=64, actorder="static")
    observer = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
    observer(torch.tensor(W))
    qparams = observer.get_qparams()
    peer_w, _, _ = quantize_weight(
        weights=torch.tensor(W)[None], hessians=torch.tensor(H, dtype=torch.float32)[None],
        scale=qparams["scale"][None], zero_point=qparams["zero_point"][None], global_scale=None,
        quant_args=args, blocksize=128, percdamp=0.01,
    )
    assert ours == pytest.approx(layer_loss(W, peer_w[0].numpy(), H), rel=0.01)
