"""Parallelism: jax.distributed start-up, the device mesh, partition rules, global arrays,
per-process data shares and the leader/follower broadcasts.

    initialize(parallel_config)        jax.distributed from the config or the environment
    make_mesh(data, model)             Mesh with axes ("data", "model"), AxisType.Auto
    tree_shardings(tree, mesh, fsdp)   NamedSharding per leaf from the partition rules
    put_global(tree, shardings)        host values -> global jax.Arrays (every process)
    to_host(tree)                      global jax.Arrays -> numpy, on every process
    process_share(mesh, axes)          which slice of the windows this process reads
    global_batch(rows, mesh, axes)     this process's rows -> one global batch array

Axis types. The mesh's axes are `AxisType.Auto`, chosen over the Explicit default of
`jax.make_mesh`: shardings are fixed where arrays enter and leave a jitted step
(`in_shardings`/`out_shardings` from the rules below) and XLA's propagation places
everything in between, inserting the collectives (the all-reduce after a row-parallel
o_proj/down_proj, the data-parallel gradient mean) itself. The decoder, the STE and optax
therefore stay plain array code. Under Explicit axes every dot that contracts a sharded axis
(each row-parallel layer, the LM head over a vocabulary-sharded embedding) would need an
`out_sharding` written into the model code, and so would the gathers of the permuted
columns. Where the per-device work is explicit by nature — each device running its own
calibration windows through a replicated block and the Hessians summed across the mesh —
`shard_map` is used instead (`mpq_jax.capture`): there the reduction is one `psum` of the
[d, d] sums per block rather than whatever propagation would choose for a gather of the
activations.

Partition rules (`partition_spec`), by the linear a leaf belongs to (a path component) and
the leaf's own name, for packed layers (`QuantizedLinear`), their trainable form
(`TrainableLinear`: master weights, codes, scales and zeros follow their weight) and plain
dense weights alike; optax's moments carry the parameter's path inside theirs, so the
optimizer state follows the parameters without rules of its own:

    q/k/v/gate/up_proj (column-parallel)  every array with the output rows first: rows over
                                          "model"; perm, input_scale, lowrank_a replicated
    o_proj/down_proj (row-parallel)       2-D arrays: columns over "model" (a segment's
                                          columns, its scale/zero groups); lowrank_b, bias,
                                          perm, input_scale replicated
    embed_tokens / lm_head                vocabulary rows over "model"
    norms, counters, keys, losses         replicated
    fsdp=True                             the other axis of every 2-D array over "data" too

An axis that does not divide evenly stays replicated (TAMMP's segments have any width), so
the rules never fail; `device_bytes` measures what each device really holds.

Data shares (`process_share`): each process reads the windows of its own devices' positions
along the data axes (contiguous, equal blocks, by position), so a process holds only its
share of the calibration and training windows and of their hidden states; processes that
share data positions (a model axis across hosts) read the same share.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mpq_jax.errors import ConfigError

log = logging.getLogger(__name__)

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)
COLUMN_PARALLEL = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})
VOCABULARY = frozenset({"embed_tokens", "lm_head"})
# Leaves of a linear that act on the input side (replicated under column parallelism) or
# on the output side (replicated under row parallelism).
INPUT_SIDE = frozenset({"perm", "input_scale", "lowrank_a"})
OUTPUT_SIDE = frozenset({"perm", "input_scale", "lowrank_b", "bias"})


# -- start-up -------------------------------------------------------------------------------


def _cluster_detected() -> bool:
    """Whether a cluster launched several processes (TPU pod, SLURM, Open MPI, or an explicit
    JAX coordinator): jax.distributed then finds coordinator, count and index itself."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(name, "1") or 1) > 1:
            return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(parallel) -> None:
    """Start jax.distributed when the run has several processes (`parallel`: ParallelConfig).

    distributed: "off" never; "on" always, with the coordinator address, process count and
    id from the config where given and found by JAX otherwise (TPU pod, SLURM); "auto" (the
    default) when the config names a coordinator or a cluster's variables are set. Must run
    before anything touches a device. CPU processes use gloo for cross-process collectives.
    """
    if parallel.distributed == "off" or jax.distributed.is_initialized():
        return
    named = parallel.coordinator_address is not None
    if parallel.distributed == "auto" and not (named or _cluster_detected()):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if named:
        if parallel.num_processes is None or parallel.process_id is None:
            raise ConfigError("parallel.coordinator_address is set: set parallel.num_processes and parallel.process_id too")
        kwargs = dict(coordinator_address=parallel.coordinator_address, num_processes=parallel.num_processes, process_id=parallel.process_id)
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())


