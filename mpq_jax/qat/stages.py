"""The two QAT stages (`../shared/papers/tammp.md` §4.3, EfficientQAT's Block-AP and E2E-QP),
each a walk over a packed model with the same call shape:

    block_stage(fp_params, packed_params, spec, tokens, qat, checkpoints_root, fingerprint)
    e2e_stage(packed_params, spec, tokens, qat, checkpoints_root, fingerprint)
        -> (packed params, StageNote)

Stage 1, block by block: block i's linears in trainable form (master weights through the
STE, scales, zeros, dense columns, low-rank factors, biases; norms frozen) are trained for
`epochs` over the windows to minimise  mean (block_q(x_q) - block_fp(x_fp))²,  where x_fp are
the FP model's hidden states entering block i and x_q the quantized model's (the trained and
re-packed blocks before it). AdamW, one learning rate for weights and one for quantization
parameters, each decaying by cosine to lr/20 over the block. The trained block is packed,
written once (`mpq_jax.block_store.BlockStore`), and its outputs become the next x_q.

Stage 2, the whole model at once: next-token loss on the windows, only the trainable set
moving (`paper`: 16-bit columns and scales; `step_sizes`: scales), gradients accumulated
over `effective_batch / batch_size` passes (optax.MultiSteps), clipped by global norm,
warmup then cosine. Each block is rematerialised (jax.checkpoint), so the backward pass
holds one block's activations at a time plus every block's input.

Memory per device: README "Meshes and hosts" (formulas for one device and for a mesh, checked
against `scripts/bench_scale.py`). In short: stage 1 holds one block's master weights and Adam
state, the hidden states of the windows on the host; stage 2 the model's codes (uint8) and
zeros, the trainable set's state, every block's input (remat) and one block's activations.

Meshes (`placement`, mpq_jax.parallel.Placement): both steps are jitted with the partition
rules' shardings in and out, batches split over the data axis, each process training on its
share of the windows; without one, everything runs on the default device as before.

Data order: windows in a permutation per epoch drawn from the state's key
(`mpq_jax.qat.loop.epoch_order`); whole batches only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from mpq_jax import parallel
from mpq_jax.block_store import BlockStore
from mpq_jax.capture import block_outputs, embed_tokens, rope_for
from mpq_jax.config import QatConfig
from mpq_jax.models.decoder import block_forward, decoder_block, lm_head_weight, rms_norm, target_log_probs
from mpq_jax.models.spec import ModelSpec
from mpq_jax.parallel import Placement
from mpq_jax.qat.loop import TrainCheckpoints, TrainState, batch_indices, run_steps, train_step
from mpq_jax.qat.trainable import (
    ROLE_BIAS,
    ROLE_DENSE,
    ROLE_LOWRANK,
    ROLE_SCALE,
    ROLE_WEIGHT,
    ROLE_ZERO,
    combine,
    count_parameters,
    leaf_roles,
    packed_params,
    partition,
    trainable_mask,
    trainable_params,
)

log = logging.getLogger(__name__)

BLOCK_ROLES = frozenset({ROLE_WEIGHT, ROLE_DENSE, ROLE_SCALE, ROLE_ZERO, ROLE_LOWRANK, ROLE_BIAS})
E2E_ROLES = {"paper": frozenset({ROLE_DENSE, ROLE_SCALE}), "step_sizes": frozenset({ROLE_SCALE})}
QUANT_ROLES = frozenset({ROLE_SCALE, ROLE_ZERO})  # trained at the quantization-parameter rate
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class StageNote:
    """What a stage did: its loss per step (per block for stage 1), steps, trained
    parameters and wall time."""

    stage: str  # "block" or "e2e"
    losses: dict[str, list[float]]  # curve name ("block 3", "e2e") -> loss of each step
    trained_parameters: int  # in the trainable set (per block summed, for stage 1)
    seconds: float
    # bytes the fullest device held while training (stage 1: the largest block trained in
    # this run): parameters (trainable and frozen) and optimizer state, from the addressable
    # shards; 0 when every block was already finished
    param_bytes_per_device: int = 0
    opt_bytes_per_device: int = 0

    def to_json(self) -> dict:
        first = {name: curve[0] for name, curve in self.losses.items() if curve}
        last = {name: curve[-1] for name, curve in self.losses.items() if curve}
        return {
            "stage": self.stage,
            "trained_parameters": self.trained_parameters,
            "seconds": self.seconds,
            "param_bytes_per_device": self.param_bytes_per_device,
            "opt_bytes_per_device": self.opt_bytes_per_device,
            "first_loss": first,
            "last_loss": last,
            "losses": self.losses,
        }


def _labels(params):
    """optax.multi_transform labels: each trainable leaf's learning-rate group."""
    return jax.tree_util.tree_map(lambda role: "quant" if role in QUANT_ROLES else "weight", leaf_roles(params))


