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
from jax.sharding import Mesh, PartitionSpec as P
from tqdm.auto import tqdm

from mpq_jax import parallel
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


def _moments_update(sums: tuple, x: jax.Array) -> tuple:
    """(Σ 2xxᵀ, Σ x, Σ |x|) + this batch, x [..., d] flattened to [tokens, d], in float32."""
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    gram, total, total_abs = sums
    gram = gram + 2.0 * jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST)
    return gram, total + rows.sum(axis=0), total_abs + jnp.abs(rows).sum(axis=0)


_add_moments = jax.jit(_moments_update)


def _zero_moments(d: int) -> tuple:
    return jnp.zeros((d, d), jnp.float32), jnp.zeros(d, jnp.float32), jnp.zeros(d, jnp.float32)


@functools.partial(jax.jit, static_argnames="spec")
def _block_inputs(layer: dict, spec: ModelSpec, h: jax.Array, cos: jax.Array, sin: jax.Array) -> dict:
    return block_forward(layer, spec, h, cos, sin)[1]


def _batches(hidden: np.ndarray, batch_size: int):
    for start in range(0, hidden.shape[0], batch_size):
        yield jnp.asarray(hidden[start : start + batch_size])


def block_statistics(
    layer: dict, spec: ModelSpec, hidden: np.ndarray, batch_size: int = 8, mesh: Mesh | None = None
) -> dict[str, InputStats]:
    """InputStats of each linear input of a block, X over every token of hidden [n, T, D].

    With a mesh, `hidden` is this process's share of the windows (`parallel.process_share`
    over both axes) and the statistics are those of every process's windows together: each
    device runs its own windows through the replicated block and the sums are reduced across
    the mesh (`_sharded_moments`)."""
    if mesh is not None:
        x = parallel.global_batch(hidden, mesh, parallel.AXES)
        sums = parallel.to_host(_sharded_moments(parallel.put_replicated(layer, mesh), x, *rope_for(spec, hidden.shape[1]), spec=spec, mesh=mesh, batch=_device_batch(x, mesh, batch_size)))
        tokens = x.shape[0] * x.shape[1]
        return {name: _mean_stats(*sums[name], tokens) for name in LINEAR_INPUTS}
    cos, sin = rope_for(spec, hidden.shape[1])
    sums: dict[str, tuple] = {}
    for batch in _batches(hidden, batch_size):
        for name, x in _block_inputs(layer, spec, batch, cos, sin).items():
            if name not in sums:
                sums[name] = _zero_moments(x.shape[-1])
            sums[name] = _add_moments(sums[name], x)
    tokens = hidden.shape[0] * hidden.shape[1]
    return {name: _mean_stats(*sums[name], tokens) for name in LINEAR_INPUTS}


def _device_batch(x: jax.Array, mesh: Mesh, batch_size: int) -> int:
    """Windows per scan step on each device: the largest divisor of its share <= batch_size."""
    per_device = x.shape[0] // mesh.size
    return max(b for b in range(1, min(batch_size, per_device) + 1) if per_device % b == 0)


def _local_batches(x: jax.Array, batch: int) -> jax.Array:
    return x.reshape(x.shape[0] // batch, batch, *x.shape[1:])


@functools.partial(jax.jit, static_argnames=("spec", "mesh", "batch"))
def _sharded_moments(layer, x, cos, sin, *, spec: ModelSpec, mesh: Mesh, batch: int) -> dict:
    """Σ 2xxᵀ, Σ x, Σ |x| of every linear input over all windows of x [n, T, D] (split over
    every device of the mesh). shard_map because the per-device work is explicit: each
    device scans its own windows through the replicated block, then one psum per sum adds
    the devices' [d, d] matrices (float32, so the result equals one device's within float32
    rounding of the summation order)."""

    def local(layer, x_local):
        def body(sums, xb):
            inputs = block_forward(layer, spec, xb, cos, sin)[1]
            return {name: _moments_update(sums[name], inputs[name]) for name in LINEAR_INPUTS}, None

        shapes = jax.eval_shape(lambda: block_forward(layer, spec, x_local[:batch], cos, sin)[1])
        start = {name: _zero_moments(shapes[name].shape[-1]) for name in LINEAR_INPUTS}
        sums, _ = jax.lax.scan(body, start, _local_batches(x_local, batch))
        return jax.tree_util.tree_map(lambda s: jax.lax.psum(s, parallel.AXES), sums)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(parallel.AXES)), out_specs=P(), check_vma=False)(layer, x)


