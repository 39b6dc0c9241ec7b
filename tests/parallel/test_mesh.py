"""One process, eight CPU devices (run by tests/parallel/test_mesh_devices.py): partition rules, data-parallel capture
and both QAT stages on 1, 2, 4 and 8 devices in several mesh shapes agree with one device;
per-device parameter and optimizer memory falls as 1/N on an N-way model axis; sharded
checkpoints restore into their shardings."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mpq_jax import parallel
from mpq_jax.capture import HessianCache, block_outputs, block_statistics, embed_tokens, fill_hessian_cache
from mpq_jax.errors import ConfigError
from mpq_jax.qat import stages
from mpq_jax.qat.loop import TrainCheckpoints, batch_indices
from mpq_jax.qat.trainable import partition, trainable_mask, trainable_params
from tests.parallel.common import qat_config, tiny_problem, write_checkpoint

pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason="needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/parallel/test_mesh_devices.py does)",
)

# data x model; batches of 4 windows split over at most 4 data devices
SHAPES = [(1, 2), (2, 2), (4, 2), (2, 4), (1, 8)]  # the one-device run is the reference


def mesh_of(data: int, model: int):
    return parallel.make_mesh(data, model, devices=jax.devices()[: data * model])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mesh") / "model"
    write_checkpoint(directory)
    return tiny_problem(directory)


def _spec_of(tree, path_names: tuple, mesh, fsdp=False):
    found = []

    def visit(path, leaf):
        names = parallel._path_names(path)
        if tuple(names[-len(path_names):]) == path_names:
            found.append(parallel.partition_spec(path, np.shape(leaf), mesh, fsdp))

    jax.tree_util.tree_map_with_path(visit, tree)
    assert found, path_names
    return found[0]


def test_partition_rules_shard_each_linear_by_its_role(tiny):
    model, packed, _ = tiny
    mesh = mesh_of(2, 4)
    train = trainable_params(packed["layers"][0], np.float32, fp_params=model.params["layers"][0])
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):  # column-parallel: output rows
        for field in ("weight", "scale", "zero"):
            assert _spec_of(train, (proj, "segments", "0", field), mesh) == P("model", None)
        assert _spec_of(train, (proj, "perm"), mesh) == P(None)
    for proj in ("o_proj", "down_proj"):  # row-parallel: columns and their groups
        for field in ("weight", "scale", "zero"):
            assert _spec_of(train, (proj, "segments", "0", field), mesh) == P(None, "model")
    assert _spec_of(train, ("input_layernorm", "weight"), mesh) == P(None)
    assert _spec_of(model.params, ("embed_tokens", "weight"), mesh) == P("model", None)
    assert _spec_of(model.params, ("self_attn", "q_proj", "weight"), mesh) == P("model", None)  # a dense FP linear too
    # FSDP shards the other axis over data; an axis that does not divide stays whole.
    assert _spec_of(train, ("q_proj", "segments", "0", "weight"), mesh, fsdp=True) == P("model", "data")
    assert _spec_of(train, ("o_proj", "segments", "0", "weight"), mesh, fsdp=True) == P("data", "model")
    odd = jax.ShapeDtypeStruct((211, 64), np.float32)
    assert _spec_of({"embed_tokens": {"weight": odd}}, ("embed_tokens", "weight"), mesh) == P(None, None)


def test_optimizer_state_follows_its_parameters(tiny):
    model, packed, _ = tiny
    mesh = mesh_of(1, 8)
    train = trainable_params(packed["layers"][0], np.float32, fp_params=model.params["layers"][0])
    moving, _ = partition(train, trainable_mask(train, stages.BLOCK_ROLES))
    optimizer = stages.block_optimizer(qat_config(), 4)
    by_path = {tuple(parallel._path_names(path)): s.spec for path, s in jax.tree_util.tree_flatten_with_path(parallel.tree_shardings(moving, mesh))[0]}
    opt_shardings = jax.tree_util.tree_flatten_with_path(parallel.tree_shardings(optimizer.init(moving), mesh))[0]
    # Adam's mu and nu of every leaf carry the parameter's path after theirs: same spec.
    moments = 0
    for path, sharding in opt_shardings:
        names = parallel._path_names(path)
        for moment in ("mu", "nu"):
            if moment in names:
                assert sharding.spec == by_path[tuple(names[names.index(moment) + 1 :])], names
                moments += 1
        if names[-1] == "count":
            assert sharding.spec == P()
    assert moments == 2 * len(by_path) and any(spec != P(None, None) for spec in by_path.values())


def test_mesh_errors_name_the_setting():
    with pytest.raises(ConfigError, match="parallel.model"):
        parallel.make_mesh(-1, 3)
    with pytest.raises(ConfigError, match="parallel.data x parallel.model"):
        parallel.make_mesh(3, 2)
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": len(jax.devices()), "model": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (2, 2), (8, 1), (2, 4), (1, 8)])
def test_capture_on_a_mesh_equals_one_device(tiny, shape, tmp_path):
    model, _, tokens = tiny
    mesh = mesh_of(*shape)
    hidden = np.asarray(embed_tokens(model.params["embed_tokens"]["weight"], tokens))
    layer = model.params["layers"][0]
    alone, split = block_statistics(layer, model.spec, hidden), block_statistics(layer, model.spec, hidden, mesh=mesh)
    for name in alone:
        for field in ("hessian", "mean", "mean_abs"):
            want, got = getattr(alone[name], field), getattr(split[name], field)
            # float32 sums over 128 tokens in another order: a few ulps of the largest entry
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.max(np.abs(want)), err_msg=f"{name}.{field}")
        np.testing.assert_array_equal(split[name].hessian, split[name].hessian.T)
    np.testing.assert_allclose(block_outputs(layer, model.spec, hidden, mesh=mesh), block_outputs(layer, model.spec, hidden), rtol=1e-5, atol=1e-5)
    # Through every block (outputs propagating), as every PTQ method's capture runs.
    caches = [HessianCache(tmp_path, name) for name in ("one", "mesh")]
    fill_hessian_cache(model.params, model.spec, {"s": tokens}, caches[0], progress=False)
    fill_hessian_cache(model.params, model.spec, {"s": tokens}, caches[1], progress=False, mesh=mesh)
    for index in range(model.spec.num_layers):
        one, many = caches[0].load(index)["s"], caches[1].load(index)["s"]
        for name in one:
            np.testing.assert_allclose(many[name].hessian, one[name].hessian, rtol=1e-4, atol=1e-5 * np.max(np.abs(one[name].hessian)))


@pytest.fixture(scope="module")
def one_device_run(tiny, tmp_path_factory):
    model, packed, tokens = tiny
    return _train(tiny, None, tmp_path_factory.mktemp("one"))


def _train(tiny, placement, root):
    model, packed, tokens = tiny
    # Stage 1 at rates that keep every master weight inside its rounding cell (they start
    # 0.01 grid steps inside it; 4 Adam steps of <= 2e-5 move them less): the loss is then a
    # smooth function of the parameters and devices can only change float32 rounding. At
    # larger rates a weight that ends within rounding of a cell boundary flips its code on
    # one mesh and not on another (Adam turns a gradient of ~1e-9 into a full step of
    # either sign), and the runs part by a code flip, not by arithmetic.
    qat = qat_config(
        checkpoint_every=0,
        block={"batch_size": 4, "epochs": 2, "lr_weight": 2e-5, "lr_quant": 2e-5},
        e2e={"batch_size": 4, "effective_batch": 4, "epochs": 1, "lr": 1e-3},
    )
    after_block, block_note = stages.block_stage(model.params, packed, model.spec, tokens, qat, root, "m", progress=False, placement=placement)
    after_e2e, e2e_note = stages.e2e_stage(after_block, model.spec, tokens, qat, root, "m", progress=False, placement=placement)
    return after_e2e, block_note, e2e_note


@pytest.mark.parametrize("shape", SHAPES)
def test_qat_on_a_mesh_gives_the_one_device_losses(tiny, one_device_run, shape, tmp_path):
    params, block_note, e2e_note = _train(tiny, parallel.Placement(mesh_of(*shape)), tmp_path)
    want_params, want_block, want_e2e = one_device_run
    for name, curve in want_block.losses.items():
        assert len(curve) == 4
        # float32 reductions split over devices: relative differences of a few 1e-7 per step
        np.testing.assert_allclose(block_note.losses[name], curve, rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(e2e_note.losses["e2e"], want_e2e.losses["e2e"], rtol=2e-5)
    pairs = list(zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want_params)))
    assert any(np.asarray(a).dtype == np.float16 for a, _ in pairs)
    for got, want in pairs:
        got, want = np.asarray(got), np.asarray(want)
        if got.dtype == np.float16:  # scales: equal or one float16 step (2**-10 relative) apart
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=1e-7)
        else:  # codes (bit planes), permutations: identical
            np.testing.assert_array_equal(got, want)


def _state_bytes(tiny, mesh, stage: str, fsdp=False):
    model, packed, _ = tiny
    place = parallel.Placement(mesh, fsdp)
    if stage == "block":
        trainable = trainable_params(packed["layers"][0], np.float32, fp_params=model.params["layers"][0])
        moving, frozen = partition(trainable, trainable_mask(trainable, stages.BLOCK_ROLES))
        optimizer = stages.block_optimizer(qat_config(), 4)
    else:
        trainable = trainable_params(packed, np.float32, fixed_codes=True)
        moving, frozen = partition(trainable, trainable_mask(trainable, stages.E2E_ROLES["paper"]))
        optimizer = stages.e2e_optimizer(qat_config(), 4)
    _, _, param_bytes, opt_bytes = stages.placed_state(moving, frozen, optimizer, 0, 4, place)
    return param_bytes + opt_bytes


@pytest.mark.parametrize("stage", ["block", "e2e"])
def test_memory_per_device_falls_with_the_model_axis(tiny, stage):
    one = _state_bytes(tiny, None, stage)
    for n in (2, 4, 8):
        # the target of scripts/bench_scale.py: at most 1.15 / N of one device's bytes
        assert _state_bytes(tiny, mesh_of(1, n), stage) <= 1.15 * one / n, n
    assert _state_bytes(tiny, mesh_of(2, 4), stage, fsdp=True) <= 1.15 * one / 8


def test_sharded_checkpoint_restores_into_its_shardings(tiny, tmp_path):
    model, packed, _ = tiny
    place = parallel.Placement(mesh_of(2, 4))
    trainable = trainable_params(packed["layers"][1], np.float32, fp_params=model.params["layers"][1])
    moving, frozen = partition(trainable, trainable_mask(trainable, stages.BLOCK_ROLES))
    state, *_ = stages.placed_state(moving, frozen, stages.block_optimizer(qat_config(), 4), 0, 4, place)
    checkpoints = TrainCheckpoints(tmp_path, "fp", every=1)
    checkpoints.save(state, final=True)
    restored = TrainCheckpoints(tmp_path, "fp", every=1).restore(state)
    sharded = 0
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        assert got.sharding == want.sharding
        sharded += not want.sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert sharded > 10


def test_process_shares_split_every_epoch_between_them():
    key = np.asarray(jax.random.key_data(jax.random.key(3)))
    np.testing.assert_array_equal(batch_indices(key, 5, 12, 4), batch_indices(key, 5, 12, 4, (0, 1)))
    for epoch in range(2):
        taken = []
        for index in range(2):  # two shares of 6 windows, global batches of 4 (2 rows each)
            for step in range(epoch * 3, epoch * 3 + 3):
                taken += list(batch_indices(key, step, 12, 4, (index, 2)) + 6 * index)
        assert sorted(taken) == list(range(12))
    assert parallel.process_share(mesh_of(2, 4)) == (0, 1)  # one process reads every window
    assert parallel.share_rows(8, (1, 2), "w") == slice(4, 8)
    with pytest.raises(ConfigError, match="qat.block.samples"):
        parallel.share_rows(7, (0, 2), "qat.block.samples")