def block_optimizer(qat: QatConfig, steps: int) -> optax.GradientTransformation:
    def adamw(lr: float):
        return optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=1 / 20), weight_decay=0.0)

    return optax.multi_transform({"weight": adamw(qat.block.lr_weight), "quant": adamw(qat.block.lr_quant)}, _labels)


def e2e_optimizer(qat: QatConfig, micro_steps: int) -> optax.GradientTransformation:
    e2e = qat.e2e
    accumulate = e2e.effective_batch // e2e.batch_size
    updates = max(micro_steps // accumulate, 1)
    warmup = int(round(e2e.warmup * updates))

    def adamw(lr: float):
        schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, max(updates, warmup + 1), lr / 20)
        return optax.adamw(schedule, weight_decay=0.0)

    inner = optax.multi_transform({"weight": adamw(e2e.lr_weight), "quant": adamw(e2e.lr)}, _labels)
    if e2e.clip_norm > 0:
        inner = optax.chain(optax.clip_by_global_norm(e2e.clip_norm), inner)
    return optax.MultiSteps(inner, every_k_schedule=accumulate).gradient_transformation()


def _block_loss(trainable, frozen, x, target, cos, sin, *, spec: ModelSpec):
    out = block_forward(combine(trainable, frozen), spec, x, cos, sin)[0]
    return jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("spec", "optimizer"))
def _block_step(state, frozen, x, target, cos, sin, *, spec, optimizer):
    return train_step(functools.partial(_block_loss, spec=spec), optimizer, state, frozen, x, target, cos, sin)


def _e2e_loss(trainable, frozen, tokens, cos, sin, *, spec: ModelSpec):
    """Mean next-token negative log-likelihood of tokens [B, T], blocks rematerialised."""
    params = combine(trainable, frozen)
    block = jax.checkpoint(lambda layer, h: block_forward(layer, spec, h, cos, sin)[0])
    h = params["embed_tokens"]["weight"][tokens]
    for layer in params["layers"]:
        h = block(layer, h)
    h = rms_norm(h, params["norm"]["weight"], spec.rms_norm_eps)
    log_probs, _ = target_log_probs(h[:, :-1], lm_head_weight(params, spec), tokens[:, 1:])
    return -jnp.mean(log_probs)


@functools.partial(jax.jit, static_argnames=("spec", "optimizer"))
def _e2e_step(state, frozen, tokens, cos, sin, *, spec, optimizer):
    return train_step(functools.partial(_e2e_loss, spec=spec), optimizer, state, frozen, tokens, cos, sin)


_PROGRAMS: dict = {}


def _sharded_step(loss_fn, key: tuple, optimizer, state_shardings, frozen_shardings, data_sharding, n_data: int, n_replicated: int, mesh):
    """train_step under jit with the placement's shardings in and out (the state keeps its
    layout from step to step, so orbax saves and restores it as it is). One program per
    (loss, structure, shardings), kept in `_PROGRAMS`."""
    flat_state, flat_frozen = jax.tree_util.tree_flatten(state_shardings), jax.tree_util.tree_flatten(frozen_shardings)
    cache_key = (key, optimizer, flat_state[1], tuple(flat_state[0]), flat_frozen[1], tuple(flat_frozen[0]), data_sharding)
    if cache_key not in _PROGRAMS:
        rep = NamedSharding(mesh, PartitionSpec())
        _PROGRAMS[cache_key] = jax.jit(
            functools.partial(train_step, loss_fn, optimizer),
            in_shardings=(state_shardings, frozen_shardings, *([data_sharding] * n_data), *([rep] * n_replicated)),
            out_shardings=state_shardings,
        )
    return _PROGRAMS[cache_key]


