"""Sequential, block-by-block capture of linear-layer inputs and their Hessians H = 2XXᵀ/N.

Decoder blocks are processed in order. Calibration hidden states (one array per source)
enter block i; the four distinct inputs of its seven linears (`LINEAR_INPUTS`: q/k/v share
one, gate/up share one) are captured batch by batch and folded into float32 Hessians; the
caller's `quantize_block` turns the block into quantized form; and the block's outputs —
computed with the quantized block (as GPTQ does) or with the original one — become the
hidden states for block i+1.

Peak memory: the parameters of one block being processed plus the calibration hidden states,
`sources × n_samples × seq_len × hidden_size × 4` bytes (75 MB for 64 × 512 tokens of
SmolLM2), plus one batch of activations and four [d, d] Hessians per source (d ≤ the
intermediate size). The whole model's activations are never held at once.

Not for: choosing codes (mpq_jax.quant), allocation across layers, or reading text
(mpq_jax.data.calibration).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mpq_jax.models.decoder import LINEAR_INPUTS, block_forward, decoder_block, rope_inverse_frequencies, rope_tables
from mpq_jax.models.spec import ModelSpec

log = logging.getLogger(__name__)

# hessians[source][input name] -> float32 [d, d]
SourceHessians = dict[str, dict[str, np.ndarray]]
QuantizeBlock = Callable[[int, dict, SourceHessians], dict]


def rope_for(spec: ModelSpec, seq_len: int) -> tuple[jax.Array, jax.Array]:
    return rope_tables(jnp.asarray(rope_inverse_frequencies(spec)), jnp.arange(seq_len))


@jax.jit
def embed_tokens(embedding: jax.Array, tokens: jax.Array) -> jax.Array:
    """tokens [n, T] -> hidden states [n, T, D] entering block 0."""
    return embedding[tokens]


@jax.jit
def _add_gram(hessian: jax.Array, x: jax.Array) -> jax.Array:
    """hessian + 2 XᵀX for x [..., d] flattened to [tokens, d], accumulated in float32."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return hessian + 2.0 * jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames="spec")
def _block_inputs(layer: dict, spec: ModelSpec, h: jax.Array, cos: jax.Array, sin: jax.Array) -> dict:
    return block_forward(layer, spec, h, cos, sin)[1]


def _batches(hidden: np.ndarray, batch_size: int):
    for start in range(0, hidden.shape[0], batch_size):
        yield jnp.asarray(hidden[start : start + batch_size])


def block_hessians(layer: dict, spec: ModelSpec, hidden: np.ndarray, batch_size: int = 8) -> dict[str, np.ndarray]:
    """H = 2XXᵀ/N of each linear input of a block, X over every token of hidden [n, T, D]."""
    cos, sin = rope_for(spec, hidden.shape[1])
    sums: dict[str, jax.Array] = {}
    for batch in _batches(hidden, batch_size):
        for name, x in _block_inputs(layer, spec, batch, cos, sin).items():
            if name not in sums:
                sums[name] = jnp.zeros((x.shape[-1], x.shape[-1]), jnp.float32)
            sums[name] = _add_gram(sums[name], x)
    tokens = hidden.shape[0] * hidden.shape[1]
    return {name: np.asarray(sums[name]) / tokens for name in LINEAR_INPUTS}


def block_outputs(layer: dict, spec: ModelSpec, hidden: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """hidden [n, T, D] after the block, computed batch by batch."""
    cos, sin = rope_for(spec, hidden.shape[1])
    return np.concatenate([np.asarray(decoder_block(layer, spec, batch, cos, sin)) for batch in _batches(hidden, batch_size)])


def pooled_hessians(per_source: SourceHessians, tokens_per_source: Mapping[str, int]) -> dict[str, np.ndarray]:
    """One Hessian per input over all sources: the token-weighted mean of the per-source H."""
    total = sum(tokens_per_source.values())
    return {
        name: sum(per_source[src][name] * (tokens_per_source[src] / total) for src in per_source)
        for name in LINEAR_INPUTS
    }


def sequential_quantize(
    params: dict,
    spec: ModelSpec,
    calibration: Mapping[str, np.ndarray],
    quantize_block: QuantizeBlock,
    *,
    propagate_quantized: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Quantize every block in order; returns the new params (embedding, norms, head kept).

    calibration: source name -> tokens [n, T]. `quantize_block(index, layer, hessians)` gets
    the block's original params and its Hessians per source (see `pooled_hessians` to pool
    them) and returns the block's new params. `propagate_quantized` feeds the next block
    with the quantized block's outputs (GPTQ's choice) instead of the original block's.
    """
    hidden = {src: np.asarray(embed_tokens(params["embed_tokens"]["weight"], jnp.asarray(tok))) for src, tok in calibration.items()}
    layers = []
    for index, layer in enumerate(tqdm(params["layers"], desc="blocks", unit="block", disable=not progress)):
        hessians = {src: block_hessians(layer, spec, h, batch_size) for src, h in hidden.items()}
        new_layer = quantize_block(index, layer, hessians)
        feed = new_layer if propagate_quantized else layer
        hidden = {src: block_outputs(feed, spec, h, batch_size) for src, h in hidden.items()}
        layers.append(new_layer)
        log.debug("block %d done", index)
    return {**params, "layers": layers}
