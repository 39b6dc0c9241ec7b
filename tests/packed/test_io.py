"""Save/load: a bit-identical round trip, atomic writes with plain file modes, and errors
that name the file: changed bytes (checksum), missing or misshapen tensors, NaN/Inf."""

import dataclasses
import json
import logging
import re
import stat
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from mpq_jax.digest import file_sha256
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


def rewrite_tensors(directory, tensors):
    """Replace the tensor file and record its new checksum: a consistent but wrong checkpoint."""
    path = directory / TENSORS_FILE
    safetensors.numpy.save_file(tensors, str(path))
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    manifest["files"][TENSORS_FILE] = {"sha256": file_sha256(path), "bytes": path.stat().st_size}
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))


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
    rewrite_tensors(tmp_path / "ckpt", tensors)
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
    rewrite_tensors(tmp_path / "ckpt", tensors)
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
    del manifest["files"]  # format 1 predates checksums
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


# ----------------------------------------------------------------------------- integrity


def tensor_data_range(path, name):
    """(first, end) byte offsets of tensor `name`'s data inside a safetensors file."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + header_len])[name]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def test_manifest_records_the_tensor_file_checksum(tmp_path):
    save_quantized(tmp_path / "ckpt", small_params(), {})
    path = tmp_path / "ckpt" / TENSORS_FILE
    files = json.loads((tmp_path / "ckpt" / MANIFEST_FILE).read_text())["files"]
    assert files == {TENSORS_FILE: {"sha256": file_sha256(path), "bytes": path.stat().st_size}}


def test_changed_bytes_in_a_scale_tensor_are_detected(tmp_path):
    save_quantized(tmp_path / "ckpt", small_params(), {})
    path = tmp_path / "ckpt" / TENSORS_FILE
    first, end = tensor_data_range(path, "layers.0.self_attn.q_proj.seg1.scale")
    raw = bytearray(path.read_bytes())
    size = len(raw)
    # Flip the lowest mantissa bit of every fp16 scale: the values stay finite and plausible,
    # so only the checksum can tell.
    for i in range(first, end, 2):
        raw[i] ^= 0x01
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == size
    changed = r"model\.safetensors was modified or corrupted after it was written: sha256"
    with pytest.raises(CheckpointError, match=changed) as info:
        load_quantized(tmp_path / "ckpt")
    assert "write the checkpoint again" in str(info.value)


def test_truncated_tensor_file_is_detected_by_size(tmp_path):
    save_quantized(tmp_path / "ckpt", small_params(), {})
    path = tmp_path / "ckpt" / TENSORS_FILE
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=r"model\.safetensors was modified or corrupted.*bytes"):
        load_quantized(tmp_path / "ckpt")


def test_manifest_from_before_checksums_loads_with_a_warning(tmp_path, caplog):
    params = small_params()
    save_quantized(tmp_path / "ckpt", params, {"run": 1})
    path = tmp_path / "ckpt" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    del manifest["files"]
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="mpq_jax.packed.io"):
        loaded, metadata = load_quantized(tmp_path / "ckpt")
    assert metadata == {"run": 1}
    assert_trees_identical(params, loaded)
    assert "cannot be verified" in caplog.text


Q_PROJ = "layers.0.self_attn.q_proj"


def with_value(params, name, value):
    """`params` with one entry of tensor `name` (a dotted path) set to `value`; QuantizedLinear
    fields are replaced directly, since create and make_segment refuse NaN themselves."""
    if name == "norm.weight":
        weight = params["norm"]["weight"].copy()
        weight[3] = value
        return {**params, "norm": {"weight": weight}}
    if name == "embed_tokens.weight":
        return {**params, "embed_tokens": {"weight": params["embed_tokens"]["weight"].at[2, 5].set(value)}}
    layer = params["layers"][0]
    ql = layer["self_attn"]["q_proj"]
    owner, field = name.removeprefix(f"{Q_PROJ}.").rpartition(".")[::2]
    if owner:  # "segN.field"
        i = int(owner.removeprefix("seg"))
        segments = list(ql.segments)
        segments[i] = dataclasses.replace(segments[i], **{field: getattr(segments[i], field).at[0, 0].set(value)})
        ql = dataclasses.replace(ql, segments=tuple(segments))
    else:
        array = getattr(ql, field)
        ql = dataclasses.replace(ql, **{field: array.at[(0,) * array.ndim].set(value)})
    layers = [{**layer, "self_attn": {**layer["self_attn"], "q_proj": ql}}, *params["layers"][1:]]
    return {**params, "layers": layers}


@pytest.mark.parametrize(
    "name, value",
    [
        (f"{Q_PROJ}.seg1.scale", np.nan),
        (f"{Q_PROJ}.seg0.dense", np.inf),
        (f"{Q_PROJ}.bias", np.nan),
        (f"{Q_PROJ}.lowrank_a", -np.inf),
        (f"{Q_PROJ}.lowrank_b", np.nan),
        (f"{Q_PROJ}.input_scale", np.nan),
        ("norm.weight", np.nan),
        ("embed_tokens.weight", np.inf),  # bfloat16
    ],
)
def test_non_finite_tensor_is_refused_naming_it(tmp_path, name, value):
    # Saved normally, so the checksum matches: only the values are wrong.
    save_quantized(tmp_path / "ckpt", with_value(small_params(), name, value), {})
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(name)}' holds 1 NaN or Inf"):
        load_quantized(tmp_path / "ckpt")


def test_saved_checkpoint_has_umask_modes(tmp_path, umask_022):
    add_tokenizer = lambda tmp: (tmp / "tokenizer.json").write_text("{}")  # noqa: E731
    save_quantized(tmp_path / "ckpt", small_params(), {}, extra_files=add_tokenizer)
    save_quantized(tmp_path / "ckpt", small_params(1), {})  # the overwrite path too
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    for path in (tmp_path / "ckpt").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
