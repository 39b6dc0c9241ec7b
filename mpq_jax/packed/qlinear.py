"""`QuantizedLinear`: the one contract every quantization method produces.

    y = sum over segments of dequant(seg) @ x_s[..., perm[seg.start:seg.stop]]
        + B @ (A @ x) + bias,       x_s = x * input_scale  (or x when there is none)

RTN, GPTQ, AMLQ, TAMMP and QAT all emit this structure; save/load, evaluation, kernels and
generation consume only it. Both classes are JAX pytrees: arrays are leaves, column ranges
and bit widths are static aux data (so jit retraces once per layer structure).

Storage layout (layout 2, chosen for the kernels; `pallas_kernels/README.md` argues it):
every per-segment array has the output axis last, so a kernel tile over outputs is one
contiguous load. Codes are uint32 bit-plane words [bits, ceil(cols / 32), out]
(`mpq_jax.packed.planes`); scales are float16 [groups, out]; zero points are uint8
[groups, out] (one byte per group and output: a zero packed below a byte would save at most
0.05 bits per weight at group 128 but cost every kernel tile a lane shuffle); dense columns
are float16 [cols, out]; low-rank factors and bias are float16. Files written in layout 1
(codes as row bitstreams [out, words], zeros packed along the output axis) are converted
when loaded (`mpq_jax.packed.io`).

Bits per weight is computed from the stored arrays alone (`storage_bits`), so a budget and
a report can never disagree with what is on disk:

    storage_bits = sum over every stored array except `perm` of (entries * bits per entry)
                 = 32 * code words + 8 * zeros
                   + 16 * (scales + dense + A + B + bias + input_scale)
    bits_per_weight = storage_bits / (out_features * in_features)

`perm` is not counted: it is one int vector per layer (about 32/out bits per weight) that a
kernel can absorb into the order of the activations or of the previous layer's outputs.
The bias is counted even when the original model had one: everything stored is counted.
Packing pads a segment's columns to a multiple of 32; Llama/Qwen widths are multiples of
32, so uniform layers are never padded.

Not here: how codes are chosen (mpq_jax.quant), file I/O (io.py), fast kernels
(pallas_kernels/, which convert from this layout). `apply` is the plain-jnp reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.packed.planes import MAX_BITS, MIN_BITS, eager_on_cpu, leading_rows, n_blocks, pack_codes, unpack_blocks
from mpq_jax.quant.grid import dequantize_codes

DENSE_BITS = 16  # a segment of this width keeps its columns unquantized, in float16
STORAGE_FLOAT = jnp.float16  # dtype of every stored float array (scale, dense, A, B, bias)
ZERO_DTYPE = jnp.uint8  # zero-point codes, one per group and output


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """A contiguous range [start, stop) of permuted columns quantized at one bit width.

    codes: uint32 [bits, n_blocks(stop - start), out]   (bits < 16; see mpq_jax.packed.planes)
    scale: float16 [n_groups, out]                        (bits < 16)
    zero:  uint8 [n_groups, out]                          (bits < 16)
    dense: float16 [stop - start, out]                    (bits == 16 only)
    Groups of `group_size` columns start at `start`; the last may be shorter.
    Dense segments have group_size 0 and no groups.
    """

    start: int
    stop: int
    bits: int
    group_size: int
    codes: jax.Array | None = None
    scale: jax.Array | None = None
    zero: jax.Array | None = None
    dense: jax.Array | None = None

    @property
    def n_cols(self) -> int:
        return self.stop - self.start

    @property
    def n_groups(self) -> int:
        if self.bits == DENSE_BITS:
            return 0
        return math.ceil(self.n_cols / self.group_size)

    def zero_points(self) -> jax.Array:
        """int32 [out, n_groups] zero-point codes."""
        return self.zero.astype(jnp.int32).T

    def dequantize(self) -> jax.Array:
        """float32 [out, stop - start] weights of this segment's columns (permuted order)."""
        return self.dequantize_t().T

    def dequantize_t(self) -> jax.Array:
        """float32 [stop - start, out]: the weights as the kernels lay them out (inputs first)."""
        if self.bits == DENSE_BITS:
            if not eager_on_cpu(self.dense):
                return self.dense.astype(jnp.float32)
            return jnp.asarray(np.asarray(self.dense).astype(np.float32))  # no per-shape compile (see dequantize)
        # Whole 32-column blocks in one program per (bits, blocks, groups, out), then the
        # segment's columns: segments of different lengths share the compiled program.
        return leading_rows(_dequantize_blocks(self.codes, self.scale, self.zero, self.bits, self.group_size), self.n_cols)

    def validate(self, out_features: int) -> None:
        """Raise ValueError naming the field if shapes, dtypes or widths are inconsistent."""
        where = f"segment [{self.start}, {self.stop})"
        if not 0 <= self.start < self.stop:
            raise ValueError(f"{where}: need 0 <= start < stop")
        if self.bits == DENSE_BITS:
            _expect(self.dense, (self.n_cols, out_features), STORAGE_FLOAT, f"{where}.dense")
            if any(a is not None for a in (self.codes, self.scale, self.zero)):
                raise ValueError(f"{where}: a 16-bit segment stores only `dense`")
            return
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"{where}: bits must be in {MIN_BITS}..{MAX_BITS} or 16, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"{where}: group_size must be >= 1, got {self.group_size}")
        if self.dense is not None:
            raise ValueError(f"{where}: a {self.bits}-bit segment must not store `dense`")
        _expect(self.codes, (self.bits, n_blocks(self.n_cols), out_features), jnp.uint32, f"{where}.codes")
        _expect(self.scale, (self.n_groups, out_features), STORAGE_FLOAT, f"{where}.scale")
        _expect(self.zero, (self.n_groups, out_features), ZERO_DTYPE, f"{where}.zero")


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedLinear:
    """A linear layer y = W x + B A x + bias with W stored as quantized segments.

    perm:      int32 [in]      permuted column p is original column perm[p]
    segments:  tuple[Segment]  contiguous, covering [0, in) of the permuted columns in order
    lowrank_b: float16 [out, r] or None; lowrank_a: float16 [r, in] or None
               (A acts on x in ORIGINAL column order, unscaled)
    bias:      float16 [out] or None
    input_scale: float16 [in] or None: the quantized segments act on x * input_scale
               (original column order). AWQ-style scaling (mpq_jax.quant.awq) quantizes
               W diag(s) and stores 1/s here, so the layer still computes ≈ W x.
    """

    in_features: int
    out_features: int
    perm: jax.Array
    segments: tuple[Segment, ...]
    lowrank_b: jax.Array | None = None
    lowrank_a: jax.Array | None = None
    bias: jax.Array | None = None
    input_scale: jax.Array | None = None

    @classmethod
    def create(
        cls,
        segments: Sequence[Segment],
        *,
        perm=None,
        lowrank_b=None,
        lowrank_a=None,
        bias=None,
        input_scale=None,
    ) -> "QuantizedLinear":
        """Build and validate a layer (host side, not under jit); sizes come from the segments.

        perm defaults to the identity; low-rank factors, bias and input scale are stored as
        float16.
        """
        segments = tuple(segments)
        if not segments:
            raise ValueError("segments: a QuantizedLinear needs at least one segment")
        first = segments[0]
        out_features = int((first.dense if first.bits == DENSE_BITS else first.codes).shape[-1])
        in_features = segments[-1].stop
        perm = np.arange(in_features) if perm is None else perm
        ql = cls(
            in_features=in_features,
            out_features=out_features,
            perm=jnp.asarray(perm, dtype=jnp.int32),
            segments=segments,
            lowrank_b=_to_storage_float(lowrank_b, "lowrank_b"),
            lowrank_a=_to_storage_float(lowrank_a, "lowrank_a"),
            bias=_to_storage_float(bias, "bias"),
            input_scale=_to_storage_float(input_scale, "input_scale"),
        )
        ql.validate()
        return ql

    @property
    def rank(self) -> int:
        return 0 if self.lowrank_a is None else int(self.lowrank_a.shape[0])

    def validate(self) -> None:
        """Raise ValueError naming the field if the layer breaks the contract above."""
        out, n_in = self.out_features, self.in_features
        expected_start = 0
        for seg in self.segments:
            if seg.start != expected_start:
                raise ValueError(
                    f"segments must be contiguous from 0: segment [{seg.start}, {seg.stop}) "
                    f"should start at {expected_start}"
                )
            seg.validate(out)
            expected_start = seg.stop
        if expected_start != n_in:
            raise ValueError(f"segments cover [0, {expected_start}) but in_features is {n_in}")
        _expect(self.perm, (n_in,), jnp.int32, "perm")
        if not np.array_equal(np.sort(np.asarray(self.perm)), np.arange(n_in)):
            raise ValueError(f"perm must be a permutation of 0..{n_in - 1}")
        if (self.lowrank_a is None) != (self.lowrank_b is None):
            raise ValueError("lowrank_a and lowrank_b must be given together")
        if self.lowrank_a is not None:
            r = self.rank
            if r < 1:
                raise ValueError("lowrank_a: rank must be >= 1 (use None for no low-rank term)")
            _expect(self.lowrank_a, (r, n_in), None, "lowrank_a")
            _expect(self.lowrank_b, (out, r), None, "lowrank_b")
        if self.bias is not None:
            _expect(self.bias, (out,), None, "bias")
        if self.input_scale is not None:
            _expect(self.input_scale, (n_in,), None, "input_scale")

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """[out, in] quantized weights in ORIGINAL column order, times the input scale if any
        (the low-rank term excluded).

        Eagerly on the CPU the assembly (transpose, concatenation, permutation, input scale)
        runs in numpy, with the same float32 operations: in jnp each op compiles once per
        distinct shape, and mixed-precision layers (TAMMP's classes) have different segment
        shapes in nearly every layer. Under jit (the forward pass) it is the jnp program."""
        xp = np if eager_on_cpu(self.perm) else jnp
        w_perm = xp.concatenate([xp.asarray(seg.dequantize_t()).T for seg in self.segments], axis=1)  # [out, in]
        # Permuted column p holds original column perm[p]: original column j is at position inverse[j].
        w = w_perm[:, xp.argsort(xp.asarray(self.perm))]
        if self.input_scale is not None:
            w = w * xp.asarray(self.input_scale).astype(np.float32)[None, :]
        w = jnp.asarray(w)
        return w if w.dtype == dtype else w.astype(dtype)

    def effective_weight(self, dtype=jnp.float32) -> jax.Array:
        """[out, in] weights the layer applies: dequantize() + B @ A."""
        w = self.dequantize(jnp.float32)
        if self.lowrank_a is not None:
            w = w + self.lowrank_b.astype(jnp.float32) @ self.lowrank_a.astype(jnp.float32)
        return w.astype(dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        """x [..., in] -> y [..., out] in x's dtype; the float32 plain-jnp reference."""
        x32 = jnp.asarray(x).astype(jnp.float32)
        y = x32 @ self.dequantize(jnp.float32).T
        if self.lowrank_a is not None:
            # Two thin matmuls (r << in, out) instead of materializing B @ A.
            y = y + (x32 @ self.lowrank_a.astype(jnp.float32).T) @ self.lowrank_b.astype(jnp.float32).T
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32)
        return y.astype(jnp.asarray(x).dtype)


