"""Sequential, block-by-block capture of linear-layer inputs and their statistics.

Decoder blocks are processed in order. Calibration hidden states (one array per source)
enter block i; the four distinct inputs of its seven linears (`LINEAR_INPUTS`: q/k/v share
one, gate/up share one) are captured batch by batch and folded into `InputStats` (mpq_jax.stats): the
float32 Hessian H = 2XXᵀ/N, the mean E[x] and the mean magnitude E|x| per input channel
(GPTQ needs H; AMLQ's AWQ scaling needs E|x| and its low-rank term E[x]); the
caller's `quantize_block` turns the block into quantized form; and the block's outputs —
computed with the quantized block (as GPTQ does) or with the original one — become the
hidden states for block i+1.

Resume (`sequential_quantize(resume_dir=...)`): each finished block is written once, to its
own folder `resume_dir/block_NNN/` (`mpq_jax.block_store.BlockStore`: the block's params,
its `block_notes` entries and the run fingerprint, atomically), and never rewritten. The
hidden states entering the next block are not stored: a resumed run recomputes them from the
calibration tokens through the embedding and the finished blocks (the quantized ones with
`propagate_quantized`, the original ones without), with the same jitted functions on the
same inputs as the uninterrupted run, so the result is bit-identical. Writing every finished
block and the hidden states after every block instead costs quadratic I/O (~100 GB for a
32-block 7B model); recomputing costs one forward pass through the finished blocks, once.

Peak memory: the parameters of one block being processed plus the calibration hidden states,
`sources × n_samples × seq_len × hidden_size × 4` bytes (75 MB for 64 × 512 tokens of
SmolLM2), plus one batch of activations and four [d, d] Hessians per source (d ≤ the
intermediate size). The whole model's activations are never held at once.

Not for: choosing codes (mpq_jax.quant), allocation across layers, or reading text
(mpq_jax.data.calibration).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mpq_jax.block_store import BlockStore
from mpq_jax.models.decoder import LINEAR_INPUTS, block_forward, decoder_block, rope_inverse_frequencies, rope_tables
from mpq_jax.models.spec import ModelSpec
from mpq_jax.stats import InputStats, SourceStats

log = logging.getLogger(__name__)


QuantizeBlock = Callable[[int, dict, SourceStats], dict]


def rope_for(spec: ModelSpec, seq_len: int) -> tuple[jax.Array, jax.Array]:
    return rope_tables(jnp.asarray(rope_inverse_frequencies(spec)), jnp.arange(seq_len))


@jax.jit
def embed_tokens(embedding: jax.Array, tokens: jax.Array) -> jax.Array:
    """tokens [n, T] -> hidden states [n, T, D] entering block 0."""
    return embedding[tokens]


@jax.jit
def _add_moments(sums: tuple, x: jax.Array) -> tuple:
    """(Σ 2xxᵀ, Σ x, Σ |x|) + this batch, x [..., d] flattened to [tokens, d], in float32."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    gram, total, total_abs = sums
    gram = gram + 2.0 * jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
    return gram, total + rows.sum(axis=0), total_abs + jnp.abs(rows).sum(axis=0)


@functools.partial(jax.jit, static_argnames="spec")
def _block_inputs(layer: dict, spec: ModelSpec, h: jax.Array, cos: jax.Array, sin: jax.Array) -> dict:
    return block_forward(layer, spec, h, cos, sin)[1]


def _batches(hidden: np.ndarray, batch_size: int):
    for start in range(0, hidden.shape[0], batch_size):
        yield jnp.asarray(hidden[start : start + batch_size])


def block_statistics(layer: dict, spec: ModelSpec, hidden: np.ndarray, batch_size: int = 8) -> dict[str, InputStats]:
    """InputStats of each linear input of a block, X over every token of hidden [n, T, D]."""
    cos, sin = rope_for(spec, hidden.shape[1])
    sums: dict[str, tuple] = {}
    for batch in _batches(hidden, batch_size):
        for name, x in _block_inputs(layer, spec, batch, cos, sin).items():
            if name not in sums:
                d = x.shape[-1]
                sums[name] = (jnp.zeros((d, d), jnp.float32), jnp.zeros(d, jnp.float32), jnp.zeros(d, jnp.float32))
            sums[name] = _add_moments(sums[name], x)
    tokens = hidden.shape[0] * hidden.shape[1]
    return {name: _mean_stats(*sums[name], tokens) for name in LINEAR_INPUTS}