@functools.partial(jax.jit, static_argnames=("spec", "mesh", "batch"))
def _sharded_outputs(layer, x, cos, sin, *, spec: ModelSpec, mesh: Mesh, batch: int) -> jax.Array:
    """The block's outputs for x [n, T, D], each device on its own windows (stays split)."""

    def local(layer, x_local):
        out = jax.lax.map(lambda xb: block_forward(layer, spec, xb, cos, sin)[0], _local_batches(x_local, batch))
        return out.reshape(x_local.shape[0], *out.shape[2:])

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(parallel.AXES)), out_specs=P(parallel.AXES), check_vma=False)(layer, x)


def _mean_stats(gram, total, total_abs, tokens: int) -> InputStats:
    """InputStats from the summed moments, with H symmetric by construction.

    XᵀX from a GEMM is symmetric only up to the summation order, which differs between CPUs
    and thread counts; GPTQ's Cholesky and the saliency of eq. 4 assume H = Hᵀ, so the two
    triangles are averaged: (G + Gᵀ) / 2 is exactly symmetric because float addition commutes.
    """
    gram = np.asarray(gram)
    return InputStats((gram + gram.T) / (2 * tokens), np.asarray(total) / tokens, np.asarray(total_abs) / tokens)


def block_outputs(layer: dict, spec: ModelSpec, hidden: np.ndarray, batch_size: int = 8, mesh: Mesh | None = None) -> np.ndarray:
    """hidden [n, T, D] after the block, computed batch by batch (with a mesh: this process's
    share, each device on its own windows, as `block_statistics`)."""
    cos, sin = rope_for(spec, hidden.shape[1])
    if mesh is not None:
        x = parallel.global_batch(hidden, mesh, parallel.AXES)
        out = _sharded_outputs(parallel.put_replicated(layer, mesh), x, cos, sin, spec=spec, mesh=mesh, batch=_device_batch(x, mesh, batch_size))
        return parallel.local_rows(out)
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
    params: dict,
    spec: ModelSpec,
    calibration: Mapping[str, np.ndarray],
    cache: HessianCache,
    *,
    batch_size: int = 8,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> None:
    """Compute and store every block's statistics with the original blocks propagating (no-op
    if complete). With a mesh, `calibration` is this process's share of the windows; every
    process computes the reduced statistics and process 0 writes them."""
    if cache.complete(len(params["layers"])):
        log.info("Hessians found in %s", cache.folder)
        return
    embedding = params["embed_tokens"]["weight"]
    hidden = {src: np.asarray(embed_tokens(embedding, jnp.asarray(tok))) for src, tok in calibration.items()}
    for index, layer in enumerate(tqdm(params["layers"], desc="Hessians", unit="block", disable=not progress)):
        stats = {src: block_statistics(layer, spec, h, batch_size, mesh) for src, h in hidden.items()}
        if parallel.is_leader():
            cache.store(index, stats)
        hidden = {src: block_outputs(layer, spec, h, batch_size, mesh) for src, h in hidden.items()}
    parallel.sync("hessian cache written")


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
    mesh: Mesh | None = None,
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

    With `mesh`, capture is data-parallel (`block_statistics`): `calibration` holds this
    process's share of the windows, every process gets the statistics of all of them and
    quantizes the block alike (the methods are deterministic), and process 0 writes the
    files.
    """
    if hessian_cache is not None:
        if propagate_quantized:
            raise ValueError("a Hessian cache holds the unquantized model's Hessians: use propagate_quantized=False")
        fill_hessian_cache(params, spec, calibration, hessian_cache, batch_size=batch_size, progress=progress, mesh=mesh)
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
                hidden = {src: block_outputs(feed, spec, h, batch_size, mesh) for src, h in hidden.items()}
    todo = range(len(layers), len(params["layers"]))
    for index in tqdm(todo, desc="blocks", unit="block", disable=not progress, initial=len(layers), total=len(params["layers"])):
        layer = params["layers"][index]
        notes_before = dict(block_notes) if block_notes is not None else {}
        if hessian_cache is not None:
            new_layer = quantize_block(index, layer, hessian_cache.load(index))
        else:
            stats = {src: block_statistics(layer, spec, h, batch_size, mesh) for src, h in hidden.items()}
            new_layer = quantize_block(index, layer, stats)
            feed = new_layer if propagate_quantized else layer
            hidden = {src: block_outputs(feed, spec, h, batch_size, mesh) for src, h in hidden.items()}
        layers.append(new_layer)
        if store is not None and parallel.is_leader():
            store.write(index, new_layer, _changed(notes_before, block_notes or {}))
    return {**params, "layers": layers}


def _changed(before: dict, after: dict) -> dict:
    """The entries of `after` that `before` lacks or held another value for (one block's notes)."""
    return {key: value for key, value in after.items() if key not in before or before[key] != value}