def is_leader() -> bool:
    """Process 0: the one that writes files shared by every process."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_leader(value: np.ndarray) -> np.ndarray:
    """Process 0's `value` on every process (the others pass an array of the same shape and
    dtype). The lm-eval follower protocol (`mpq_jax.eval.harness`) runs on this."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(value))


# -- the mesh --------------------------------------------------------------------------------


def make_mesh(data: int = -1, model: int = 1, devices: Sequence | None = None) -> Mesh:
    """Mesh of `devices` (default: every device of every process) with axes ("data",
    "model"); -1 for data takes every device the model axis leaves. Auto axis types (module
    docstring)."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ConfigError(f"parallel.model: {model} does not divide the {len(devices)} devices; choose a divisor of {len(devices)}")
    if data == -1:
        data = len(devices) // model
    if data < 1 or data * model != len(devices):
        raise ConfigError(
            f"parallel.data x parallel.model = {data} x {model} = {data * model}, but there are {len(devices)} devices; "
            f"make the product {len(devices)} (data: -1 fills it)"
        )
    return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def mesh_shape(mesh: Mesh | None) -> dict[str, int]:
    return {DATA: 1, MODEL: 1} if mesh is None else {name: int(size) for name, size in mesh.shape.items()}


# -- partition rules -------------------------------------------------------------------------


def _key_name(key) -> str | None:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return None


def _path_names(path) -> list[str]:
    return [name for name in (_key_name(k) for k in path) if name is not None]


def partition_spec(path, shape: Sequence[int], mesh: Mesh, fsdp: bool = False) -> P:
    """The PartitionSpec of one leaf at `path` (a jax key path) with `shape` (module docstring)."""
    names = _path_names(path)
    leaf = names[-1] if names else ""
    sizes = mesh_shape(mesh)
    axes: list[str | None] = [None] * len(shape)
    if any(n in COLUMN_PARALLEL for n in names) and shape and leaf not in INPUT_SIDE:
        axes[0] = MODEL
    elif any(n in ROW_PARALLEL for n in names) and len(shape) == 2 and leaf not in OUTPUT_SIDE:
        axes[1] = MODEL
    elif any(n in VOCABULARY for n in names) and len(shape) == 2:
        axes[0] = MODEL
    if fsdp and len(shape) == 2:
        free = [i for i in (1, 0) if axes[i] is None]
        if free:
            axes[free[0]] = DATA
    for i, axis in enumerate(axes):  # an axis that does not divide evenly stays replicated
        if axis is not None and (sizes[axis] == 1 or shape[i] % sizes[axis]):
            axes[i] = None
    return P(*axes)


def tree_shardings(tree, mesh: Mesh, fsdp: bool = False):
    """A NamedSharding for every array leaf of `tree` (None leaves stay None)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(mesh, partition_spec(path, np.shape(x), mesh, fsdp)), tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_replicated(tree, mesh: Mesh):
    """`tree` as global arrays replicated on every device of the mesh."""
    return put_global(tree, jax.tree_util.tree_map(lambda _: replicated(mesh), tree))