jax.tree_util.register_dataclass(
    Segment,
    data_fields=["codes", "scale", "zero", "dense"],
    meta_fields=["start", "stop", "bits", "group_size"],
)
jax.tree_util.register_dataclass(
    QuantizedLinear,
    data_fields=["perm", "segments", "lowrank_b", "lowrank_a", "bias", "input_scale"],
    meta_fields=["in_features", "out_features"],
)


def make_segment(codes, scale, zero, bits: int, start: int, group_size: int) -> Segment:
    """Pack a quantized segment on the host and validate it.

    codes: int [out, cols] in [0, 2**bits); scale: float [out, n_groups];
    zero: integer-valued [out, n_groups] in [0, 2**bits); n_groups = ceil(cols / group_size).
    """
    codes = np.asarray(codes)
    scale = np.asarray(scale)
    zero = np.asarray(zero)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [out, cols], got shape {codes.shape}")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    out, cols = codes.shape
    n_groups = math.ceil(cols / group_size)
    if scale.shape != (out, n_groups):
        raise ValueError(f"scale must be [out, n_groups] = {(out, n_groups)}, got {scale.shape}")
    if zero.shape != (out, n_groups):
        raise ValueError(f"zero must be [out, n_groups] = {(out, n_groups)}, got {zero.shape}")
    if not np.array_equal(zero, np.round(zero)):
        raise ValueError("zero must hold integer codes")
    if zero.size and (zero.min() < 0 or zero.max() >= 2**bits):
        raise ValueError(f"zero must hold {bits}-bit codes in [0, {2**bits - 1}], got [{zero.min()}, {zero.max()}]")
    scale16 = scale.astype(np.float16)
    if not np.all(np.isfinite(scale16)):
        raise ValueError("scale has values that are not finite in float16")
    seg = Segment(
        start=int(start),
        stop=int(start) + cols,
        bits=int(bits),
        group_size=int(group_size),
        codes=jnp.asarray(pack_codes(codes.T.astype(np.int64), bits)),
        scale=jnp.asarray(scale16.T),
        zero=jnp.asarray(zero.T.astype(np.uint8)),
    )
    seg.validate(out)
    return seg