def _mean_stats(gram, total, total_abs, tokens: int) -> InputStats:
    """InputStats from the summed moments, with H symmetric by construction.

    XᵀX from a GEMM is symmetric only up to the summation order, which differs between CPUs
    and thread counts; GPTQ's Cholesky and the saliency of eq. 4 assume H = Hᵀ, so the two
    triangles are averaged: (G + Gᵀ) / 2 is exactly symmetric because float addition commutes.
    """
    gram = np.asarray(gram)
    return InputStats((gram + gram.T) / (2 * tokens), np.asarray(total) / tokens, np.asarray(total_abs) / tokens)


def block_outputs(layer: dict, spec: ModelSpec, hidden: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """hidden [n, T, D] after the block, computed batch by batch."""
    cos, sin = rope_for(spec, hidden.shape[1])
    return np.concatenate([np.asarray(decoder_block(layer, spec, batch, cos, sin)) for batch in _batches(hidden, batch_size)])


class HessianCache:
    """Input statistics (Hessians and moments) of the unquantized model, block by block, on
    disk under a fingerprint.

    With the original block's outputs feeding the next block (`propagate_quantized=False`),
    every block's statistics depend only on the model and the calibration tokens, not on how
    earlier blocks were quantized: computed once, they serve every later setting (bits,
    groups, methods) with no forward pass. Layout: `<root>/<fingerprint>/stats_NNN.npz`, one
    array per (source, linear input, field), each file written to a temporary name and
    renamed. (Folders from before the moments were kept hold `block_NNN.npz` files with
    Hessians only; they are ignored and refilled.)
    """

    def __init__(self, root: str | Path, fingerprint: str):
        self.folder = Path(root) / fingerprint

    def path(self, index: int) -> Path:
        return self.folder / f"stats_{index:03d}.npz"

    def complete(self, num_layers: int) -> bool:
        return all(self.path(i).is_file() for i in range(num_layers))

    def store(self, index: int, stats: SourceStats) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {
            f"{src}/{name}/{field.name}": getattr(st, field.name)
            for src, per_input in stats.items()
            for name, st in per_input.items()
            for field in dataclasses.fields(InputStats)
        }
        tmp = self.path(index).with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(self.path(index))

    def load(self, index: int) -> SourceStats:
        fields: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        with np.load(self.path(index)) as data:
            for key in data.files:
                src, name, field = key.rsplit("/", 2)
                fields.setdefault((src, name), {})[field] = data[key]
        stats: SourceStats = {}
        for (src, name), values in fields.items():
            stats.setdefault(src, {})[name] = InputStats(**values)
        return stats


def fill_hessian_cache(
    params: dict, spec: ModelSpec, calibration: Mapping[str, np.ndarray], cache: HessianCache, *, batch_size: int = 8, progress: bool = True
) -> None:
    """Compute and store every block's statistics with the original blocks propagating (no-op if complete)."""
    if cache.complete(len(params["layers"])):
        log.info("Hessians found in %s", cache.folder)
        return
    embedding = params["embed_tokens"]["weight"]
    hidden = {src: np.asarray(embed_tokens(embedding, jnp.asarray(tok))) for src, tok in calibration.items()}
    for index, layer in enumerate(tqdm(params["layers"], desc="Hessians", unit="block", disable=not progress)):
        cache.store(index, {src: block_statistics(layer, spec, h, batch_size) for src, h in hidden.items()})
        hidden = {src: block_outputs(layer, spec, h, batch_size) for src, h in hidden.items()}


def sequential_quantize(
    params: dict,
    spec: ModelSpec,
    calibration: Mapping[str, np.ndarray],
    quantize_block: QuantizeBlock,
    *,
    propagate_quantized: bool = True,
    batch_size: int = 8,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    fingerprint: str = "",
    hessian_cache: HessianCache | None = None,
    block_notes: dict | None = None,
) -> dict:
    """Quantize every block in order; returns the new params (embedding, norms, head kept).

    calibration: source name -> tokens [n, T]. `quantize_block(index, layer, hessians)` gets
    the block's original params and its input statistics per source (see `mpq_jax.stats.pooled_statistics`
    to pool them) and returns the block's new params. `propagate_quantized` feeds the next block
    with the quantized block's outputs (GPTQ's choice) instead of the original block's.

    With `resume_dir`, every finished block is written once, to `resume_dir/block_NNN/`
    (`mpq_jax.block_store.BlockStore`, atomically), with its `block_notes` entries and
    `fingerprint` (which the caller derives from model, calibration and config); earlier
    blocks are never rewritten and the hidden states are not stored. A run started again
    with the same fingerprint loads the finished blocks, recomputes the hidden states entering
    the next block by running the calibration tokens through the embedding and the finished
    blocks (quantized ones with `propagate_quantized`, the original ones otherwise; with
    `hessian_cache` none are needed), and continues: the result is bit-identical to an
    uninterrupted run's. A different fingerprint starts over; an unreadable block is moved
    aside and the run continues after the last good block before it.

    With `hessian_cache` (only with `propagate_quantized=False`), Hessians come from the
    cache (statistics too), filled first if incomplete, and no forward pass runs while
    quantizing.

    `block_notes` is a JSON-serializable dict that `quantize_block` may add to (e.g. per-layer
    losses for the report); the entries a block adds or changes are checkpointed with that
    block and, on resume, refilled from the finished blocks.
    """
    if hessian_cache is not None:
        if propagate_quantized:
            raise ValueError("a Hessian cache holds the unquantized model's Hessians: use propagate_quantized=False")
        fill_hessian_cache(params, spec, calibration, hessian_cache, batch_size=batch_size, progress=progress)
    store = None if resume_dir is None else BlockStore(resume_dir, fingerprint)
    layers = [] if store is None else store.finished()
    if block_notes is not None and store is not None:
        block_notes.update(store.notes())
    if layers:
        log.info("resuming after block %d from %s", len(layers) - 1, resume_dir)
    hidden = {}
    if hessian_cache is None:
        embedding = params["embed_tokens"]["weight"]
        hidden = {src: np.asarray(embed_tokens(embedding, jnp.asarray(tok))) for src, tok in calibration.items()}
        if layers and len(layers) < len(params["layers"]):  # none are needed once every block is done
            log.info("recomputing hidden states through %d finished blocks", len(layers))
            for index, done in enumerate(layers):
                feed = done if propagate_quantized else params["layers"][index]
                hidden = {src: block_outputs(feed, spec, h, batch_size) for src, h in hidden.items()}
    todo = range(len(layers), len(params["layers"]))
    for index in tqdm(todo, desc="blocks", unit="block", disable=not progress, initial=len(layers), total=len(params["layers"])):
        layer = params["layers"][index]
        notes_before = dict(block_notes) if block_notes is not None else {}
        if hessian_cache is not None:
            new_layer = quantize_block(index, layer, hessian_cache.load(index))
        else:
            stats = {src: block_statistics(layer, spec, h, batch_size) for src, h in hidden.items()}
            new_layer = quantize_block(index, layer, stats)
            feed = new_layer if propagate_quantized else layer
            hidden = {src: block_outputs(feed, spec, h, batch_size) for src, h in hidden.items()}
        layers.append(new_layer)
        if store is not None:
            store.write(index, new_layer, _changed(notes_before, block_notes or {}))
    return {**params, "layers": layers}


def _changed(before: dict, after: dict) -> dict:
    """The entries of `after` that `before` lacks or held another value for (one block's notes)."""
    return {key: value for key, value in after.items() if key not in before or before[key] != value}
