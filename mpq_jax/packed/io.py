"""Save and load a params pytree whose leaves are arrays and QuantizedLinears.

A checkpoint is a directory holding two files:
  model.safetensors   every tensor, named by its dotted path in the tree, e.g.
                      `layers.0.self_attn.q_proj.perm`, `...q_proj.seg1.codes`,
                      `...q_proj.seg0.dense`, `...q_proj.lowrank_a`, `embed_tokens.weight`
  mpq_manifest.json   {"format": "mpq-jax-packed", "format_version": 2,
                       "files": {"model.safetensors": {"sha256": hex digest, "bytes": size}},
                       "metadata": {...},
                       "tree": nested description of the dict/list/tuple structure,
                       "qlinears": {path: in/out features, segments, low-rank rank, bias}}

Writing is atomic: both files go into a temporary directory beside the target, which is
then renamed into place (an existing target is renamed away first and deleted last), so a
reader never sees a half-written checkpoint. Files and folders get the modes plain writes
would (0666 / 0777 less the umask), not tempfile's owner-only ones.

Loading checks everything against the manifest and raises `CheckpointError` naming the
file, the tensor or field, and the fix: the tensor file's sha256 (so bytes changed after
writing, even at the same size, are caught before any is used), every tensor's shape and
dtype, each layer's layout, and that no float tensor holds NaN or Inf (a model that would
silently compute garbage). Manifests written before "files" existed load unverified, with
a warning; adding the field kept format version 2, since readers ignore fields they do not
know and the tensors are unchanged.

Tree nodes are dicts (string keys without '.'), lists, tuples, None, arrays (numpy or jax;
dtypes are preserved exactly, bfloat16 included) and QuantizedLinears. Loaded arrays are
jax arrays; with jax's default 32-bit mode a float64 array comes back as float32.

Format versions: 2 stores QuantizedLinear's layout 2 (see qlinear.py: bit-plane codes and
output-minor scales/zeros, read directly by the kernels). Version 1 files (row-bitstream
codes, output-packed zeros) are converted to layout 2 while loading, value for value, so
an old checkpoint dequantizes to exactly the same weights.

Not here: reading original Hugging Face / GGUF checkpoints (mpq_jax.models).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from mpq_jax.digest import file_sha256
from mpq_jax.errors import CheckpointError
from mpq_jax.output import apply_umask_mode
from mpq_jax.packed import bitpack
from mpq_jax.packed.planes import pack_codes
from mpq_jax.packed.qlinear import DENSE_BITS, QuantizedLinear, Segment

logger = logging.getLogger(__name__)

FORMAT = "mpq-jax-packed"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1 is converted on load
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "mpq_manifest.json"


# ----------------------------------------------------------------------------- saving


def save_quantized(directory, params, metadata: dict, extra_files: Callable[[Path], None] | None = None) -> None:
    """Write `params` and JSON-serializable `metadata` to `directory` atomically.

    `extra_files(folder)` may add more files (e.g. the tokenizer) to the checkpoint folder
    before it is renamed into place, so they share the all-or-nothing guarantee.
    """
    target = Path(directory)
    if not isinstance(params, (dict, list, tuple)):
        raise CheckpointError(f"params must be a dict or list at its root, got {type(params).__name__}")
    tensors: dict[str, np.ndarray] = {}
    qlinears: dict[str, dict] = {}
    tree = _describe(params, (), tensors, qlinears)
    try:
        json.dumps(metadata)  # fail before writing gigabytes of tensors
    except TypeError as err:
        raise CheckpointError(f"metadata for {target} must be JSON-serializable: {err}") from err

    def write(tmp: Path) -> None:
        safetensors.numpy.save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": FORMAT})
        apply_umask_mode(tmp / TENSORS_FILE)  # safetensors (0.8) creates its file 0600
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "files": {TENSORS_FILE: _file_record(tmp / TENSORS_FILE)},
            "metadata": metadata,
            "tree": tree,
            "qlinears": qlinears,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        for name in (TENSORS_FILE, MANIFEST_FILE):
            _fsync(tmp / name)
        if extra_files is not None:
            extra_files(tmp)

    _replace_dir_atomically(target, write)


def _describe(node, path: tuple, tensors: dict, qlinears: dict) -> dict:
    """JSON description of `node`; fills `tensors` and `qlinears` keyed by dotted path."""
    name = ".".join(path)
    if isinstance(node, QuantizedLinear):
        qlinears[name] = _qlinear_spec(node)
        for field, array in _qlinear_tensors(node).items():
            tensors[f"{name}.{field}"] = _to_numpy(array)
        return {"kind": "qlinear"}
    if isinstance(node, dict):
        items = {}
        for key, child in node.items():
            if not isinstance(key, str) or "." in key or not key:
                raise CheckpointError(
                    f"params key {key!r} at '{name}' must be a non-empty string without '.', "
                    "because dotted paths name the tensors"
                )
            items[key] = _describe(child, path + (key,), tensors, qlinears)
        return {"kind": "dict", "items": items}
    if isinstance(node, (list, tuple)):
        items = [_describe(child, path + (str(i),), tensors, qlinears) for i, child in enumerate(node)]
        return {"kind": "list" if isinstance(node, list) else "tuple", "items": items}
    if node is None:
        return {"kind": "none"}
    if isinstance(node, (np.ndarray, np.generic, jax.Array)):
        array = _to_numpy(node)
        tensors[name] = array
        return {"kind": "array", "dtype": array.dtype.name, "shape": list(array.shape)}
    raise CheckpointError(f"params leaf '{name}' has unsupported type {type(node).__name__}")


def _qlinear_spec(ql: QuantizedLinear) -> dict:
    return {
        "in_features": ql.in_features,
        "out_features": ql.out_features,
        "segments": [
            {"start": s.start, "stop": s.stop, "bits": s.bits, "group_size": s.group_size} for s in ql.segments
        ],
        "lowrank_rank": ql.rank,
        "has_bias": ql.bias is not None,
        "has_input_scale": ql.input_scale is not None,
    }


def _qlinear_tensors(ql: QuantizedLinear) -> dict[str, Any]:
    """Field name (relative to the layer's path) -> array, for every stored array."""
    out = {"perm": ql.perm}
    for i, seg in enumerate(ql.segments):
        fields = ("dense",) if seg.bits == DENSE_BITS else ("codes", "scale", "zero")
        out.update({f"seg{i}.{f}": getattr(seg, f) for f in fields})
    if ql.lowrank_a is not None:
        out["lowrank_a"] = ql.lowrank_a
        out["lowrank_b"] = ql.lowrank_b
    if ql.bias is not None:
        out["bias"] = ql.bias
    if ql.input_scale is not None:
        out["input_scale"] = ql.input_scale
    return out


def _to_numpy(array) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array))