def placed_state(moving, frozen, optimizer, seed: int, steps: int, place: Placement):
    """The TrainState and the frozen half as the placement holds them, and their per-device bytes."""
    state = place.put(TrainState.create(moving, optimizer, seed, steps))
    frozen = place.put(frozen)
    params_bytes = parallel.device_bytes(state.params) + parallel.device_bytes(frozen)
    return state, frozen, params_bytes, parallel.device_bytes(state.opt_state)


def block_stage(
    fp_params: dict,
    packed: dict,
    spec: ModelSpec,
    tokens: np.ndarray,
    qat: QatConfig,
    checkpoints_root: Path,
    fingerprint: str,
    *,
    progress: bool = True,
    placement: Placement | None = None,
) -> tuple[dict, StageNote]:
    """Stage 1 (module docstring). tokens: int [n, T] training windows — with a placement on
    a mesh of several processes, this process's share of them (`Placement.share`); the
    windows of every share together are the samples trained on."""
    start_time = time.perf_counter()
    cfg = qat.block
    dtype = DTYPES[qat.dtype]
    place = placement or Placement()
    share = place.share
    tokens = np.asarray(tokens[: cfg.samples // share[1]])
    n = tokens.shape[0] * share[1]
    steps = cfg.epochs * (n // cfg.batch_size)
    optimizer = block_optimizer(qat, steps)
    memory = (0, 0)
    store = BlockStore(checkpoints_root / "blocks", fingerprint)
    finished = store.finished()
    notes = store.notes()
    cos, sin = rope_for(spec, tokens.shape[1])
    x_fp = np.asarray(embed_tokens(fp_params["embed_tokens"]["weight"], jnp.asarray(tokens)))
    x_q = np.asarray(embed_tokens(packed["embed_tokens"]["weight"], jnp.asarray(tokens)))
    if len(finished) == spec.num_layers:
        return {**packed, "layers": list(finished)}, _block_note(notes, spec, start_time)
    if finished:
        log.info("stage 1: recomputing hidden states through %d finished blocks", len(finished))
    for index, layer in enumerate(finished):
        x_fp = block_outputs(fp_params["layers"][index], spec, x_fp)
        x_q = block_outputs(layer, spec, x_q)
    layers = list(finished)
    todo = range(len(finished), spec.num_layers)
    for index in tqdm(todo, desc="QAT blocks", unit="block", disable=not progress, initial=len(finished), total=spec.num_layers):
        target = block_outputs(fp_params["layers"][index], spec, x_fp)
        trainable = trainable_params(packed["layers"][index], dtype, fp_params=fp_params["layers"][index])
        moving, frozen_host = partition(trainable, trainable_mask(trainable, BLOCK_ROLES))
        state, frozen, *block_memory = placed_state(moving, frozen_host, optimizer, qat.seed + index, steps, place)
        memory = max(memory, tuple(block_memory))
        checkpoints = TrainCheckpoints(checkpoints_root / "block_state" / f"{index:03d}", fingerprint, qat.checkpoint_every)
        state = checkpoints.restore(state) or state
        key = parallel.to_host(state.key)
        x_in = x_q.astype(jnp.dtype(dtype)) if x_q.dtype != jnp.dtype(dtype) else x_q
        step = step_program("block", spec, optimizer, state, frozen, place)
        rope = place.replicated((cos, sin))

        def step_fn(state: TrainState, at: int) -> TrainState:
            batch = batch_indices(key, at, n, cfg.batch_size, share)
            return step(state, frozen, place.batch(x_in[batch]), place.batch(target[batch]), *rope)

        state = run_steps(state, step_fn, steps, checkpoints, desc=f"block {index}", progress=progress)
        trained = parallel.to_host(state.params)
        new_layer = packed_params(packed["layers"][index], combine(trained, frozen_host))
        count = count_parameters(trained)
        losses = [float(v) for v in parallel.to_host(state.losses)]
        notes[str(index)] = {"losses": losses, "trained_parameters": count}
        if parallel.is_leader():
            store.write(index, new_layer, {str(index): notes[str(index)]})
        checkpoints.remove()
        layers.append(new_layer)
        x_q = block_outputs(new_layer, spec, x_q)
        x_fp = target
        _release_programs_of(packed["layers"], index)
        log.info("stage 1 block %d: loss %.4g -> %.4g over %d steps", index, losses[0], losses[-1], steps)
    return {**packed, "layers": layers}, _block_note(notes, spec, start_time, memory)


def step_program(stage: str, spec: ModelSpec, optimizer, state: TrainState, frozen, place: Placement):
    """The jitted step of `stage` ("block": step(state, frozen, x, target, cos, sin); "e2e":
    step(state, frozen, tokens, cos, sin)) for this placement."""
    jitted, loss, n_data = {"block": (_block_step, _block_loss, 2), "e2e": (_e2e_step, _e2e_loss, 1)}[stage]
    if place.mesh is None:
        return functools.partial(jitted, spec=spec, optimizer=optimizer)
    shardings = (place.shardings(state), place.shardings(frozen), place.batch_sharding())
    return _sharded_step(functools.partial(loss, spec=spec), (stage, spec), optimizer, *shardings, n_data, 2, place.mesh)


def _release_programs_of(layers: list, index: int) -> None:
    """Free block `index`'s compiled training step and block forward when the next block has
    another structure (TAMMP's blocks each have their own segment lengths, so they are never
    reused). Every XLA CPU executable holds memory mappings until freed, and a 30-block TAMMP
    run compiled enough of them to reach vm.max_map_count ("LLVM compilation error: Cannot
    allocate memory" in block 25 on the default model). Uniform methods keep their one program."""
    following = layers[index + 1] if index + 1 < len(layers) else None
    if following is None or jax.tree_util.tree_structure(following) != jax.tree_util.tree_structure(layers[index]):
        _block_step.clear_cache()
        decoder_block.clear_cache()
        _PROGRAMS.clear()


def _block_note(notes: dict, spec: ModelSpec, start_time: float, memory: tuple[int, int] = (0, 0)) -> StageNote:
    blocks = [notes[str(i)] for i in range(spec.num_layers) if str(i) in notes]
    curves = {f"block {i}": notes[str(i)]["losses"] for i in range(spec.num_layers) if str(i) in notes}
    trained = sum(int(b["trained_parameters"]) for b in blocks)
    return StageNote("block", curves, trained, time.perf_counter() - start_time, *memory)


def e2e_stage(
    packed: dict,
    spec: ModelSpec,
    tokens: np.ndarray,
    qat: QatConfig,
    checkpoints_root: Path,
    fingerprint: str,
    *,
    progress: bool = True,
    placement: Placement | None = None,
) -> tuple[dict, StageNote]:
    """Stage 2 (module docstring). tokens: int [n, T] training windows (this process's share
    of them, as in `block_stage`)."""
    start_time = time.perf_counter()
    cfg = qat.e2e
    dtype = DTYPES[qat.dtype]
    place = placement or Placement()
    share = place.share
    tokens = np.asarray(tokens[: cfg.samples // share[1]])
    n = tokens.shape[0] * share[1]
    micro_steps = cfg.epochs * (n // cfg.batch_size)
    optimizer = e2e_optimizer(qat, micro_steps)
    roles = E2E_ROLES[cfg.trainable]
    # No master weights train here, so the codes stay fixed and the step sizes get q - z.
    trainable = trainable_params(packed, dtype, fixed_codes=ROLE_WEIGHT not in roles)
    moving, frozen_host = partition(trainable, trainable_mask(trainable, roles))
    state, frozen, *memory = placed_state(moving, frozen_host, optimizer, qat.seed, micro_steps, place)
    checkpoints = TrainCheckpoints(checkpoints_root / "e2e_state", fingerprint, qat.checkpoint_every)
    state = checkpoints.restore(state) or state
    key = parallel.to_host(state.key)
    rope = place.replicated(rope_for(spec, tokens.shape[1]))
    step = step_program("e2e", spec, optimizer, state, frozen, place)

    def step_fn(state: TrainState, at: int) -> TrainState:
        batch = batch_indices(key, at, n, cfg.batch_size, share)
        return step(state, frozen, place.batch(tokens[batch]), *rope)

    state = run_steps(state, step_fn, micro_steps, checkpoints, desc="QAT end-to-end", progress=progress)
    trained = parallel.to_host(state.params)
    result = packed_params(packed, combine(trained, frozen_host))
    # The state stays until the caller has saved the model (the pipeline then removes the
    # whole checkpoint folder): a run killed in between ends here again without training.
    losses = [float(v) for v in parallel.to_host(state.losses)]
    note = StageNote("e2e", {"e2e": losses}, count_parameters(trained), time.perf_counter() - start_time, *memory)
    if losses:
        log.info("stage 2: loss %.4g -> %.4g over %d passes", losses[0], losses[-1], micro_steps)
    return result, note
