"""A maintained PyTorch GPTQ (llm-compressor's `GPTQModifier`) as the peer for benchmarks.

`peer_gptq_weights` runs llm-compressor's one-shot GPTQ on transformers' PyTorch copy of
the same checkpoint, calibrated on exactly the token windows mpq-jax uses, with the same
scheme (asymmetric integer codes, one scale and zero per group of input columns, act-order
without a stored group index: llm-compressor's `actorder="static"`, damping as a fraction
of mean(diag H), lazy blocks of 128 columns). It returns the peer's fake-quantized weights
of the seven block linears, named as in mpq-jax's params tree, so the caller can score them
with mpq-jax's own perplexity on the same windows: any difference in the table then comes
from the quantizer alone, not from two evaluation paths.

Needs the `compare` extra (llmcompressor pins its own transformers range).

Not for: anything on mpq-jax's own code path.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from mpq_jax.errors import ConfigError
from mpq_jax.eval.torch_reference import load_torch_model
from mpq_jax.models.spec import BLOCK_LINEARS


def peer_available() -> bool:
    try:
        import llmcompressor  # noqa: F401
    except ImportError:
        return False
    return True


def _require_peer():
    if not peer_available():
        raise ConfigError('the GPTQ peer needs llm-compressor: pip install -e ".[compare]"')


def gptq_recipe(bits: int, group_size: int, percdamp: float, block_size: int = 128):
    """llm-compressor's GPTQModifier for asymmetric `bits`-bit codes in groups of `group_size`."""
    _require_peer()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group_size, actorder="static"
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return GPTQModifier(
        config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=block_size, dampening_frac=percdamp
    )


def peer_gptq_weights(
    model_path: str | Path,
    tokenizer,
    calibration: np.ndarray,
    bits: int,
    group_size: int,
    percdamp: float = 0.01,
) -> tuple[dict[str, np.ndarray], float]:
    """({"layers.i.module.name": fake-quantized float32 weight [out, in]}, wall seconds of the one-shot run).

    `calibration` is [n, T] token ids; every window is one calibration sample, unshuffled.
    `tokenizer` is only handed over because llm-compressor insists on one with a dataset.
    The seconds cover llm-compressor's whole one-shot run (its calibration forward passes
    and GPTQ), not loading the model.
    """
    _require_peer()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    model = load_torch_model(model_path)
    config_dir = tempfile.mkdtemp(prefix="mpq-peer-config-")
    # llm-compressor re-reads the config from `name_or_path`, which a GGUF file is not, and
    # refuses a GGUF-tagged config; the weights in memory are already dequantized float32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(config_dir)
    model.config.name_or_path = config_dir
    calibration = np.asarray(calibration, dtype=np.int64)
    dataset = Dataset.from_dict(
        {"input_ids": calibration.tolist(), "attention_mask": np.ones_like(calibration).tolist()}
    )
    start = time.perf_counter()
    try:
        with torch.no_grad():
            oneshot(
                model=model,
                tokenizer=tokenizer,
                dataset=dataset,
                recipe=gptq_recipe(bits, group_size, percdamp),
                num_calibration_samples=calibration.shape[0],
                max_seq_length=calibration.shape[1],
                shuffle_calibration_samples=False,
                pipeline="sequential",
            )
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)
    seconds = time.perf_counter() - start
    weights = {}
    for index, layer in enumerate(model.model.layers):
        for module, name in BLOCK_LINEARS:
            linear = getattr(getattr(layer, module), name)
            weights[f"layers.{index}.{module}.{name}"] = linear.weight.detach().float().numpy().copy()
    return weights, seconds