def make_dense_segment(w_cols, start: int) -> Segment:
    """A 16-bit segment keeping columns w_cols [out, cols] in float16."""
    w_cols = np.asarray(w_cols)
    if w_cols.ndim != 2:
        raise ValueError(f"w_cols must be [out, cols], got shape {w_cols.shape}")
    dense = _to_storage_float(w_cols.T, "dense")
    seg = Segment(start=int(start), stop=int(start) + w_cols.shape[1], bits=DENSE_BITS, group_size=0, dense=dense)
    seg.validate(w_cols.shape[0])
    return seg


def storage_bits(ql: QuantizedLinear) -> int:
    """Bits of every stored array except `perm` (see the module docstring for the formula)."""
    arrays = [ql.lowrank_a, ql.lowrank_b, ql.bias, ql.input_scale]
    for seg in ql.segments:
        arrays += [seg.codes, seg.scale, seg.zero, seg.dense]
    return sum(_array_bits(a) for a in arrays if a is not None)


def bits_per_weight(ql: QuantizedLinear) -> float:
    """storage_bits / (out_features * in_features)."""
    return storage_bits(ql) / (ql.out_features * ql.in_features)


def model_bits_per_weight(qlinears: Sequence[QuantizedLinear]) -> float:
    """Bits per weight over several layers: total stored bits / total weights."""
    qlinears = list(qlinears)
    if not qlinears:
        raise ValueError("model_bits_per_weight needs at least one layer")
    total_bits = sum(storage_bits(ql) for ql in qlinears)
    total_weights = sum(ql.out_features * ql.in_features for ql in qlinears)
    return total_bits / total_weights


