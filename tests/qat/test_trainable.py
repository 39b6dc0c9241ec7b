"""The trainable form of a QuantizedLinear: its two conversions, its forward pass against the
packed layer's, and the roles that choose what a stage trains.

Every comparison here is exact: the trainable forward applies the same float32 operations
to the same values as dequantizing the packed layer (see mpq_jax.qat.trainable)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpq_jax.capture import rope_for
from mpq_jax.models.decoder import decoder_block
from mpq_jax.packed.qlinear import QuantizedLinear
from mpq_jax.qat.trainable import (
    ROLE_DENSE,
    ROLE_SCALE,
    TrainableLinear,
    combine,
    leaf_roles,
    packed_linear,
    packed_params,
    partition,
    trainable_linear,
    trainable_mask,
    trainable_params,
)
from mpq_jax.quant.rtn_model import quantize_model_rtn
from tests.random_layers import random_layer

PLAN = [(2, 40, 16), (3, 64, 32), (16, 8, 0), (4, 24, 8), (8, 8, 8)]  # short last groups, a dense run


def _layer(seed, **extras):
    return random_layer(np.random.default_rng(seed), 12, PLAN, **extras)[0]


def _arrays(ql: QuantizedLinear) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(ql)]


@pytest.mark.parametrize("extras", [{}, {"rank": 3, "bias": True, "input_scale": True}])
@pytest.mark.parametrize("dtype,fixed_codes", [(jnp.float32, False), (jnp.bfloat16, False), (jnp.float32, True)])
def test_round_trip_without_training_is_bit_exact(extras, dtype, fixed_codes):
    ql = _layer(0, **extras)
    back = packed_linear(trainable_linear(ql, dtype, fixed_codes))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(ql)
    for a, b in zip(_arrays(back), _arrays(ql)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("extras", [{}, {"rank": 3, "bias": True, "input_scale": True}])
@pytest.mark.parametrize("fixed_codes", [False, True])
def test_forward_is_bit_identical_to_the_packed_layer(extras, fixed_codes):
    ql = _layer(1, **extras)
    tl = trainable_linear(ql, fixed_codes=fixed_codes)
    np.testing.assert_array_equal(np.asarray(jax.jit(TrainableLinear.quantized_weight)(tl)), np.asarray(ql.dequantize()))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, ql.in_features)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(TrainableLinear.apply)(tl, x)), np.asarray(jax.jit(QuantizedLinear.apply)(ql, x)))


def _perturbed(tl: TrainableLinear, rng) -> TrainableLinear:
    """Master weights, scales and zeros moved as training would move them (zeros past the code range too)."""

    def move(path, leaf):
        if leaf is None or not jnp.issubdtype(leaf.dtype, jnp.floating) or "input_scale" in jax.tree_util.keystr(path):
            return leaf
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "zero" in jax.tree_util.keystr(path):
            return leaf + 2.0 * noise
        return leaf * (1 + 0.2 * noise)

    return jax.tree_util.tree_map_with_path(move, tl)


@pytest.mark.parametrize("extras", [{}, {"rank": 3, "bias": True, "input_scale": True}])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_master_weights_from_fp_weights_keep_the_codes_and_follow_the_fp_values(extras, dtype):
    rng = np.random.default_rng(7)
    ql, w = random_layer(rng, 12, PLAN, **extras)[:2]
    fp = w + rng.normal(0, 0.02, w.shape)  # the FP weights the method started from
    tl = trainable_linear(ql, dtype, fp_weight=fp)
    back = packed_linear(tl)
    for a, b in zip(_arrays(back), _arrays(ql)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(jax.jit(TrainableLinear.quantized_weight)(tl)), np.asarray(ql.dequantize()))
    # Off their cell centres: toward the FP value, within half a grid step of the centre.
    target = np.asarray(fp, np.float32)
    if ql.lowrank_a is not None:
        target = target - np.asarray(ql.lowrank_b, np.float32) @ np.asarray(ql.lowrank_a, np.float32)
    if ql.input_scale is not None:
        target = target / np.asarray(ql.input_scale, np.float32)[None, :]
    target = target[:, np.asarray(ql.perm)]
    seg, train_seg = ql.segments[0], tl.segments[0]
    centre = np.asarray(seg.dequantize())
    master = np.asarray(train_seg.weight, np.float32)
    group_of_col = np.arange(seg.n_cols) // seg.group_size
    step = np.asarray(seg.scale, np.float32).T[:, group_of_col]
    code = np.round(centre / step) + np.asarray(seg.zero, np.float32).T[:, group_of_col]
    end_code = (code == 0) | (code == 2**seg.bits - 1)  # open-ended cells past the grid
    assert np.all((np.abs(master - centre) <= 0.5 * step + 1e-6) | end_code)
    moved = np.abs(master - centre) > 1e-6
    assert moved.mean() > 0.5
    # Toward the FP value, wherever that is further from the centre than a bfloat16 rounding.
    clear = moved & (np.abs(target[:, : seg.n_cols] - centre) > 2.0**-7 * np.abs(centre) + 1e-6)
    assert clear.mean() > 0.5
    assert (np.sign(master - centre)[clear] == np.sign(target[:, : seg.n_cols] - centre)[clear]).all()


@pytest.mark.parametrize("fixed_codes", [False, True])
def test_packed_form_of_trained_values_dequantizes_to_the_trainable_forward(fixed_codes):
    rng = np.random.default_rng(3)
    tl = _perturbed(trainable_linear(_layer(4, rank=2, bias=True, input_scale=True), fixed_codes=fixed_codes), rng)
    back = packed_linear(tl)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(jax.jit(TrainableLinear.quantized_weight)(tl)))
    again = packed_linear(trainable_linear(back, fixed_codes=fixed_codes))
    for a, b in zip(_arrays(again), _arrays(back)):
        np.testing.assert_array_equal(a, b)


def test_roles_and_partition():
    tl = trainable_linear(_layer(5, rank=2, bias=True, input_scale=True))
    params = {"norm": {"weight": jnp.ones(4)}, "proj": tl}
    roles = leaf_roles(params)
    assert roles["norm"]["weight"] == "frozen" and roles["proj"].perm == "frozen" and roles["proj"].input_scale == "frozen"
    assert [seg.weight for seg in roles["proj"].segments] == ["weight", "weight", "dense", "weight", "weight"]
    assert roles["proj"].lowrank_a == "lowrank" and roles["proj"].bias == "bias"
    mask = trainable_mask(params, {ROLE_DENSE, ROLE_SCALE})
    trainable, frozen = partition(params, mask)
    moving = jax.tree_util.tree_leaves(trainable)
    assert len(moving) == 4 + 1  # four scales and the dense columns
    assert all(leaf.dtype == jnp.float32 for leaf in moving)
    rebuilt = combine(trainable, frozen)
    for a, b in zip(jax.tree_util.tree_leaves(rebuilt), jax.tree_util.tree_leaves(params)):
        assert a is b
    assert jax.tree_util.tree_leaves(leaf_roles(trainable)) == ["scale", "scale", "dense", "scale", "scale"]
    with pytest.raises(ValueError, match="unknown roles"):
        trainable_mask(params, {"steps"})


def test_decoder_runs_the_trainable_model_through_the_same_block(load_tiny_model):
    model = load_tiny_model("llama")
    packed = quantize_model_rtn(model.params, 3, 16)
    trainable = trainable_params(packed)
    tokens = np.random.default_rng(6).integers(0, model.spec.vocab_size, (2, 16))
    h = model.params["embed_tokens"]["weight"][tokens]
    cos, sin = rope_for(model.spec, 16)
    for packed_layer, trainable_layer in zip(packed["layers"], trainable["layers"]):
        np.testing.assert_array_equal(
            np.asarray(decoder_block(trainable_layer, model.spec, h, cos, sin)),
            np.asarray(decoder_block(packed_layer, model.spec, h, cos, sin)),
        )
    back = packed_params(packed, trainable)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(packed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
