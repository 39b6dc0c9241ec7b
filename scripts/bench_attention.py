"""Causal grouped-query attention alone: mpq-jax's jitted XLA version against PyTorch's SDPA.

    python scripts/bench_attention.py [--seq-len 2048] [--repeats 10] [--json PATH]

Shapes are SmolLM2-135M's (9 query heads, 3 key/value heads, head_dim 64), batch 1, float32.
Prints the median seconds per call of each and their ratio, and checks both give the same
output. Needs the `test` extra (torch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.models.decoder import causal_attention
from mpq_jax.output import atomic_write_text


def median_seconds(call, repeats: int) -> float:
    call()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch

    heads, kv_heads, head_dim = 9, 3, 64
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, args.seq_len, heads, head_dim), dtype=np.float32)
    k = rng.standard_normal((1, args.seq_len, kv_heads, head_dim), dtype=np.float32)
    v = rng.standard_normal((1, args.seq_len, kv_heads, head_dim), dtype=np.float32)

    jitted = jax.jit(causal_attention)
    qj, kj, vj = map(jnp.asarray, (q, k, v))
    ours = median_seconds(lambda: jitted(qj, kj, vj).block_until_ready(), args.repeats)
    qt, kt, vt = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))

    def torch_call():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    theirs = median_seconds(torch_call, args.repeats)
    difference = np.abs(np.asarray(jitted(qj, kj, vj)) - torch_call().transpose(1, 2).numpy()).max()
    print(f"causal GQA attention, T={args.seq_len}, H={heads}, KV={kv_heads}, hd={head_dim}, float32")
    print(f"{'implementation':<26}{'median s':>10}")
    print(f"{'mpq-jax (XLA, chunked)':<26}{ours:>10.4f}")
    print(f"{'torch SDPA':<26}{theirs:>10.4f}")
    print(f"ratio mpq-jax/torch time: {ours / theirs:.2f}; max |difference|: {difference:.2e}")
    if args.json:
        row = {"seq_len": args.seq_len, "mpq_jax_s": ours, "torch_sdpa_s": theirs, "max_abs_difference": float(difference)}
        atomic_write_text(args.json, json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
