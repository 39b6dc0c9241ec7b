"""transformers' PyTorch implementation as the reference for parity tests and benchmarks.

Loads the same checkpoint mpq-jax loads (a HF directory or a GGUF file through
`gguf_file=`), and scores perplexity windows exactly as `perplexity.py` defines them, so
the two numbers can be compared side by side. Needs the `test` extra (torch).

Not for: anything on mpq-jax's own code path.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mpq_jax.errors import ConfigError


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ConfigError('PyTorch is needed for the transformers reference: pip install -e ".[test]"') from exc
    return torch


def load_torch_model(path: str | Path):
    """transformers' float32 CausalLM for a HF directory or a .gguf file, in eval mode."""
    _torch()
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="float32")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    return model.eval()


def lm_eval_hf_model(path: str | Path, batch_size: int = 16):
    """lm-eval's own `hf` model (transformers, float32, CPU) on a HF directory or a .gguf file:
    the reference our lm-eval model is compared with."""
    _torch()
    from lm_eval.models.huggingface import HFLM

    path = Path(path)
    where = {"pretrained": str(path)} if path.is_dir() else {"pretrained": str(path.parent), "gguf_file": path.name}
    return HFLM(**where, dtype="float32", batch_size=batch_size, device="cpu")


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    """tokens: [B, T] -> float32 logits [B, T, V]."""
    torch = _torch()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens, dtype=np.int64))).logits.float().numpy()


def torch_perplexity(model, windows: np.ndarray) -> tuple[float, float]:
    """(perplexity, tokens/s) of windows [n, seq_len], one window per forward pass."""
    torch = _torch()
    total, start = 0.0, time.perf_counter()
    with torch.no_grad():
        for window in windows:
            ids = torch.as_tensor(np.asarray(window, dtype=np.int64))[None]
            total += float(model(ids, labels=ids).loss) * (len(window) - 1)
    seconds = time.perf_counter() - start
    return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))), windows.size / seconds