def put_global(tree, shardings):
    """Global arrays from host values that every process holds in full: each process
    supplies the shards of its own devices."""

    def put(x, sharding):
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def to_host(tree):
    """numpy values of every leaf on every process (gathering shards held elsewhere)."""

    def get(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(get, tree)


def device_bytes(tree) -> int:
    """Bytes of `tree`'s leaves held by the fullest local device (from the addressable shards)."""
    per_device: dict = {}
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
        else:
            nbytes = np.asarray(leaf).nbytes
            per_device["host"] = per_device.get("host", 0) + nbytes
    return max(per_device.values(), default=0)


# -- data ------------------------------------------------------------------------------------


def process_share(mesh: Mesh | None, axes: Sequence[str] = (DATA,)) -> tuple[int, int]:
    """(index, count): this process reads block `index` of `count` equal blocks of the
    windows, those of its devices' positions along `axes` (module docstring)."""
    if mesh is None or jax.process_count() == 1:
        return 0, 1
    names = list(mesh.axis_names)
    order = [names.index(a) for a in axes] + [i for i, n in enumerate(names) if n not in axes]
    grid = np.transpose(mesh.devices, order).reshape(int(np.prod([mesh.shape[a] for a in axes])), -1)
    mine = sorted({row for row in range(grid.shape[0]) for d in grid[row] if d.process_index == jax.process_index()})
    size = len(mine)
    if mine != list(range(mine[0], mine[0] + size)) or grid.shape[0] % size or mine[0] % size:
        raise ConfigError(f"the mesh puts this process's devices at data positions {mine}: not one contiguous equal block; build the mesh from jax.devices() in order")
    return mine[0] // size, grid.shape[0] // size


def share_rows(n: int, share: tuple[int, int], what: str) -> slice:
    """The rows of n windows that share (index, count) reads; n must divide evenly."""
    index, count = share
    if n % count:
        raise ConfigError(f"{what}: {n} windows do not split evenly over {count} process shares; use a multiple of {count}")
    size = n // count
    return slice(index * size, (index + 1) * size)


def batch_sharding(mesh: Mesh, axes: Sequence[str] = (DATA,)) -> NamedSharding:
    return NamedSharding(mesh, P(tuple(axes)))


def global_batch(rows: np.ndarray, mesh: Mesh, axes: Sequence[str] = (DATA,)) -> jax.Array:
    """One global array, split over `axes` along its first dimension, from this process's
    rows (its `process_share` of the batch)."""
    sharding = batch_sharding(mesh, axes)
    _, count = process_share(mesh, axes)
    rows = np.asarray(rows)
    global_shape = (rows.shape[0] * count, *rows.shape[1:])
    width = int(np.prod([mesh.shape[a] for a in axes]))
    if global_shape[0] % width:
        raise ConfigError(f"a batch of {global_shape[0]} windows does not split over the {width} devices of the mesh axes {tuple(axes)}; use a multiple of {width}")
    return jax.make_array_from_process_local_data(sharding, rows, global_shape)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array split along its first dimension, in order."""
    starts: dict[int, np.ndarray] = {}
    for shard in x.addressable_shards:
        starts.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
    return np.concatenate([starts[s] for s in sorted(starts)])


# -- where a stage's arrays live -------------------------------------------------------------


class Placement:
    """Where a stage puts its arrays: on the default device (mesh None: what every stage did
    before meshes existed) or as global arrays on a mesh by the partition rules, with
    batches split over the data axis."""

    def __init__(self, mesh: Mesh | None = None, fsdp: bool = False):
        self.mesh, self.fsdp = mesh, fsdp

    @property
    def share(self) -> tuple[int, int]:
        """This process's share of the windows (index, count) along the data axis."""
        return process_share(self.mesh, (DATA,))

    def shardings(self, tree):
        return None if self.mesh is None else tree_shardings(tree, self.mesh, self.fsdp)

    def put(self, tree):
        if self.mesh is None:
            return jax.tree_util.tree_map(jax.numpy.asarray, tree)
        return put_global(tree, self.shardings(tree))

    def batch(self, rows: np.ndarray) -> jax.Array:
        return jax.numpy.asarray(rows) if self.mesh is None else global_batch(rows, self.mesh, (DATA,))

    def batch_sharding(self):
        return None if self.mesh is None else batch_sharding(self.mesh, (DATA,))

    def replicated(self, tree):
        if self.mesh is None:
            return jax.tree_util.tree_map(jax.numpy.asarray, tree)
        return put_replicated(tree, self.mesh)