def _array_bits(a) -> int:
    return int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize * 8


def _to_storage_float(a, name: str):
    """Cast to the fp16 storage dtype, refusing values that overflow it."""
    if a is None:
        return None
    a = jnp.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
    stored = a.astype(STORAGE_FLOAT)
    if not bool(jnp.all(jnp.isfinite(stored) | ~jnp.isfinite(a))):
        raise ValueError(f"{name} has values beyond float16's range (|x| > 65504)")
    return stored


def _expect(a, shape: tuple, dtype, name: str) -> None:
    if a is None:
        raise ValueError(f"{name} is missing")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if dtype is not None and jnp.dtype(a.dtype) != jnp.dtype(dtype):
        raise ValueError(f"{name} must have dtype {jnp.dtype(dtype).name}, got {jnp.dtype(a.dtype).name}")
    if dtype is None and not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _dequantize_blocks(codes, scale, zero, bits: int, group_size: int) -> jax.Array:
    """float32 [32 B, out] weights of a segment's whole 32-column blocks (codes [bits, B, out]);
    rows past the segment's columns repeat its last group's grid and are dropped by the caller."""
    q = unpack_blocks(codes, bits)  # [32 B, out]
    group_of_col = jnp.minimum(jnp.arange(q.shape[0]) // group_size, scale.shape[0] - 1)
    return dequantize_codes(q, scale.astype(jnp.float32)[group_of_col], zero.astype(jnp.int32)[group_of_col])
