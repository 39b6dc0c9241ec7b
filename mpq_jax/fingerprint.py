"""Fingerprints: what every cache entry and resume checkpoint was computed from, keyed by content.

A run reuses earlier work from three places: the unquantized model's input statistics
(`HessianCache`, keyed by `calibration_fingerprint`), a killed run's block checkpoints
(`output_dir/.resume`, keyed by `run_fingerprint`) and the FP model's evaluation
(`$MPQ_CACHE_DIR/eval/`, keyed by `eval_fingerprint`); a GGUF's converted tokenizer is cached
under its file's digest. Each key starts from `model_identity`: the sha256 of every file the
loader reads (weights, config, tokenizer), never the path, so replacing the weights inside
the same folder misses every cache, and the same weights under another path hit them.

Why whole-content hashes rather than size + mtime + a header hash: two fine-tunes of one
architecture have byte-identical safetensors headers and equal sizes, and `cp -p`, `rsync -a`
and unpacking an archive all restore mtimes, so only the content tells such files apart.
Hashing costs one sequential read per file version (SmolLM2's 98 MB GGUF: 0.1 s here; a 7B
model's 14 GB: ~15 s, once): digests are memoized in `$MPQ_CACHE_DIR/file_digests.json`
under (size, mtime_ns, ctime_ns, inode). ctime cannot be set from user space and changes with
every write, so a rewritten file is always hashed again.

Not for: checking a packed model's integrity on load (`mpq_jax.packed.io` verifies the
digests its manifest records), or where files live (`mpq_jax.data.paths`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from mpq_jax.data.paths import cache_dir
from mpq_jax.digest import file_sha256
from mpq_jax.output import atomic_write_text
from mpq_jax.packed.io import MANIFEST_FILE, TENSORS_FILE

log = logging.getLogger(__name__)

# Bumped whenever what a fingerprint covers changes, so that no older entry is read as current.
FINGERPRINT_VERSION = 2
DIGEST_MEMO_FILE = "file_digests.json"
# Every file AutoTokenizer may read from a folder: each one present is part of the model.
# (A superset of checkpoint.TOKENIZER_FILES, the ones whose presence means a tokenizer is there.)
TOKENIZER_PARTS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _memo_path() -> Path:
    return cache_dir() / DIGEST_MEMO_FILE


def _read_memo() -> dict:
    try:
        memo = json.loads(_memo_path().read_text(encoding="utf-8"))
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}  # no memo yet, or a damaged one: hashing again is always correct


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content, memoized per file version (see the module docstring)."""
    path = Path(path).resolve()
    key = _stat_key(path)
    memo = _read_memo()
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stat") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    size = key[0]
    if size > 1 << 30:
        log.info("hashing %s (%.1f GB) once, to key the caches by its content", path, size / 1e9)
    digest = file_sha256(path)
    if _stat_key(path) != key:  # written while we read it: do not remember a torn digest
        return digest
    memo = _read_memo()  # another process may have added entries meanwhile
    memo[str(path)] = {"stat": key, "sha256": digest}
    try:
        atomic_write_text(_memo_path(), json.dumps(memo, indent=0, sort_keys=True) + "\n")
    except OSError as exc:  # a read-only cache only costs speed
        log.debug("digest memo not written (%s)", exc)
    return digest


def model_files(path: str | Path) -> list[Path]:
    """The files a model is made of, as `mpq_jax.models.load_model` reads them: a GGUF file
    itself; a packed folder's manifest and tensors; a Hugging Face folder's config.json,
    safetensors index and shards (or model.safetensors); and any tokenizer files beside them."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / MANIFEST_FILE).is_file():
        files = [path / MANIFEST_FILE, path / TENSORS_FILE]
    else:
        files = [path / "config.json"]
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                shards = []  # the loader names the broken index; here it only keys caches
            files += [index] + [path / name for name in shards]
        else:
            files.append(path / "model.safetensors")
    files += [path / name for name in TOKENIZER_PARTS]
    return [f for f in files if f.is_file()]


def files_identity(files: Iterable[Path], root: Path | None = None) -> dict[str, str]:
    """{name: sha256} for files, named relative to `root` (or by file name)."""
    identity = {}
    for f in files:
        name = str(f.relative_to(root)) if root is not None else f.name
        identity[name] = file_digest(f)
    return identity


def model_identity(path: str | Path, dtype: str) -> dict:
    """What a loaded model is: the content of each of its files and the dtype it is cast to.

    `path` is the resolved model path (a file or folder; see
    `mpq_jax.models.checkpoint.resolve_model_source`), not the default model's name."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    return {"files": files_identity(model_files(path), root), "dtype": dtype}


def fingerprint(identity: Mapping, arrays: Mapping[str, np.ndarray] | None = None) -> str:
    """16 hex digits of sha256 over a JSON-able identity and, optionally, named arrays (tokens)."""
    digest = hashlib.sha256(json.dumps({"version": FINGERPRINT_VERSION, **identity}, sort_keys=True, default=str).encode())
    for name in sorted(arrays or {}):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode() + array.tobytes())
    return digest.hexdigest()[:16]


def calibration_fingerprint(model: dict, calibration: Mapping[str, np.ndarray]) -> str:
    """Key of the unquantized model's input statistics: model identity and calibration tokens."""
    return fingerprint({"kind": "statistics", "model": model}, calibration)


def run_fingerprint(model: dict, quantization, calibration_config, calibration: Mapping[str, np.ndarray]) -> str:
    """Key of a run's resume checkpoints: model, quantization and calibration settings, tokens."""
    identity = {
        "kind": "run",
        "model": model,
        "quantization": dataclasses.asdict(quantization),
        "calibration": dataclasses.asdict(calibration_config),
    }
    return fingerprint(identity, calibration)


def eval_fingerprint(model: dict, eval_config, data_files: Iterable[Path] = ()) -> str:
    """Key of a cached evaluation: model, eval settings, and the content of the text and task
    files it reads (`data_files`)."""
    # By position (the order of the sets and tasks in eval_config) with folder and file as a
    # readable label, never by absolute path; a list, so two files with the same label
    # (a/x.txt and b/a/x.txt as perplexity sets) both count.
    data = [[f"{Path(f).parent.name}/{Path(f).name}", file_digest(f)] for f in data_files if Path(f).is_file()]
    return fingerprint({"kind": "eval", "model": model, "eval": dataclasses.asdict(eval_config), "data": data})


def folder_files(folder: str | Path) -> list[Path]:
    """Every regular file directly inside `folder`, sorted (a task-YAML folder, for instance)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def tokenizer_cache_key(gguf_path: str | Path) -> str:
    """Folder name of a GGUF's converted tokenizer in the cache: its stem and content digest."""
    return f"{Path(gguf_path).stem}-{file_digest(gguf_path)[:16]}"


def qat_fingerprint(model: dict, quantization, calibration_config, qat_config, tokens: np.ndarray) -> str:
    """Key of a QAT run's checkpoints: what the PTQ run was (model, method, calibration), the
    QAT settings, and the training tokens; any change starts training over."""
    identity = {
        "kind": "qat",
        "model": model,
        "quantization": dataclasses.asdict(quantization),
        "calibration": dataclasses.asdict(calibration_config),
        "qat": dataclasses.asdict(qat_config),
    }
    return fingerprint(identity, {"tokens": tokens})
