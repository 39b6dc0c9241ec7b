"""Dequant-matmul kernels against bf16 `jnp.dot` and XLA dequantize-then-dot, on real-model shapes.

    python scripts/bench_kernels.py [--json runs/bench_kernels.json] [--repeats 20]

On a GPU or TPU, for every shape (4096x4096, 4096->11008, 11008->4096, 8192x8192,
8192->28672), token count (1, 4, 16, 128) and bit mix (uniform 4, 3, 2; ~2.5 BPW with 2%
dense columns; AMLQ-like 4/3/2 groups with a rank-64 low-rank term) it times, side by side
in one run: the bf16 `jnp.dot` with a dense weight, XLA dequantizing the packed layer and
then multiplying, and the Pallas kernel (`pallas_kernels.dispatch.quantized_matmul`). For
each it reports the bytes the op must move (weights as stored + activations + output),
the achieved GB/s, and that as a percentage of the device's copy bandwidth measured here
(a roofline for these memory-bound shapes). It then compares decode tokens/s of a
Llama-2-7B-shaped model (32 blocks of 4096/11008, synthetic weights) in bf16, 4-bit and
~2.5 BPW. Packed weights are random words: every bit pattern is a valid code, so no
packing is needed to build them, and timing does not depend on the values.

On CPU it runs the correctness path only and says so: the same synthetic layers, scaled
down, through both kernels in Pallas interpret mode, checked against the plain-jnp
reference. Writes a JSON list of rows and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.output import atomic_write_text
from mpq_jax.packed.planes import n_blocks
from mpq_jax.packed.qlinear import DENSE_BITS, QuantizedLinear, Segment, bits_per_weight, storage_bits
from pallas_kernels.dispatch import kernel_backend, quantized_matmul

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]  # (in, out)
TOKENS = [1, 4, 16, 128]
GROUP = 128


@dataclasses.dataclass(frozen=True)
class BitMix:
    """Fractions of input columns per bit width (16 = dense), in order, and a low-rank rank."""

    name: str
    parts: tuple[tuple[int, float], ...]
    rank: int = 0


MIXES = [
    BitMix("uniform-4", ((4, 1.0),)),
    BitMix("uniform-3", ((3, 1.0),)),
    BitMix("uniform-2", ((2, 1.0),)),
    BitMix("mixed-2.5bpw", ((16, 0.02), (3, 0.125), (2, 0.855))),
    BitMix("amlq-like-r64", ((4, 0.25), (3, 0.5), (2, 0.25)), rank=64),
]


def split_columns(k: int, mix: BitMix) -> list[tuple[int, int]]:
    """(bits, columns) per segment: fractions of k rounded to whole groups, last takes the rest."""
    sizes, used = [], 0
    for i, (bits, fraction) in enumerate(mix.parts):
        cols = k - used if i == len(mix.parts) - 1 else max(GROUP, round(k * fraction / GROUP) * GROUP)
        sizes.append((bits, cols))
        used += cols
    return sizes


def synthetic_layer(rng, k: int, n: int, mix: BitMix) -> QuantizedLinear:
    """A valid layer with random packed words, scales in a realistic range, random zeros."""
    segments, start = [], 0
    for bits, cols in split_columns(k, mix):
        if bits == DENSE_BITS:
            dense = jnp.asarray(rng.standard_normal((cols, n), np.float32) * 0.02, jnp.float16)
            segments.append(Segment(start, start + cols, DENSE_BITS, 0, dense=dense))
        else:
            groups = -(-cols // GROUP)
            codes = jnp.asarray(rng.integers(0, 2**32, (bits, n_blocks(cols), n), dtype=np.uint32))
            scale = jnp.asarray(rng.uniform(1e-3, 1e-2, (groups, n)), jnp.float16)
            zero = jnp.asarray(rng.integers(0, 2**bits, (groups, n), dtype=np.uint8))
            segments.append(Segment(start, start + cols, bits, GROUP, codes=codes, scale=scale, zero=zero))
        start += cols
    lowrank = {}
    if mix.rank:
        lowrank = dict(
            lowrank_b=jnp.asarray(rng.standard_normal((n, mix.rank)) * 0.01, jnp.float16),
            lowrank_a=jnp.asarray(rng.standard_normal((mix.rank, k)) * 0.01, jnp.float16),
        )
    layer = QuantizedLinear(in_features=k, out_features=n, perm=jnp.asarray(rng.permutation(k), jnp.int32),
                            segments=tuple(segments), **lowrank)
    layer.validate()
    return layer


def median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def copy_bandwidth(repeats: int) -> float:
    """Device copy bandwidth in GB/s: read + write of a 1 GiB buffer."""
    x = jnp.ones((256, 1024, 1024), jnp.float32)
    seconds = median_seconds(jax.jit(lambda x: x + 1), (x,), repeats)
    return 2 * x.nbytes / seconds / 1e9


def layer_rows(rng, k, n, mix, tokens_list, repeats, bandwidth) -> list[dict]:
    layer = synthetic_layer(rng, k, n, mix)
    dense_w = jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02, jnp.bfloat16)
    dot = jax.jit(lambda x, w: jnp.dot(x, w))
    dequant_then_dot = jax.jit(lambda x, l: jnp.dot(x, l.effective_weight(jnp.bfloat16).T))
    kernel = jax.jit(lambda x, l: quantized_matmul(x, l))
    rows = []
    for tokens in tokens_list:
        x = jnp.asarray(rng.standard_normal((tokens, k)), jnp.bfloat16)
        io_bytes = 2 * tokens * (k + n)
        packed_bytes = storage_bits(layer) / 8 + io_bytes
        row = {"in": k, "out": n, "tokens": tokens, "mix": mix.name, "bpw": bits_per_weight(layer)}
        for name, fn, args, nbytes in (
            ("bf16_dot", dot, (x, dense_w), 2 * k * n + io_bytes),
            ("dequant_dot", dequant_then_dot, (x, layer), packed_bytes),
            ("kernel", kernel, (x, layer), packed_bytes),
        ):
            seconds = median_seconds(fn, args, repeats)
            row[f"{name}_us"] = seconds * 1e6
            row[f"{name}_gbps"] = nbytes / seconds / 1e9
            row[f"{name}_roofline_pct"] = 100 * row[f"{name}_gbps"] / bandwidth
        rows.append(row)
        print(
            f"{k:>6}x{n:<6}{tokens:>5} {mix.name:<14}{row['bpw']:>6.2f}"
            + "".join(f"{row[f'{m}_us']:>10.1f}{row[f'{m}_roofline_pct']:>7.1f}%" for m in ("bf16_dot", "dequant_dot", "kernel")),
            flush=True,
        )
    return rows


def decode_rows(rng, repeats) -> list[dict]:
    """Decode tokens/s of a Llama-2-7B-shaped model: bf16 vs 4-bit vs ~2.5 BPW (synthetic)."""
    from mpq_jax.infer import init_cache, model_step
    from mpq_jax.models.spec import ModelSpec

    spec = ModelSpec(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                     num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                     tie_word_embeddings=False, attention_bias=False, mlp_bias=False, qk_norm=False, rope_scaling=None,
                     max_position_embeddings=4096)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 1000))

    def normal(*shape):  # on the device: 13 GB of bf16 weights are not worth drawing on the host
        return (jax.random.normal(next(keys), shape, jnp.float32) * 0.02).astype(jnp.bfloat16)

    shapes = {("self_attn", "q_proj"): (4096, 4096), ("self_attn", "k_proj"): (4096, 4096),
              ("self_attn", "v_proj"): (4096, 4096), ("self_attn", "o_proj"): (4096, 4096),
              ("mlp", "gate_proj"): (4096, 11008), ("mlp", "up_proj"): (4096, 11008), ("mlp", "down_proj"): (11008, 4096)}
    rows = []
    for label, mix in (("bf16", None), ("4-bit", MIXES[0]), ("~2.5 BPW", MIXES[3])):
        def linear(k, n):
            if mix is None:
                return {"weight": normal(n, k)}
            return synthetic_layer(rng, k, n, mix)

        layers = []
        for _ in range(spec.num_layers):
            layer = {"input_layernorm": {"weight": jnp.ones(4096, jnp.bfloat16)},
                     "post_attention_layernorm": {"weight": jnp.ones(4096, jnp.bfloat16)},
                     "self_attn": {}, "mlp": {}}
            for (module, name), (k, n) in shapes.items():
                layer[module][name] = linear(k, n)
            layers.append(layer)
        params = {"embed_tokens": {"weight": normal(32000, 4096)}, "lm_head": {"weight": normal(32000, 4096)},
                  "norm": {"weight": jnp.ones(4096, jnp.bfloat16)}, "layers": layers}
        cache = init_cache(spec, 1, 256, jnp.bfloat16)
        token = jnp.asarray([[1]], jnp.int32)
        _, cache = model_step(params, spec, token, cache, jnp.int32(0), jnp.int32(0))  # compile
        steps = max(repeats, 16)
        start = time.perf_counter()
        for position in range(1, steps + 1):
            logits, cache = model_step(params, spec, token, cache, jnp.int32(position), jnp.int32(0))
        jax.block_until_ready(logits)
        tokens_per_second = steps / (time.perf_counter() - start)
        rows.append({"decode_model": "llama-2-7b-shape", "weights": label, "tokens_per_s": tokens_per_second})
        print(f"decode {label:<10}{tokens_per_second:>10.1f} tokens/s", flush=True)
        del params, layers, cache
    return rows


def correctness_rows(rng) -> list[dict]:
    """CPU: scaled-down synthetic layers through both kernels in interpret mode vs the reference."""
    rows = []
    for k, n in ((640, 200),):  # 200 outputs: not a multiple of any block
        for mix in MIXES:
            scaled = dataclasses.replace(mix, rank=min(mix.rank, 16))
            layer = synthetic_layer(rng, k, n, scaled)
            for tokens in (1, 16):
                x = jnp.asarray(rng.standard_normal((tokens, k)), jnp.float32)
                ref = np.asarray(layer.apply(x), np.float64)
                for backend in ("gpu", "tpu"):
                    y = np.asarray(quantized_matmul(x, layer, backend=backend, interpret=True), np.float64)
                    err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
                    rows.append({"in": k, "out": n, "tokens": tokens, "mix": mix.name, "backend": backend,
                                 "interpret": True, "max_rel_error": err})
                    print(f"{k:>6}x{n:<6}{tokens:>5} {mix.name:<14}{backend:>5} interpret  max rel err {err:.2e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="runs/bench_kernels.json")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-decode", action="store_true", help="only the per-layer table")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    backend = kernel_backend()
    if backend is None:
        print(f"backend {jax.default_backend()}: no Pallas kernel to time here; running the correctness path only "
              "(both kernels in Pallas interpret mode against the plain-jnp reference, scaled-down shapes).")
        rows = correctness_rows(rng)
        worst = max(r["max_rel_error"] for r in rows)
        print(f"worst relative error {worst:.2e} over {len(rows)} checks")
        status = 0 if worst < 1e-4 else 1
    else:
        device = jax.devices()[0]
        bandwidth = copy_bandwidth(args.repeats)
        print(f"device: {device.device_kind}; measured copy bandwidth {bandwidth:.0f} GB/s")
        print(f"{'shape':>13}{'tok':>5} {'mix':<14}{'bpw':>6}" + "".join(f"{m:>17}" for m in ("bf16_dot us/%", "dequant_dot us/%", "kernel us/%")))
        rows = [{"device": device.device_kind, "copy_gbps": bandwidth}]
        for k, n in SHAPES:
            for mix in MIXES:
                rows += layer_rows(rng, k, n, mix, TOKENS, args.repeats, bandwidth)
        if not args.skip_decode:
            rows += decode_rows(rng, args.repeats)
        status = 0
    path = Path(args.json)
    atomic_write_text(path, json.dumps(rows, indent=2) + "\n")
    print(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
