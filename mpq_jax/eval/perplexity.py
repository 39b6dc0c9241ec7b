"""WikiText-2 perplexity, computed the way GPTQ-family papers do.

The raw test text is read as one string, tokenized once without special tokens, and cut
into non-overlapping windows of `seq_len` tokens (the remainder is dropped). Each window is
scored independently; perplexity is exp of the mean next-token NLL over every predicted
token (seq_len - 1 per window), which equals the mean of transformers' `loss` over windows.
Every other perplexity set (a heldout split, a user's text file: `mpq_jax.eval.suite`) is cut
and scored the same way, by `make_windows` and `perplexity`.

Not for: downstream tasks (lm-eval-harness) or generation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mpq_jax.data.paths import wikitext2_test_path
from mpq_jax.data.text import tokenize_text
from mpq_jax.errors import ConfigError
from mpq_jax.models.decoder import final_hidden, lm_head_weight, next_token_nll
from mpq_jax.models.spec import ModelSpec
from mpq_jax.packed.params import dequantized_params

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    mean_nll: float  # nats per predicted token
    seq_len: int
    windows: int
    predicted_tokens: int
    seconds: float  # wall time of the timed pass (compilation excluded)
    tokens_per_s: float  # window tokens processed per second in the timed pass

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def resolve_wikitext2_path(path: str | Path | None = None) -> Path:
    """The WikiText-2 test text to use; raises ConfigError at once when it is missing."""
    path = Path(path) if path is not None else wikitext2_test_path()
    if not path.is_file():
        raise ConfigError(f"WikiText-2 test text not found at {path}; set MPQ_SHARED_DIR or eval.perplexity.wikitext2_path")
    return path


def wikitext2_tokens(tokenizer, path: str | Path | None = None) -> np.ndarray:
    return tokenize_text(tokenizer, resolve_wikitext2_path(path).read_text(encoding="utf-8"))


def make_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """[n, seq_len] non-overlapping windows from the start of `tokens`; the tail is dropped.

    `max_windows` = None or 0 keeps every window; otherwise the first K (a prefix, so that
    runs with the same K compare methods on the same text).
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    count = len(tokens) // seq_len
    if max_windows:
        count = min(count, max_windows)
    if count == 0:
        raise ConfigError(f"text has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}")
    return tokens[: count * seq_len].reshape(count, seq_len)


def _window_nll(params: dict, spec: ModelSpec, batch: np.ndarray) -> np.ndarray:
    tokens = jnp.asarray(batch)
    return np.asarray(next_token_nll(final_hidden(params, spec, tokens), lm_head_weight(params, spec), tokens))


def window_nll_sums(params: dict, spec: ModelSpec, windows: np.ndarray) -> np.ndarray:
    """Summed next-token NLL of each window [n, seq_len] -> float64 [n], one window per
    pass with no untimed first pass: for benchmarks that score several sets' windows in one
    go and split the sums per set (perplexity = exp(Σ nll / (n · (seq_len − 1))))."""
    params = dequantized_params(params)
    return np.array([float(np.sum(_window_nll(params, spec, windows[i : i + 1]), dtype=np.float64)) for i in range(len(windows))])


def perplexity(
    params: dict,
    spec: ModelSpec,
    windows: np.ndarray,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of the model on `windows` [n, seq_len].

    Quantized block linears are dequantized once up front (`dequantized_params`): the same
    function, and faster on CPU than unpacking codes in every forward pass.
    The first batch is run once untimed so that `seconds` and `tokens_per_s` measure the
    compiled program rather than XLA compilation. A short last batch is padded with copies of
    its last window (whose scores are dropped) so that only one shape is ever compiled.
    """
    count, seq_len = windows.shape
    batch_size = max(1, min(batch_size, count))
    params = dequantized_params(params)
    _window_nll(params, spec, windows[:batch_size])  # compile
    total_nll = 0.0
    start = time.perf_counter()
    for first in tqdm(range(0, count, batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = windows[first : first + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
        total_nll += float(np.sum(_window_nll(params, spec, batch)[:real], dtype=np.float64))
    seconds = time.perf_counter() - start
    predicted = count * (seq_len - 1)
    mean_nll = total_nll / predicted
    result = PerplexityResult(
        ppl=math.exp(mean_nll),
        mean_nll=mean_nll,
        seq_len=seq_len,
        windows=count,
        predicted_tokens=predicted,
        seconds=seconds,
        tokens_per_s=count * seq_len / seconds,
    )
    log.info("%s: ppl %.4f over %d windows of %d tokens (%.0f tokens/s)", desc, result.ppl, count, seq_len, result.tokens_per_s)
    return result
