"""PTQ quality table on the default model: method, bits, group size, BPW, WikiText-2 PPL, time.

    python scripts/bench_ptq.py [--windows 8] [--seq-len 2048] [--json PATH] [--model M]
                                [--methods fp,rtn,gptq] [--bits 4,3] [--groups 64]
                                [--calib-sources wikipedia]
                                [--calib-samples 64] [--calib-seq-len 512] [--peer]

Every row is scored on the same first K windows of 2048 tokens (`--windows 0` = the whole
test text), so rows compare methods, not text. Rows: FP (the model as loaded) and RTN at
8/4/3/2 bits with group sizes 128 and 64, and GPTQ (act-order, static groups) at 4/3/2
bits with group sizes 128 and 64, calibrated by default on 64 x 512 tokens of the Wikipedia calibration
split. GPTQ rows use the unquantized model's Hessians (propagate: fp), computed once per
(model, calibration) and cached on disk, so the rows — and later runs — share them; the
first GPTQ row's seconds include that capture. Writes a JSON list of rows with keys
`method`, `bits`, `group_size`, `bpw`, `ppl`, `quantize_seconds`, `seconds` (quantize +
evaluate), and a PNG of PPL against BPW beside it. Later methods add rows through `ROWS`.

`--peer` (needs the `compare` extra) also runs llm-compressor's GPTQModifier, a maintained
PyTorch GPTQ, on every GPTQ row whose group size divides every block linear's input width
(it refuses others: 576 is not a multiple of 128 on the default model), with the same
calibration windows, bits, group size, act-order ("static"), damping and 128-column blocks.
Its weights are scored by mpq-jax's perplexity on the same windows, so the PPL ratio
compares quantizers alone. In this mode our GPTQ rows feed each block's quantized outputs
to the next block, as the peer's sequential pipeline does, and capture their Hessians
afresh (no cache), so both wall times cover calibration forward passes plus GPTQ. Rows gain
`peer_ppl` and `peer_seconds`; the table prints ours/peer ratios of PPL and quantize time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mpq_jax.capture import HessianCache
from mpq_jax.data.calibration import calibration_tokens, default_sources
from mpq_jax.data.paths import cache_dir
from mpq_jax.eval.peer_gptq import peer_available, peer_gptq_weights
from mpq_jax.eval.perplexity import make_windows, perplexity, wikitext2_tokens
from mpq_jax.models.checkpoint import DEFAULT_MODEL, load_model
from mpq_jax.output import atomic_write_text
from mpq_jax.quant.model import (
    average_bits_per_weight,
    iter_block_linears,
    linear_stats,
    replace_block_linears,
)
from mpq_jax.quant import gptq_model
from mpq_jax.quant.gptq_model import GptqOptions
from mpq_jax.quant.method import WalkContext
from mpq_jax.quant.rtn_model import quantize_model_rtn
from mpq_jax.fingerprint import calibration_fingerprint, model_identity

# (method, bits, group_size); bits/group of the FP row describe the model as loaded.
ROWS = (
    [("fp", 32, 0)]
    + [("rtn", bits, group) for bits in (8, 4, 3, 2) for group in (128, 64)]
    + [("gptq", bits, group) for bits in (4, 3, 2) for group in (128, 64)]
)


def quantize_row(model, method: str, bits: int, group_size: int, calibration, cache, like_peer: bool) -> dict:
    if method == "fp":
        return model.params
    if method == "rtn":
        return quantize_model_rtn(model.params, bits, group_size)
    if method == "gptq":
        options = GptqOptions(bits=bits, group_size=group_size, act_order=True, static_groups=True, propagate_quantized=like_peer)
        context = WalkContext(spec=model.spec, calibration=calibration, statistics=None if like_peer else cache)
        return gptq_model.quantize_model(model.params, options, context).params
    raise ValueError(f"unknown method {method}")


def peer_accepts(params: dict, group_size: int) -> bool:
    """llm-compressor needs the group size to divide every quantized linear's input width."""
    return all(dense["weight"].shape[1] % group_size == 0 for *_, dense in iter_block_linears(params))


