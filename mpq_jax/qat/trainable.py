"""The trainable form of a `QuantizedLinear`, and its two conversions.

    trainable_linear(packed)   QuantizedLinear -> TrainableLinear
    packed_linear(trainable)   TrainableLinear -> QuantizedLinear

A `TrainableLinear` keeps the packed layer's structure (segments, permutation, input scale)
and replaces what training changes by float arrays in the natural [out, cols] layout:

    segment of 2-8 bits   master weights `weight`, per-group `scale` and `zero` (floats),
                          fake-quantized through the STE of `mpq_jax.qat.ste`
    16-bit segment        its columns as a plain parameter `weight` (TAMMP's critical
                          columns, AMLQ's dense groups)
    low-rank factors, bias  plain parameters
    (the last three pass through float16 rounding with a straight-through gradient, so
    training computes with the values the packed layer will store)
    perm, input_scale     kept as they are, never trained

The master weights keep the packed layer's codes: they are the FP weights moved into the
rounding cell of the code the method chose (`trainable_linear` with the FP weights), or the
cell centres (q - z)·s without them. Re-rounding the FP weights instead would replace GPTQ's
(or AMLQ's, or TAMMP's) error-compensated codes by round-to-nearest ones and throw away what
the method found. Either way a converted model computes bit-for-bit what the packed one
computes, and converting back without training returns the identical packed layer.

The decoder runs a TrainableLinear through the same block code as every other linear
(`mpq_jax.models.decoder.linear` calls `apply`).

Roles: every leaf of a params tree has one (`leaf_roles`); a stage's trainable set is a set
of roles, so "only the trainable set moves" is a mask over roles (`trainable_mask`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.packed.planes import leading_rows, unpack_blocks
from mpq_jax.packed.qlinear import DENSE_BITS, QuantizedLinear, Segment, make_dense_segment, make_segment
from mpq_jax.qat.ste import dequantize_fixed_codes, fake_quantize, stored_float16
from mpq_jax.quant.grid import FP16_MAX, FP16_TINY, max_code

# What a leaf is, for choosing what a stage trains.
ROLE_WEIGHT = "weight"  # master weights of a 2-8-bit segment
ROLE_DENSE = "dense"  # columns kept in 16 bits (critical columns)
ROLE_SCALE = "scale"  # per-group step sizes
ROLE_ZERO = "zero"  # per-group zero points
ROLE_LOWRANK = "lowrank"  # low-rank factors A, B
ROLE_BIAS = "bias"
ROLE_FROZEN = "frozen"  # everything else: embeddings, norms, dense linears, perm, input scale
# bfloat16 rounds (q - z)·s by at most 2**-8 relative, so w / s lands within 0.5 of the code
# while |q - z| < 128: up to 7 bits. Wider segments keep float32 master weights.
BFLOAT16_EXACT_BITS = 7
TRAINABLE_ROLES = (ROLE_WEIGHT, ROLE_DENSE, ROLE_SCALE, ROLE_ZERO, ROLE_LOWRANK, ROLE_BIAS)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainSegment:
    """Columns [start, stop) of the permuted order at `bits` (16 = kept dense).

    weight: [out, stop - start] master (or dense) weights, or None when the codes are fixed;
    codes:  uint8 [out, stop - start] fixed codes (a stage that trains no weights, as
            EfficientQAT's E2E-QP: then the step sizes get ∂ŵ/∂s = q - z, where master
            weights sitting on their grid points would give them round(w/s) - w/s = 0);
    scale, zero: float32 [out, n_groups] (None for 16 bits), groups of `group_size`
            columns from `start`."""

    start: int
    stop: int
    bits: int
    group_size: int
    weight: jax.Array | None = None
    codes: jax.Array | None = None
    scale: jax.Array | None = None
    zero: jax.Array | None = None

    @property
    def n_cols(self) -> int:
        return self.stop - self.start

    def values(self) -> jax.Array:
        """float32 [out, cols]: the weights this segment applies."""
        if self.bits == DENSE_BITS:
            return stored_float16(self.weight)
        group_of_col = np.arange(self.n_cols) // self.group_size
        scale, zero = self.scale[:, group_of_col], self.zero[:, group_of_col]
        if self.codes is not None:
            return dequantize_fixed_codes(self.codes, scale, zero, self.bits)
        return fake_quantize(self.weight, scale, zero, self.bits)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainableLinear:
    """y = Ŵ x + B A x + bias with Ŵ fake-quantized from master weights (see the module
    docstring); the same formula and column conventions as `QuantizedLinear`."""

    in_features: int
    out_features: int
    perm: jax.Array
    segments: tuple[TrainSegment, ...]
    lowrank_b: jax.Array | None = None
    lowrank_a: jax.Array | None = None
    bias: jax.Array | None = None
    input_scale: jax.Array | None = None

    def quantized_weight(self) -> jax.Array:
        """float32 [out, in] in original column order, times the input scale if any
        (as `QuantizedLinear.dequantize`)."""
        w_perm = jnp.concatenate([seg.values() for seg in self.segments], axis=1)
        w = w_perm[:, jnp.argsort(self.perm)]
        if self.input_scale is not None:
            w = w * self.input_scale.astype(jnp.float32)[None, :]
        return w

    def apply(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> y [..., out] in x's dtype. In float32 the same operations as
        `QuantizedLinear.apply`; in bfloat16 the matmuls take bfloat16 inputs and accumulate
        in float32."""
        w = self.quantized_weight()
        lowrank = None if self.lowrank_a is None else (stored_float16(self.lowrank_a), stored_float16(self.lowrank_b))
        if x.dtype == jnp.float32:
            y = x @ w.T
            if lowrank is not None:
                y = y + (x @ lowrank[0].T) @ lowrank[1].T
        else:
            y = jnp.matmul(x, w.astype(x.dtype).T, preferred_element_type=jnp.float32)
            if lowrank is not None:
                y = y + jnp.matmul(x, lowrank[0].astype(x.dtype).T, preferred_element_type=jnp.float32) @ lowrank[1].T
        if self.bias is not None:
            y = y + stored_float16(self.bias)
        return y.astype(x.dtype)


