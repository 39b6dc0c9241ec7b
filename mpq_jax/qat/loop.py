"""The training state, the one training loop both QAT stages run, and its checkpoints.

`TrainState` is a pytree: the trainable half of the params (`mpq_jax.qat.trainable.partition`),
the optax state, the step, the RNG key the data order is drawn from, and the loss of every
step so far. The data position is a function of the step and the key (`epoch_order`), so
the state alone says exactly which batch comes next: a resumed run reads the same batches in
the same order as an uninterrupted one and ends with the same parameters, bit for bit.

Checkpoints (`TrainCheckpoints`) are orbax-checkpoint's CheckpointManager over the state's
leaves, written every `every` steps and at the end of a stage. Orbax writes each step into
a temporary folder and renames it when complete, so a kill at any moment (kill -9 included)
leaves the last complete checkpoint readable; older steps are deleted only after a newer one
is complete. A folder written with other settings (another fingerprint) is cleared, never
resumed from.

Not for: what a stage computes (mpq_jax.qat.stages).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from mpq_jax import parallel

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainState:
    params: object  # the trainable half of the params (None where frozen)
    opt_state: object
    step: jax.Array  # int32 scalar: steps taken
    key: jax.Array  # uint32 [2]: the data order's key (raw, so orbax stores a plain array)
    losses: jax.Array  # float32 [total steps]: the loss of each step taken, 0 after

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, seed: int, total_steps: int) -> "TrainState":
        return cls(
            params=params,
            opt_state=optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            key=jax.random.key_data(jax.random.key(seed)),
            losses=jnp.zeros(total_steps, jnp.float32),
        )


jax.tree_util.register_dataclass(TrainState, data_fields=["params", "opt_state", "step", "key", "losses"], meta_fields=[])


def epoch_order(key: jax.Array, epoch: int, n: int) -> np.ndarray:
    """The order of n samples in `epoch`: a permutation drawn from the state's key and the epoch."""
    return np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.wrap_key_data(key), epoch), n))


def batch_indices(key: jax.Array, step: int, n: int, batch_size: int, share: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Sample indices of the batch taken at `step` (whole batches only; a remainder of fewer
    than batch_size samples is left out of every epoch).

    With several process shares (`mpq_jax.parallel.process_share`: (index, count)), n and
    batch_size are the global counts and each share draws its batch_size / count rows from
    its own n / count windows, in an order drawn from the key and the share's index: the
    indices returned are positions in the share's windows. The order is therefore fixed for a
    given number of shares (one share: exactly the single-process order)."""
    index, count = share
    if count > 1:
        key = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key), index))
        n, batch_size = n // count, batch_size // count
    per_epoch = n // batch_size
    epoch, position = divmod(step, per_epoch)
    return epoch_order(key, epoch, n)[position * batch_size : (position + 1) * batch_size]


def train_step(loss_fn: Callable, optimizer: optax.GradientTransformation, state: TrainState, frozen, *batch) -> TrainState:
    """One optimizer step on `batch`: gradients of `loss_fn(trainable, frozen, *batch)` with
    respect to the trainable half only, so frozen leaves cannot move."""
    loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, *batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
        key=state.key,
        losses=state.losses.at[state.step].set(loss),
    )


class TrainCheckpoints:
    """Orbax checkpoints of a TrainState under `folder`, valid for one `fingerprint` (module
    docstring). every = 0 saves only at the end of the stage."""

    FINGERPRINT_FILE = "fingerprint.json"

    def __init__(self, folder: str | Path, fingerprint: str, every: int):
        import orbax.checkpoint as ocp

        self.folder = Path(folder).absolute()
        self.every = every
        marker = self.folder / self.FINGERPRINT_FILE
        if parallel.is_leader():  # one process decides; the folder is shared by all of them
            if self.folder.exists():
                recorded = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
                if recorded != fingerprint:
                    log.warning("%s holds training state of other settings; starting this stage over", self.folder)
                    shutil.rmtree(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            if not marker.is_file():
                tmp = marker.with_suffix(".tmp")
                tmp.write_text(json.dumps({"fingerprint": fingerprint}))
                tmp.replace(marker)
        parallel.sync(f"checkpoint folder {self.folder}")
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.folder,
            options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True),
        )

    def restore(self, template: TrainState) -> TrainState | None:
        """The latest complete state, shaped like `template`, or None when there is none. A
        template of global arrays (a mesh) is restored into the same shardings: each process
        reads the shards of its own devices."""
        step = self.manager.latest_step()
        if step is None:
            return None
        leaves, treedef = jax.tree_util.tree_flatten(template)

        def abstract_of(a):
            sharding = a.sharding if isinstance(a, jax.Array) else None
            return jax.ShapeDtypeStruct(np.shape(a), a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype, sharding=sharding)

        abstract = {_leaf_name(i): abstract_of(a) for i, a in enumerate(leaves)}
        restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        log.info("resuming from %s step %d", self.folder, step)
        values = [restored[_leaf_name(i)] for i in range(len(leaves))]
        return jax.tree_util.tree_unflatten(treedef, [v if isinstance(v, jax.Array) else jnp.asarray(v) for v in values])

    def save(self, state: TrainState, final: bool = False) -> None:
        step = int(parallel.to_host(state.step))
        if not final and (self.every == 0 or step % self.every):
            return
        if self.manager.latest_step() == step:
            return
        leaves = jax.tree_util.tree_leaves(state)
        self.manager.save(step, args=self._ocp.args.StandardSave({_leaf_name(i): a for i, a in enumerate(leaves)}), force=True)
        self.manager.wait_until_finished()

    def remove(self) -> None:
        """Drop the folder once what it resumes has been written elsewhere."""
        self.manager.close()
        parallel.sync(f"remove {self.folder}")
        if parallel.is_leader():
            shutil.rmtree(self.folder, ignore_errors=True)


def _leaf_name(index: int) -> str:
    return f"leaf_{index:05d}"


def run_steps(
    state: TrainState,
    step_fn: Callable[[TrainState, int], TrainState],
    total_steps: int,
    checkpoints: TrainCheckpoints | None,
    *,
    desc: str,
    progress: bool = True,
) -> TrainState:
    """The training loop: `step_fn(state, step)` (which takes its batch from the step) until
    total_steps, checkpointing as configured and at the end, a progress bar (process 0's)
    showing the running loss."""
    start = int(parallel.to_host(state.step))
    progress = progress and parallel.is_leader()
    with tqdm(total=total_steps, initial=start, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        for step in range(start, total_steps):
            state = step_fn(state, step)
            if checkpoints is not None:
                checkpoints.save(state)
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{float(parallel.to_host(state.losses)[step]):.4g}")
    if checkpoints is not None:
        checkpoints.save(state, final=True)
    return state
