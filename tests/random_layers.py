"""Random packed layers for tests: a QuantizedLinear of any segment plan with the float64
weights it encodes, built from the unpacked ingredients (codes, scales, zeros)."""

from __future__ import annotations

import math

import numpy as np

from mpq_jax.packed.qlinear import QuantizedLinear, make_dense_segment, make_segment


def random_layer(rng, out, plan, rank=0, bias=False, input_scale=False):
    """A QuantizedLinear from plan = [(bits, cols, group_size)], plus float64 weights [out, in]."""
    segments, columns, start = [], [], 0
    for bits, cols, group_size in plan:
        if bits == 16:
            dense = rng.standard_normal((out, cols)).astype(np.float16)
            segments.append(make_dense_segment(dense, start))
            columns.append(dense.astype(np.float64))
        else:
            groups = math.ceil(cols / group_size)
            codes = rng.integers(0, 2**bits, (out, cols))
            scale = rng.uniform(1e-3, 1e-1, (out, groups)).astype(np.float16)
            zero = rng.integers(0, 2**bits, (out, groups))
            segments.append(make_segment(codes, scale, zero, bits, start, group_size))
            group_of_col = np.arange(cols) // group_size
            columns.append((codes - zero[:, group_of_col]) * scale.astype(np.float64)[:, group_of_col])
        start += cols
    n_in = start
    perm = rng.permutation(n_in)
    w = np.zeros((out, n_in))
    w[:, perm] = np.concatenate(columns, axis=1)
    lowrank_b = rng.standard_normal((out, rank)).astype(np.float16) if rank else None
    lowrank_a = rng.standard_normal((rank, n_in)).astype(np.float16) if rank else None
    b = rng.standard_normal(out).astype(np.float16) if bias else None
    scale = rng.uniform(0.25, 4.0, n_in).astype(np.float16) if input_scale else None
    layer = QuantizedLinear.create(segments, perm=perm, lowrank_b=lowrank_b, lowrank_a=lowrank_a, bias=b, input_scale=scale)
    if input_scale:
        w = w * scale.astype(np.float64)[None, :]
    if rank:
        w = w + lowrank_b.astype(np.float64) @ lowrank_a.astype(np.float64)
    return layer, w, (None if b is None else b.astype(np.float64))
