"""WikiText-2 perplexity and throughput of a model (default: SmolLM2-135M-Instruct), optionally
beside transformers' PyTorch implementation on the same windows.

    python scripts/eval_ppl.py [--model M] [--seq-len 2048] [--max-windows K] [--batch-size B]
                               [--json PATH] [--compare-torch]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mpq_jax.eval.perplexity import make_windows, perplexity, wikitext2_tokens
from mpq_jax.models.checkpoint import DEFAULT_MODEL, load_model
from mpq_jax.output import atomic_write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="HF directory, .gguf file, or the default model's name")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=0, help="first K windows only (0 = the whole text)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="write the result here as JSON")
    parser.add_argument("--compare-torch", action="store_true", help="also run transformers' PyTorch model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    model = load_model(args.model, dtype=args.dtype)
    windows = make_windows(wikitext2_tokens(model.tokenizer), args.seq_len, args.max_windows)
    ours = perplexity(model.params, model.spec, windows, batch_size=args.batch_size, desc="mpq-jax")
    row = {"ppl": ours.ppl, "seq_len": ours.seq_len, "windows": ours.windows, "tokens_per_s": ours.tokens_per_s}
    print(f"model: {model.source}")
    print(f"{'implementation':<22}{'ppl':>12}{'tokens/s':>12}")
    print(f"{'mpq-jax (' + args.dtype + ')':<22}{ours.ppl:>12.4f}{ours.tokens_per_s:>12.1f}")
    if args.compare_torch:
        import torch

        from mpq_jax.eval.torch_reference import load_torch_model, torch_perplexity

        torch_ppl, torch_tps = torch_perplexity(load_torch_model(model.source), windows)
        print(f"{'transformers (torch)':<22}{torch_ppl:>12.4f}{torch_tps:>12.1f}")
        print(f"relative ppl difference: {abs(ours.ppl - torch_ppl) / torch_ppl:.2e}; "
              f"throughput ratio mpq-jax/torch: {ours.tokens_per_s / torch_tps:.2f} (torch threads: {torch.get_num_threads()})")
        row.update(torch_ppl=torch_ppl, torch_tokens_per_s=torch_tps)
    if args.json:
        atomic_write_text(args.json, json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