def _file_record(path: Path) -> dict:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run write(tmp_dir) in a temp dir beside `target`, then rename it to `target`."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory; choose another output path")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        apply_umask_mode(tmp, is_dir=True)  # it becomes the checkpoint folder itself
        write(tmp)
        if target.exists():
            # Move the old checkpoint aside (not delete) so a failed swap can restore it.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=parent))
            os.replace(target, old)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint {target}: {err}; check free space and permissions") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once tmp has been renamed


# ----------------------------------------------------------------------------- loading


def load_quantized(directory):
    """Read a checkpoint written by `save_quantized`: returns (params, metadata)."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise CheckpointError(f"{tensors_path} is missing; the checkpoint is incomplete, save it again")
    _verify_files(directory, manifest)
    try:
        reader = safetensors.safe_open(str(tensors_path), framework="numpy")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{tensors_path} cannot be read ({err}); the file is corrupt, save it again") from err
    loader = _Loader(reader, tensors_path, directory / MANIFEST_FILE, manifest["qlinears"], manifest["format_version"])
    params = loader.build(manifest["tree"], ())
    unused = set(reader.keys()) - loader.used
    if unused:
        logger.warning("%s: %d tensors not referenced by the manifest, ignored", tensors_path, len(unused))
    return params, manifest["metadata"]


def read_metadata(directory) -> dict:
    """The metadata a checkpoint was saved with (model spec, source, run config), without its tensors."""
    return _read_manifest(Path(directory))["metadata"]


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; pass a directory written by save_quantized")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt, save it again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path}: field 'format' is {got!r}, expected {FORMAT!r}; not an mpq-jax checkpoint")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: field 'format_version' is {manifest.get('format_version')!r}, this mpq-jax reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}; use the mpq-jax version that wrote it"
        )
    for field, kind in (("tree", dict), ("qlinears", dict), ("metadata", dict)):
        if not isinstance(manifest.get(field), kind):
            raise CheckpointError(f"{path}: field '{field}' is missing or not an object; the checkpoint is corrupt")
    return manifest


def _verify_files(directory: Path, manifest: dict) -> None:
    """Check each file's size and sha256 against the manifest's "files" field."""
    manifest_path = directory / MANIFEST_FILE
    files = manifest.get("files")
    if files is None:
        logger.warning(
            "%s has no 'files' checksums (written before mpq-jax recorded them); %s cannot be verified. "
            "Save the checkpoint again to add them",
            manifest_path,
            TENSORS_FILE,
        )
        return
    if not isinstance(files, dict) or TENSORS_FILE not in files:
        raise CheckpointError(
            f"{manifest_path}: field 'files' must map {TENSORS_FILE!r} to its checksum; the manifest is corrupt, "
            "save the checkpoint again"
        )
    for name, record in files.items():
        if Path(name).name != name or not isinstance(record, dict):
            raise CheckpointError(
                f"{manifest_path}: entry 'files.{name}' must name a file in the folder and hold its checksum; "
                "the manifest is corrupt, save the checkpoint again"
            )
        _verify_file(directory / name, record, manifest_path)


def _verify_file(path: Path, record: dict, manifest_path: Path) -> None:
    """Size first (free), then the streamed sha256, against one "files" entry."""
    expected_sha, expected_bytes = record.get("sha256"), record.get("bytes")
    if not isinstance(expected_sha, str) or not isinstance(expected_bytes, int):
        raise CheckpointError(
            f"{manifest_path}: entry 'files.{path.name}' needs a string 'sha256' and an integer 'bytes'; "
            "the manifest is corrupt, save the checkpoint again"
        )
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, save it again")
    size = path.stat().st_size
    if size != expected_bytes:
        raise CheckpointError(
            f"{path} was modified or corrupted after it was written: it has {size} bytes, "
            f"{manifest_path.name} recorded {expected_bytes}; write the checkpoint again or restore the file"
        )
    actual_sha = file_sha256(path)
    if actual_sha != expected_sha:
        raise CheckpointError(
            f"{path} was modified or corrupted after it was written: sha256 {actual_sha[:12]}…, "
            f"{manifest_path.name} recorded {expected_sha[:12]}…; write the checkpoint again or restore the file"
        )


class _Loader:
    """Rebuilds the tree from the manifest description, reading tensors by dotted path."""

    def __init__(self, reader, tensors_path: Path, manifest_path: Path, qlinears: dict, version: int):
        self.reader = reader
        self.version = version
        self.keys = set(reader.keys())
        self.tensors_path = tensors_path
        self.manifest_path = manifest_path
        self.qlinears = qlinears
        self.used: set[str] = set()

    def build(self, node: dict, path: tuple):
        name = ".".join(path)
        kind = node.get("kind") if isinstance(node, dict) else None
        if kind == "dict":
            return {key: self.build(child, path + (key,)) for key, child in node["items"].items()}
        if kind in ("list", "tuple"):
            items = [self.build(child, path + (str(i),)) for i, child in enumerate(node["items"])]
            return items if kind == "list" else tuple(items)
        if kind == "none":
            return None
        if kind == "array":
            array = self.tensor(name, tuple(node["shape"]), node["dtype"])
            return jnp.asarray(array)
        if kind == "qlinear":
            return self.qlinear(name)
        raise CheckpointError(f"{self.manifest_path}: tree node at '{name}' has unknown kind {kind!r}; file is corrupt")

    def tensor(self, name: str, shape: tuple | None = None, dtype: str | None = None) -> np.ndarray:
        if name not in self.keys:
            raise CheckpointError(
                f"{self.tensors_path}: tensor '{name}' is missing; the checkpoint is incomplete, save it again"
            )
        self.used.add(name)
        array = self.reader.get_tensor(name)
        if shape is not None and tuple(array.shape) != shape:
            raise CheckpointError(
                f"{self.tensors_path}: tensor '{name}' has shape {tuple(array.shape)}, the manifest says {shape}; "
                "the files do not belong together, save the checkpoint again"
            )
        if dtype is not None and array.dtype.name != dtype:
            raise CheckpointError(
                f"{self.tensors_path}: tensor '{name}' has dtype {array.dtype.name}, the manifest says {dtype}"
            )
        _check_finite(array, name, self.tensors_path)
        return array

    def qlinear(self, name: str) -> QuantizedLinear:
        spec = self.qlinears.get(name)
        if not isinstance(spec, dict):
            raise CheckpointError(f"{self.manifest_path}: field 'qlinears' has no entry for layer '{name}'")
        try:
            segments = tuple(self.segment(name, i, s) for i, s in enumerate(spec["segments"]))
            rank = int(spec["lowrank_rank"])
            ql = QuantizedLinear(
                in_features=int(spec["in_features"]),
                out_features=int(spec["out_features"]),
                perm=self.array(f"{name}.perm"),
                segments=segments,
                lowrank_b=self.array(f"{name}.lowrank_b") if rank else None,
                lowrank_a=self.array(f"{name}.lowrank_a") if rank else None,
                bias=self.array(f"{name}.bias") if spec["has_bias"] else None,
                # Absent in files written before AWQ scaling existed: no scale.
                input_scale=self.array(f"{name}.input_scale") if spec.get("has_input_scale") else None,
            )
        except (KeyError, TypeError) as err:
            raise CheckpointError(
                f"{self.manifest_path}: entry 'qlinears.{name}' lacks or mistypes field {err}; file is corrupt"
            ) from err
        for i, seg in enumerate(segments):
            try:
                seg.validate(ql.out_features)
            except ValueError as err:
                raise CheckpointError(
                    f"{self.tensors_path}: tensors '{name}.seg{i}.*': {err}; the checkpoint is corrupt, save it again"
                ) from err
        try:
            ql.validate()
        except ValueError as err:
            raise CheckpointError(
                f"{self.tensors_path}: layer '{name}': {err}; the checkpoint is corrupt, save it again"
            ) from err
        return ql

    def segment(self, name: str, i: int, spec: dict) -> Segment:
        bits = int(spec["bits"])
        fields = ("dense",) if bits == DENSE_BITS else ("codes", "scale", "zero")
        arrays = {f: self.array(f"{name}.seg{i}.{f}") for f in fields}
        if self.version == 1:
            arrays = _layout1_to_layout2(arrays, bits, int(spec["stop"]) - int(spec["start"]))
        return Segment(
            start=int(spec["start"]),
            stop=int(spec["stop"]),
            bits=bits,
            group_size=int(spec["group_size"]),
            **arrays,
        )

    def array(self, name: str) -> jax.Array:
        return jnp.asarray(self.tensor(name))


def _check_finite(array: np.ndarray, name: str, tensors_path: Path) -> None:
    """Refuse NaN/Inf in a float tensor: the model would run and print or score garbage."""
    # jnp.issubdtype knows bfloat16 (numpy files it as a void type); this runs on the host.
    if jnp.issubdtype(array.dtype, jnp.floating) and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise CheckpointError(
            f"{tensors_path}: tensor '{name}' holds {bad} NaN or Inf value(s) of {array.size}; a model with them "
            "computes garbage. Quantize it again (if it recurs, check the source model and the run's log "
            "for the layer that diverged)"
        )


def _layout1_to_layout2(arrays: dict, bits: int, n_cols: int) -> dict:
    """A format-1 segment's arrays in layout 2 (same values; see the module docstring)."""
    if bits == DENSE_BITS:
        return {"dense": jnp.asarray(arrays["dense"]).T}
    try:
        codes = np.asarray(bitpack.unpack(arrays["codes"], bits, n_cols))  # [out, cols]
        out_features = codes.shape[0]
        zero = np.asarray(bitpack.unpack(arrays["zero"], bits, out_features))  # [groups, out]
    except ValueError as err:
        raise CheckpointError(f"format-1 segment cannot be converted: {err}") from err
    return {
        "codes": jnp.asarray(pack_codes(codes.T, bits)),
        "scale": jnp.asarray(arrays["scale"]).T,
        "zero": jnp.asarray(zero.astype(np.uint8)),
    }
