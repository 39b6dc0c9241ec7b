"""Save/load: a bit-identical round trip, atomic writes, and errors that name the file."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from mpq_jax.errors import CheckpointError
from mpq_jax.packed.io import MANIFEST_FILE, TENSORS_FILE, load_quantized, save_quantized
from mpq_jax.packed.qlinear import QuantizedLinear, make_dense_segment, make_segment
from mpq_jax.quant.rtn import rtn_quantize


def mixed_qlinear(rng, out=8, n_in=96):
    """[16-bit 16 cols | 3-bit 80 cols g32 (short last group)], random perm, low-rank, bias."""
    dense = make_dense_segment(rng.standard_normal((out, 16)), 0)
    seg = make_segment(
        rng.integers(0, 8, (out, 80)), rng.uniform(0.01, 0.1, (out, 3)), rng.integers(0, 8, (out, 3)), 3, 16, 32
    )
    return QuantizedLinear.create(
        [dense, seg],
        perm=rng.permutation(n_in),
        lowrank_b=rng.standard_normal((out, 2)),
        lowrank_a=rng.standard_normal((2, n_in)),
        bias=rng.standard_normal(out),
        input_scale=rng.uniform(0.5, 2.0, n_in),
    )


def small_params(seed=0):
    rng = np.random.default_rng(seed)
    layer = lambda: {  # noqa: E731
        "self_attn": {
            "q_proj": mixed_qlinear(rng),
            "k_proj": {"weight": rng.standard_normal((8, 96)).astype(np.float32), "bias": jnp.ones(8, jnp.float16)},
        },
        "mlp": {"down_proj": rtn_quantize(rng.standard_normal((8, 96)), 4, 64)},
    }
    return {
        "embed_tokens": {"weight": jnp.asarray(rng.standard_normal((10, 96)), jnp.bfloat16)},
        "layers": [layer(), layer()],
        "norm": {"weight": np.ones(96, np.float32)},
        "extras": (None, np.arange(3, dtype=np.int32)),
    }


def assert_trees_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bit_identical(tmp_path):
    params = small_params()
    metadata = {"method": "rtn", "bits": [3, 4]}
    save_quantized(tmp_path / "ckpt", params, metadata)
    loaded, loaded_meta = load_quantized(tmp_path / "ckpt")
    assert loaded_meta == metadata
    assert_trees_identical(params, loaded)
    assert isinstance(loaded["extras"], tuple) and loaded["extras"][0] is None
    assert loaded["embed_tokens"]["weight"].dtype == jnp.bfloat16
    x = np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)
    for i in range(2):
        for get in (lambda p: p["self_attn"]["q_proj"], lambda p: p["mlp"]["down_proj"]):
            np.testing.assert_array_equal(np.asarray(get(loaded["layers"][i]).apply(x)), np.asarray(get(params["layers"][i]).apply(x)))


def test_manifest_describes_layers_and_names_tensors(tmp_path):
    save_quantized(tmp_path / "ckpt", small_params(), {})
    manifest = json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())
    assert manifest["format"] == "mpq-jax-packed" and manifest["format_version"] == 2
    spec = manifest["qlinears"]["layers.0.self_attn.q_proj"]
    assert spec["segments"] == [
        {"start": 0, "stop": 16, "bits": 16, "group_size": 0},
        {"start": 16, "stop": 96, "bits": 3, "group_size": 32},
    ]
    assert spec["lowrank_rank"] == 2 and spec["has_bias"] is True and spec["has_input_scale"] is True
    names = safetensors.numpy.load_file(str(tmp_path / "ckpt" / TENSORS_FILE)).keys()
    assert {"layers.0.self_attn.q_proj.seg1.codes", "layers.1.self_attn.q_proj.perm", "embed_tokens.weight"} <= set(names)


def test_overwrite_replaces_old_checkpoint_and_leaves_no_temp(tmp_path):
    save_quantized(tmp_path / "ckpt", small_params(0), {"run": 1})
    save_quantized(tmp_path / "ckpt", small_params(1), {"run": 2})
    loaded, meta = load_quantized(tmp_path / "ckpt")
    assert meta == {"run": 2}
    assert_trees_identical(small_params(1), loaded)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_writer(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken_writer)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_quantized(tmp_path / "ckpt", small_params(), {})
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    save_quantized(tmp_path / "ckpt", small_params(), {"run": 1})
    monkeypatch.setattr(safetensors.numpy, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("full")))
    with pytest.raises(CheckpointError, match="ckpt"):
        save_quantized(tmp_path / "ckpt", small_params(), {"run": 2})
    monkeypatch.undo()
    assert load_quantized(tmp_path / "ckpt")[1] == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_corrupt_manifest_names_the_file(tmp_path):
    save_quantized(tmp_path / "ckpt", small_params(), {})
    (tmp_path / "ckpt" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=MANIFEST_FILE):
        load_quantized(tmp_path / "ckpt")


def test_wrong_version_names_the_field(tmp_path):
    save_quantized(tmp_path / "ckpt", small_params(), {})
    path = tmp_path / "ckpt" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version"):
        load_quantized(tmp_path / "ckpt")


def test_missing_tensor_names_the_tensor(tmp_path):
    save_quantized(tmp_path / "ckpt", small_params(), {})
    path = tmp_path / "ckpt" / TENSORS_FILE
    tensors = safetensors.numpy.load_file(str(path))
    del tensors["layers.1.self_attn.q_proj.seg1.zero"]
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.q_proj\.seg1\.zero"):
        load_quantized(tmp_path / "ckpt")


@pytest.mark.parametrize(
    "name,expected",
    [("layers.0.self_attn.q_proj.seg1.scale", r"layers\.0\.self_attn\.q_proj\.seg1\.\*.*scale"), ("norm.weight", r"norm\.weight")],
)
def test_shape_mismatch_names_the_tensor(tmp_path, name, expected):
    save_quantized(tmp_path / "ckpt", small_params(), {})
    path = tmp_path / "ckpt" / TENSORS_FILE
    tensors = safetensors.numpy.load_file(str(path))
    tensors[name] = tensors[name][..., :2].copy()
    safetensors.numpy.save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=expected):
        load_quantized(tmp_path / "ckpt")


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_quantized(tmp_path / "nowhere")


def write_format1(directory, params):
    """Rewrite a format-2 checkpoint as format 1 would have stored it (row bitstreams)."""
    from mpq_jax.packed import bitpack

    save_quantized(directory, params, {"note": "old"})
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    tensors = safetensors.numpy.load_file(str(directory / TENSORS_FILE))
    for name, spec in manifest["qlinears"].items():
        for i, seg in enumerate(spec["segments"]):
            prefix = f"{name}.seg{i}"
            if seg["bits"] == 16:
                tensors[f"{prefix}.dense"] = np.ascontiguousarray(tensors[f"{prefix}.dense"].T)
                continue
            cols = seg["stop"] - seg["start"]
            from mpq_jax.packed.planes import unpack_codes

            codes = np.asarray(unpack_codes(tensors[f"{prefix}.codes"], seg["bits"], cols)).T  # [out, cols]
            tensors[f"{prefix}.codes"] = bitpack.pack(codes, seg["bits"])
            tensors[f"{prefix}.scale"] = np.ascontiguousarray(tensors[f"{prefix}.scale"].T)
            tensors[f"{prefix}.zero"] = bitpack.pack(tensors[f"{prefix}.zero"].astype(np.int64), seg["bits"])
    manifest["format_version"] = 1
    safetensors.numpy.save_file(tensors, str(directory / TENSORS_FILE))
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_format1_checkpoint_is_converted_on_load_value_for_value(tmp_path):
    params = small_params(3)
    write_format1(tmp_path / "old", params)
    loaded, metadata = load_quantized(tmp_path / "old")
    assert metadata == {"note": "old"}
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(params)
    for leaf_a, leaf_b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))
    # Saving the converted tree again writes format 2, bit for bit what the original saves.
    save_quantized(tmp_path / "new", loaded, {})
    assert json.loads((tmp_path / "new" / MANIFEST_FILE).read_text())["format_version"] == 2
