"""What calibration leaves of a linear layer's inputs: the statistics types and their pooling.

`InputStats` holds, for one linear input X [tokens, d], the Hessian H = 2XᵀX/N and the
first moments every method reads (GPTQ needs H; AMLQ's AWQ scaling E|x| and its low-rank term
E[x]; TAMMP's saliency H per source). `SourceStats` keeps them per calibration source and per
linear input, because TAMMP probes each source apart; `pooled_statistics` folds the sources
into one set (token-weighted) for methods that want all the calibration text at once.

Not for: capturing them (mpq_jax.capture) or using them (mpq_jax.quant).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class InputStats:
    """What is kept of one linear input X [tokens, d] over the calibration tokens (float32)."""

    hessian: np.ndarray  # [d, d] H = 2 XᵀX / N (so E[x xᵀ] = H / 2)
    mean: np.ndarray  # [d] E[x]
    mean_abs: np.ndarray  # [d] E|x|, AWQ's activation magnitude S_x


# stats[source][linear input name] (input names: mpq_jax.models.decoder.LINEAR_INPUTS)
SourceStats = dict[str, dict[str, InputStats]]


def pooled_statistics(per_source: SourceStats, tokens_per_source: Mapping[str, int]) -> dict[str, InputStats]:
    """One InputStats per input over all sources: token-weighted means of the per-source ones
    (every field is a mean over tokens, so this equals capturing all sources at once)."""
    total = sum(tokens_per_source.values())
    inputs = next(iter(per_source.values())).keys()

    def pool(name: str, field: str) -> np.ndarray:
        return sum(getattr(per_source[src][name], field) * (tokens_per_source[src] / total) for src in per_source)

    return {name: InputStats(**{f.name: pool(name, f.name) for f in dataclasses.fields(InputStats)}) for name in inputs}


def token_counts(calibration: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Tokens per source of calibration windows {source: [n, T]}: the pooling weights."""
    return {src: int(np.asarray(t).size) for src, t in calibration.items()}