jax.tree_util.register_dataclass(
    TrainSegment, data_fields=["weight", "codes", "scale", "zero"], meta_fields=["start", "stop", "bits", "group_size"]
)
jax.tree_util.register_dataclass(
    TrainableLinear,
    data_fields=["perm", "segments", "lowrank_b", "lowrank_a", "bias", "input_scale"],
    meta_fields=["in_features", "out_features"],
)


# Master weights taken from the FP weights stay this far (in grid steps) inside the packed
# code's rounding cell, so that they round to that code in float32 without a tie.
CELL_MARGIN = 0.01


def trainable_linear(packed: QuantizedLinear, dtype=jnp.float32, fixed_codes: bool = False, fp_weight=None) -> TrainableLinear:
    """The trainable form of `packed`, computing the same weights (module docstring).

    fp_weight: the layer's FP weights [out, in] (original column order), or None. Each master
    weight starts at the FP value moved into the rounding cell of the code the method chose,
    (q - z ± (1/2 - CELL_MARGIN))·s, open-ended past the grid's first and last codes; so the
    codes (and the forward pass) are exactly the packed layer's, while a weight whose FP value
    lies near or past its cell's edge (GPTQ's error compensation moved it there) sits where a
    small step can move it back. Started at the cell centres instead (fp_weight None), master
    weights need half a grid step of travel before any code changes (at 2 bits that is more
    than Adam moves them in hundreds of steps at the usual rates) and the STE's scale gradient
    round(w/s) - w/s is exactly zero. The FP target of the quantized part is
    (W - B A) / input_scale, in the permuted column order.

    `dtype` is that of the master weights (bfloat16 halves the largest training array of a
    7B model; a master weight whose bfloat16 value would round to another code starts at its
    cell centre instead, which bfloat16 holds exactly up to BFLOAT16_EXACT_BITS); dense columns,
    low-rank factors, bias, scales and zeros stay float32: they are a few percent of the weights,
    and float16 values do not survive a trip through bfloat16. With `fixed_codes` the 2-8-bit
    segments keep their integer codes instead of master weights (for a stage that trains no
    weights)."""
    target = None
    if fp_weight is not None and not fixed_codes:
        target = np.asarray(fp_weight, np.float32)
        if packed.lowrank_a is not None:
            target = target - np.asarray(packed.lowrank_b, np.float32) @ np.asarray(packed.lowrank_a, np.float32)
        if packed.input_scale is not None:
            target = target / np.asarray(packed.input_scale, np.float32)[None, :]
        target = target[:, np.asarray(packed.perm)]

    def segment(seg: Segment) -> TrainSegment:
        if seg.bits == DENSE_BITS:
            weight = np.asarray(seg.dense, np.float32).T
            return TrainSegment(seg.start, seg.stop, seg.bits, seg.group_size, jnp.asarray(weight))
        scale = np.asarray(seg.scale, np.float32).T
        zero = np.asarray(seg.zero, np.float32).T
        codes = np.asarray(leading_rows(unpack_blocks(seg.codes, seg.bits), seg.n_cols)).T
        if fixed_codes:
            return TrainSegment(seg.start, seg.stop, seg.bits, seg.group_size, codes=jnp.asarray(codes, jnp.uint8), scale=jnp.asarray(scale), zero=jnp.asarray(zero))
        master_dtype = dtype if seg.bits <= BFLOAT16_EXACT_BITS else jnp.float32
        grid_scale, grid_zero = _grid(seg, _stored_scale(scale), zero)
        centre = (codes.astype(np.float32) - grid_zero) * grid_scale  # seg.dequantize(), from the codes in hand
        weight = centre if target is None else _inside_cells(target[:, seg.start : seg.stop], codes, scale, zero, seg)
        weight = _keeping_codes(weight, centre, codes, scale, zero, seg, master_dtype)
        return TrainSegment(seg.start, seg.stop, seg.bits, seg.group_size, weight=weight, scale=jnp.asarray(scale), zero=jnp.asarray(zero))

    def param(a):
        return None if a is None else jnp.asarray(np.asarray(a, np.float32))

    return TrainableLinear(
        in_features=packed.in_features,
        out_features=packed.out_features,
        perm=packed.perm,
        segments=tuple(segment(seg) for seg in packed.segments),
        lowrank_b=param(packed.lowrank_b),
        lowrank_a=param(packed.lowrank_a),
        bias=param(packed.bias),
        input_scale=packed.input_scale,
    )