def peer_row(model, calibration: dict, bits: int, group_size: int, windows) -> dict:
    """The peer's PPL (scored here, on the same windows) and its one-shot wall time."""
    tokens = np.concatenate(list(calibration.values()))
    weights, seconds = peer_gptq_weights(model.source, model.tokenizer, tokens, bits, group_size)

    def peer_linear(name, dense):
        return {**dense, "weight": jnp.asarray(weights[name], dense["weight"].dtype)}

    params = replace_block_linears(model.params, peer_linear, desc="peer weights", progress=False)
    return {"peer_ppl": perplexity(params, model.spec, windows, progress=False).ppl, "peer_seconds": seconds}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fp = [r for r in rows if r["method"] == "fp"]
    for method in sorted({r["method"] for r in rows} - {"fp"}):
        for group in sorted({r["group_size"] for r in rows if r["method"] == method}):
            pts = sorted((r["bpw"], r["ppl"]) for r in rows if r["method"] == method and r["group_size"] == group)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{method.upper()} g{group}")
    if fp:
        ax.axhline(fp[0]["ppl"], color="k", linestyle="--", label="FP (as loaded)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (block linears)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--windows", type=int, default=8, help="first K windows (0 = whole text)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", default="runs/bench_ptq.json")
    parser.add_argument("--methods", default="fp,rtn,gptq", help="comma-separated subset of fp, rtn, gptq")
    parser.add_argument("--bits", help="comma-separated bit widths to keep (default: all rows)")
    parser.add_argument("--groups", help="comma-separated group sizes to keep (default: all rows)")
    parser.add_argument("--calib-sources", default="wikipedia", help="comma-separated calibration sources")
    parser.add_argument("--calib-samples", type=int, default=64, help="windows per calibration source")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--peer", action="store_true", help="also run llm-compressor's GPTQ (compare extra)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    methods = set(args.methods.split(","))
    if args.peer and not peer_available():
        parser.error('--peer needs llm-compressor: pip install -e ".[compare]"')

    model = load_model(args.model)
    windows = make_windows(wikitext2_tokens(model.tokenizer), args.seq_len, args.windows)
    calibration = cache = None
    if "gptq" in methods:
        sources = default_sources(args.calib_sources.split(","))
        calibration = calibration_tokens(model.tokenizer, sources, args.calib_samples, args.calib_seq_len)
        cache = HessianCache(cache_dir() / "hessians", calibration_fingerprint(model_identity(model.source, "float32"), calibration))
        print(f"calibration: {args.calib_sources}, {args.calib_samples} x {args.calib_seq_len} tokens per source")
    rows = []
    header = f"{'method':<8}{'bits':>5}{'group':>7}{'bpw':>8}{'ppl':>14}{'quant_s':>9}{'total_s':>9}"
    if args.peer:
        header += f"{'peer_ppl':>14}{'peer_s':>9}{'ppl/peer':>10}{'time/peer':>10}"
        print("--peer: GPTQ rows propagate quantized block outputs and capture Hessians afresh, as the peer does")
    print(f"model: {model.source}; {len(windows)} windows of {args.seq_len} tokens")
    print(header)
    def wanted(row) -> bool:
        method, bits, group = row
        keep_bits = args.bits is None or method == "fp" or str(bits) in args.bits.split(",")
        keep_group = args.groups is None or method == "fp" or str(group) in args.groups.split(",")
        return method in methods and keep_bits and keep_group

    for method, bits, group_size in filter(wanted, ROWS):
        start = time.perf_counter()
        params = quantize_row(model, method, bits, group_size, calibration, cache, like_peer=args.peer)
        quantize_seconds = time.perf_counter() - start
        bpw = average_bits_per_weight(linear_stats(model.params, params))
        result = perplexity(params, model.spec, windows, progress=False)
        row = {
            "method": method,
            "bits": bits,
            "group_size": group_size,
            "bpw": bpw,
            "ppl": result.ppl,
            "quantize_seconds": quantize_seconds,
            "seconds": time.perf_counter() - start,
            "windows": len(windows),
            "seq_len": args.seq_len,
        }
        line = f"{method:<8}{bits:>5}{group_size:>7}{bpw:>8.3f}{result.ppl:>14.4f}{quantize_seconds:>9.1f}{row['seconds']:>9.1f}"
        if args.peer and method == "gptq" and peer_accepts(model.params, group_size):
            row.update(peer_row(model, calibration, bits, group_size, windows))
            line += (
                f"{row['peer_ppl']:>14.4f}{row['peer_seconds']:>9.1f}"
                f"{row['ppl'] / row['peer_ppl']:>10.4f}{quantize_seconds / row['peer_seconds']:>10.3f}"
            )
        elif args.peer and method == "gptq":
            line += f"{'refused':>14}"
        rows.append(row)
        print(line, flush=True)
    json_path = Path(args.json)
    atomic_write_text(json_path, json.dumps(rows, indent=2) + "\n")
    plot(rows, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
