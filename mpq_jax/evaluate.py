"""Command line: evaluate a saved model with a config's `eval:` section.

    python -m mpq_jax.evaluate --model runs/x/model --config configs/X.yaml [--output DIR]
        [--fp-model SOURCE | --no-fp]

Scores the model (a packed mpq-jax folder, or any checkpoint `load_model` reads) on every
perplexity set and lm-eval task the config lists, and, unless --no-fp, the unquantized model
the packed folder was made from (its manifest names it; --fp-model overrides) the same way,
so the report shows what quantization kept. Writes `eval_report.json`, `eval_report.md` and
`capabilities.png` into --output (default: the run folder holding the packed model).

Not for: quantizing (`mpq_jax.quantize`, which runs the same evaluation after quantizing).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mpq_jax.config import load_config
from mpq_jax.errors import ConfigError, MpqError
from mpq_jax.eval.suite import check_inputs, compare, evaluate, fp_baseline
from mpq_jax.fingerprint import model_identity
from mpq_jax.models.checkpoint import load_model
from mpq_jax.output import atomic_write_text
from mpq_jax.packed.io import MANIFEST_FILE, read_metadata
from mpq_jax.preflight import check_model, check_output_dir, check_tokenizer, evaluates_text
from mpq_jax.report import evaluation_markdown, plot_capabilities

log = logging.getLogger("mpq_jax")


def fp_source(model_path: Path, override: str | None) -> str | None:
    """The unquantized model to compare with: --fp-model, else the packed folder's source."""
    if override:
        return override
    if (model_path / MANIFEST_FILE).is_file():
        return read_metadata(model_path).get("source")
    return None


def output_folder(model_path: Path, output: Path | None) -> Path:
    if output is not None:
        return output
    return model_path.parent if (model_path / MANIFEST_FILE).is_file() else Path("runs") / f"eval-{model_path.stem}"


def run(model_path: Path, config_path: Path, output: Path | None, fp_model: str | None, with_fp: bool) -> dict:
    config = load_config(config_path)
    # Pre-flight: every input and the output folder, before any model is loaded.
    folder = output_folder(model_path, output)
    check_output_dir(folder, "--output")
    checked = check_model(str(model_path), "--model")
    if evaluates_text(config):
        check_tokenizer(checked, "evaluation (eval.perplexity / eval.tasks)")
    check_inputs(config.eval)
    fp_checked = None
    if with_fp:
        source = fp_source(checked.path, fp_model)
        if source is None:
            raise ConfigError(f"--model {model_path}: not a packed mpq-jax folder, so give --fp-model SOURCE or --no-fp")
        try:
            fp_checked = check_model(source, "--fp-model" if fp_model else f"the FP model named by {model_path}")
        except MpqError as exc:
            raise ConfigError(f"{exc}; give --fp-model SOURCE or --no-fp") from None
    model = load_model(checked.path, dtype=config.dtype)
    evaluation = evaluate(model.params, model, config.eval, label="model")
    fp = None
    if fp_checked is not None:
        fp_model_loaded = load_model(fp_checked.path, dtype=config.dtype)
        fp = fp_baseline(fp_model_loaded, config.eval, model_identity(fp_checked.path, config.dtype))
    report = {"model": str(model_path), "config": str(config_path), "eval": compare(evaluation, fp)}
    atomic_write_text(folder / "eval_report.json", json.dumps(report, indent=2, default=str) + "\n")
    markdown = ["# mpq-jax evaluation", "", f"- model: `{model_path}`", f"- config: `{config_path}`"]
    atomic_write_text(folder / "eval_report.md", "\n".join(markdown + evaluation_markdown(report["eval"])) + "\n")
    if report["eval"]["capabilities"] and fp is not None:
        plot_capabilities(report["eval"]["capabilities"], folder / "capabilities.png", f"{model_path}: capabilities retained")
    report["output"] = str(folder)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpq_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="packed mpq-jax folder (or a HF directory, .gguf, default model name)")
    parser.add_argument("--config", required=True, help="YAML config whose eval: section says what to run")
    parser.add_argument("--output", help="folder for eval_report.* (default: the packed model's run folder)")
    fp_group = parser.add_mutually_exclusive_group()
    fp_group.add_argument("--fp-model", help="unquantized model to compare with (default: the packed model's source)")
    fp_group.add_argument("--no-fp", action="store_true", help="skip the FP baseline")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        report = run(Path(args.model), Path(args.config), Path(args.output) if args.output else None, args.fp_model, not args.no_fp)
    except MpqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for row in report["eval"]["perplexity"]:
        print(f"ppl {row['set']}: {row['quantized']:.4f}" + (f" (FP {row['fp']:.4f})" if row["fp"] else ""))
    for row in report["eval"]["capabilities"]:
        if row["tasks"]:
            retained = f", retained {row['retained']:.3f}" if row["retained"] is not None else ""
            print(f"{row['dimension']}: {row['quantized']:.4f}{retained}")
    print(f"report: {Path(report['output']) / 'eval_report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