def _stored_scale(scale) -> np.ndarray:
    """numpy's grid.round_scale_to_fp16: the float32 value of the scale as stored."""
    return np.clip(np.asarray(scale, np.float32), FP16_TINY, FP16_MAX).astype(np.float16).astype(np.float32)


def _grid(seg: Segment, scale, zero):
    group_of_col = np.arange(seg.n_cols) // seg.group_size
    return scale[:, group_of_col], zero[:, group_of_col]


def _inside_cells(target, codes, scale, zero, seg: Segment) -> np.ndarray:
    """target [out, cols] clipped into each code's rounding cell (open past the end codes)."""
    s, z = _grid(seg, scale, zero)
    k = codes - z
    half = 0.5 - CELL_MARGIN
    low = np.where(codes == 0, -np.inf, (k - half) * s)
    high = np.where(codes == max_code(seg.bits), np.inf, (k + half) * s)
    return np.clip(target, low, high).astype(np.float32)


def _keeping_codes(weight, centre, codes, scale, zero, seg: Segment, dtype) -> jax.Array:
    """`weight` in `dtype`, each entry that would not round to its code replaced by its
    cell centre (checked with the forward pass's own float32 arithmetic)."""
    cast = np.asarray(jnp.asarray(weight, dtype).astype(jnp.float32))
    s, z = _grid(seg, _stored_scale(scale), zero)
    same = np.clip(np.round(cast / s) + z, 0, max_code(seg.bits)) == codes
    return jnp.asarray(np.where(same, cast, centre), dtype)


def packed_linear(trainable: TrainableLinear) -> QuantizedLinear:
    """The packed layer whose dequantized weights are exactly `trainable.quantized_weight()`.

    On the host in numpy with the float32 operations of `fake_quantize` (IEEE division,
    round-half-to-even), so that converting a model with a different segment shape in every
    layer compiles nothing; the tests check it against the jnp forward bit for bit."""

    def segment(seg: TrainSegment) -> Segment:
        if seg.bits == DENSE_BITS:
            return make_dense_segment(np.asarray(seg.weight, np.float32), seg.start)
        weight = None if seg.weight is None else np.asarray(seg.weight, np.float32)
        maxq = max_code(seg.bits)
        scale = _stored_scale(np.asarray(seg.scale, np.float32))
        zero = np.clip(np.round(np.asarray(seg.zero, np.float32)), 0, maxq)
        group_of_col = np.arange(seg.n_cols) // seg.group_size
        if seg.codes is not None:
            codes = np.asarray(seg.codes)
        else:
            codes = np.clip(np.round(weight / scale[:, group_of_col]) + zero[:, group_of_col], 0, maxq)
        return make_segment(codes.astype(np.int32), scale, zero, seg.bits, seg.start, seg.group_size)

    def param(a):
        return None if a is None else np.asarray(a, np.float32)

    return QuantizedLinear.create(
        [segment(seg) for seg in trainable.segments],
        perm=np.asarray(trainable.perm),
        lowrank_b=param(trainable.lowrank_b),
        lowrank_a=param(trainable.lowrank_a),
        bias=param(trainable.bias),
        input_scale=None if trainable.input_scale is None else jnp.asarray(trainable.input_scale),
    )


