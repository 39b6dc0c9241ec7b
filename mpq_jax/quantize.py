"""Command line entry: `python -m mpq_jax.quantize --config configs/X.yaml [--output DIR]`.

Parses the arguments and the YAML config, runs the pipeline (mpq_jax.pipeline: pre-flight
checks, load, quantize, save, evaluate, report) and prints a one-line summary. Errors a user
can cause exit with status 2 and a message naming the field or file.

Not for: the stages themselves (mpq_jax.pipeline) or benchmarks (scripts/).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from mpq_jax.config import load_config, validate
from mpq_jax.errors import MpqError
from mpq_jax.parallel import is_leader
from mpq_jax.pipeline import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpq_jax.quantize",
        description="Quantize a Llama/Qwen checkpoint, evaluate it, and save the packed model.",
    )
    parser.add_argument("--config", required=True, help="YAML run configuration (see configs/)")
    parser.add_argument("--model", help="checkpoint to quantize (default: the config's model)")
    parser.add_argument("--output", help="output folder (default: the config's output_dir)")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="several processes: process 0's address (parallel.coordinator_address)")
    parser.add_argument("--num-processes", type=int, help="with --coordinator: how many processes (parallel.num_processes)")
    parser.add_argument("--process-id", type=int, help="with --coordinator: this process's index (parallel.process_id)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint's steps at INFO
    try:
        config = load_config(args.config)
        if args.model:
            config = dataclasses.replace(config, model=args.model)
        if args.output:
            config = dataclasses.replace(config, output_dir=args.output)
        if args.coordinator or args.num_processes is not None or args.process_id is not None:
            given = dict(coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
            config = validate(dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, **given)))
        report = run(config, Path(config.output_dir))
    except MpqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not is_leader():  # process 0 saves, evaluates and reports
        return 0
    line = f"method={report['method']} bits/weight={report['bits_per_weight']:.3f}"
    if "perplexity" in report:
        line += f" wikitext2 ppl@{report['perplexity']['seq_len']}={report['perplexity']['ppl']:.4f}"
    print(line)
    print(f"report: {Path(config.output_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