def _map_linears(tree, fn, kind):
    return jax.tree_util.tree_map(lambda leaf: fn(leaf) if isinstance(leaf, kind) else leaf, tree, is_leaf=lambda x: isinstance(x, kind))


def trainable_params(params: dict, dtype=jnp.float32, fixed_codes: bool = False, fp_params: dict | None = None) -> dict:
    """Every QuantizedLinear of a params tree (or of one block) in trainable form
    (`trainable_linear`, with the FP weights at the same place in `fp_params` if given);
    other float leaves (embeddings, norms, dense linears) cast to `dtype`."""

    def cast(leaf):
        if isinstance(leaf, TrainableLinear):
            return leaf
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf, dtype)
        return leaf

    if fp_params is None:
        converted = _map_linears(params, lambda ql: trainable_linear(ql, dtype, fixed_codes), QuantizedLinear)
    else:
        converted = jax.tree_util.tree_map(
            lambda leaf, fp: trainable_linear(leaf, dtype, fixed_codes, fp["weight"]) if isinstance(leaf, QuantizedLinear) else leaf,
            params,
            fp_params,
            is_leaf=lambda x: isinstance(x, QuantizedLinear),
        )
    return jax.tree_util.tree_map(cast, converted, is_leaf=lambda x: isinstance(x, TrainableLinear))


def packed_params(original, trained):
    """`original` (a packed params tree or block) with each QuantizedLinear replaced by the
    packed form of its trained counterpart in `trained` (the same tree in trainable form).
    Everything else comes from `original`: training may run in another dtype, and frozen
    leaves must come back exactly as they were."""
    return jax.tree_util.tree_map(
        lambda before, after: packed_linear(after) if isinstance(before, QuantizedLinear) else before,
        original,
        trained,
        is_leaf=lambda x: isinstance(x, QuantizedLinear),
    )


def leaf_roles(params):
    """A tree of the same structure with each leaf replaced by its role (module docstring);
    works on the halves of a `partition` too."""

    def role(leaf, name):  # absent leaves (and those a partition removed) stay absent
        return None if leaf is None else name

    def linear_roles(tl: TrainableLinear) -> TrainableLinear:
        segments = tuple(
            dataclasses.replace(
                seg,
                weight=role(seg.weight, ROLE_DENSE if seg.bits == DENSE_BITS else ROLE_WEIGHT),
                codes=role(seg.codes, ROLE_FROZEN),
                scale=role(seg.scale, ROLE_SCALE),
                zero=role(seg.zero, ROLE_ZERO),
            )
            for seg in tl.segments
        )
        return dataclasses.replace(
            tl,
            perm=role(tl.perm, ROLE_FROZEN),
            segments=segments,
            lowrank_b=role(tl.lowrank_b, ROLE_LOWRANK),
            lowrank_a=role(tl.lowrank_a, ROLE_LOWRANK),
            bias=role(tl.bias, ROLE_BIAS),
            input_scale=role(tl.input_scale, ROLE_FROZEN),
        )

    with_linears = _map_linears(params, linear_roles, TrainableLinear)
    return jax.tree_util.tree_map(
        lambda leaf: leaf if isinstance(leaf, str) else ROLE_FROZEN, with_linears
    )


def trainable_mask(params, roles: frozenset[str] | set[str]):
    """A tree of bools: True where the leaf's role is in `roles`."""
    unknown = set(roles) - set(TRAINABLE_ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; choose from {', '.join(TRAINABLE_ROLES)}")
    return jax.tree_util.tree_map(lambda role: role in roles, leaf_roles(params))


def partition(params, mask):
    """(trainable, frozen): two trees of params' structure, each with None where the other
    holds the leaf. Gradients are taken with respect to `trainable` only, so a frozen leaf
    cannot move, whatever the optimizer does."""
    trainable = jax.tree_util.tree_map(lambda leaf, m: leaf if m else None, params, mask)
    frozen = jax.tree_util.tree_map(lambda leaf, m: None if m else leaf, params, mask)
    return trainable, frozen


def combine(trainable, frozen):
    """The inverse of `partition`."""
    return jax.tree_util.tree_map(
        lambda a, b: b if a is None else a, trainable, frozen, is_leaf=lambda x: x is None
    )


def count_parameters(tree) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))
