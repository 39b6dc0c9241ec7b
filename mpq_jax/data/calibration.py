"""Calibration text for post-training quantization, drawn from named sources.

A source is a file of documents (JSON lines, a plain text file, or a `datasets` dataset
saved with `save_to_disk`). Each source is tokenized document by document, the documents
are joined with EOS into one token stream, and `n_samples` windows of `seq_len` tokens are
drawn from it: `calibration_tokens(tokenizer, sources, n_samples, seq_len, seed)` returns
`{source name: int32 [n_samples, seq_len]}`.

The default sources are the `calib.jsonl` splits under `$MPQ_SHARED_DIR/data/corpora/sources/`
(web, wikipedia, code, qa, arxiv); their `heldout.jsonl` splits are for evaluation
(`heldout_tokens`, scored by perplexity) and never feed calibration.

Not for: running the model on the windows (Hessians, activation statistics) or mixing
sources into one budget; callers decide how many samples each source gets.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from mpq_jax.data.paths import shared_dir
from mpq_jax.data.text import read_jsonl, token_stream
from mpq_jax.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_SOURCE_NAMES = ("web", "wikipedia", "code", "qa", "arxiv")

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".txt": "text"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationSource:
    name: str  # key of this source's windows in `calibration_tokens`; also seeds its sampling
    path: str  # a .jsonl file, a .txt file, or a directory written by `Dataset.save_to_disk`
    format: Literal["jsonl", "text", "datasets"] | None = None  # None: .jsonl, .txt or a directory
    text_field: str = "text"  # JSON key (jsonl) or column (datasets) holding each document


@dataclasses.dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    sources: tuple[str, ...] = ("wikipedia",)  # source names: defaults or keys of `paths`
    n_samples: int = 64  # windows drawn from each source
    seq_len: int = 512  # tokens per window
    seed: int = 0  # base seed; each source samples with a seed derived from it and its name
    paths: dict[str, str] | None = None  # name -> file or dataset directory, overriding a default
    text_field: str = "text"  # JSON key (.jsonl) or column (datasets) holding each document, in `paths` sources


def default_sources(names: tuple[str, ...] | list[str] = DEFAULT_SOURCE_NAMES) -> list[CalibrationSource]:
    """The shared corpora's calibration splits (`sources/<name>/calib.jsonl`) for `names`."""
    unknown = [name for name in names if name not in DEFAULT_SOURCE_NAMES]
    if unknown:
        raise ConfigError(
            f"unknown calibration source {unknown[0]!r}; known sources: {', '.join(DEFAULT_SOURCE_NAMES)} "
            "(or give a path for a custom source)"
        )
    root = shared_dir() / "data" / "corpora" / "sources"
    return [CalibrationSource(name=name, path=str(root / name / "calib.jsonl")) for name in names]


def sources_from_config(cfg: CalibrationConfig) -> list[CalibrationSource]:
    """One source per name in `cfg.sources`; a name in `cfg.paths` uses that path instead of the default.

    A name in `cfg.paths` that `cfg.sources` does not list is an error rather than silently unused.
    """
    paths = cfg.paths or {}
    unused = sorted(set(paths) - set(cfg.sources))
    if unused:
        raise ConfigError(
            f"calibration.paths.{unused[0]}: not listed in calibration.sources ({', '.join(cfg.sources)}); "
            "add it there or remove the path"
        )
    return [
        CalibrationSource(name=name, path=paths[name], text_field=cfg.text_field) if name in paths else default_sources((name,))[0]
        for name in cfg.sources
    ]


def _source_format(source: CalibrationSource, path: Path) -> str:
    if source.format is not None:
        return source.format
    if path.is_dir():
        return "datasets"
    if path.suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix]
    raise ConfigError(
        f"calibration source {source.name!r}: cannot tell the format of {path} from its name; "
        "use a .jsonl or .txt file, a saved datasets directory, or set format"
    )


def _read_dataset(path: Path, text_field: str) -> list[str]:
    import datasets  # heavy import, only needed for this format

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ConfigError(f"{path}: dataset has no 'train' split (splits: {', '.join(data)})")
        data = data["train"]
    if text_field not in data.column_names:
        raise ConfigError(f"{path}: no column {text_field!r} (columns: {', '.join(data.column_names)}); set calibration.text_field")
    return list(data[text_field])


def source_format(source: CalibrationSource) -> str:
    """The format `source` is read in; ConfigError if its file is missing or of unknown kind
    (the check pre-flight runs before anything is loaded, without reading the file)."""
    path = Path(source.path)
    if not path.exists():
        raise ConfigError(f"calibration source {source.name!r}: {path} not found")
    return _source_format(source, path)


def read_documents(source: CalibrationSource) -> list[str]:
    """The documents of `source`, in file order: one per JSON line, the whole text file, or one per dataset row."""
    path = Path(source.path)
    fmt = source_format(source)
    try:
        if fmt == "jsonl":
            return read_jsonl(path, source.text_field, "set calibration.text_field to the key holding the text")
        if fmt == "text":
            return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"calibration source {source.name!r}: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"calibration source {source.name!r}: cannot read {path} ({exc.strerror or exc})") from None
    return _read_dataset(path, source.text_field)


def sample_windows(tokens: np.ndarray, n_samples: int, seq_len: int, seed: int) -> np.ndarray:
    """`n_samples` distinct, non-overlapping windows of `tokens` [total]: int32 [n_samples, seq_len].

    The stream is cut into `len(tokens) // seq_len` aligned slots (the tail is dropped) and
    `n_samples` distinct slots are drawn without replacement and kept in stream order. GPTQ's
    reference instead draws independent random start offsets, which may overlap and so repeat
    text; distinct slots give every sample new text at the cost of fixed alignment.
    """
    if n_samples < 1 or seq_len < 1:
        raise ConfigError(f"n_samples and seq_len must be positive, got n_samples={n_samples}, seq_len={seq_len}")
    slots = len(tokens) // seq_len
    if slots < n_samples:
        raise ConfigError(
            f"the source has {len(tokens)} tokens but {n_samples} x {seq_len} = {n_samples * seq_len} were asked; "
            "ask for fewer samples (n_samples) or shorter ones (seq_len), or add text to the source"
        )
    chosen = np.sort(np.random.default_rng(seed).choice(slots, size=n_samples, replace=False))
    return np.asarray(tokens[: slots * seq_len], dtype=np.int32).reshape(slots, seq_len)[chosen]


def source_seed(seed: int, name: str) -> int:
    """The sampling seed of source `name`: a CRC-32, so it is the same in every process
    (Python's `hash` of a str is randomized per process)."""
    return zlib.crc32(f"{seed}/{name}".encode())


def heldout_path(name: str) -> Path:
    """The heldout split of default source `name` (scored by perplexity, never calibrated on)."""
    (source,) = default_sources((name,))
    return Path(source.path).with_name("heldout.jsonl")


def heldout_tokens(tokenizer, name: str) -> np.ndarray:
    """The EOS-joined token stream of default source `name`'s heldout split (for perplexity)."""
    (source,) = default_sources((name,))
    heldout = dataclasses.replace(source, path=str(heldout_path(name)))
    return token_stream(tokenizer, read_documents(heldout))


def calibration_tokens(
    tokenizer, sources: list[CalibrationSource], n_samples: int, seq_len: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per source name, int32 [n_samples, seq_len] windows of its EOS-joined token stream."""
    names = [source.name for source in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"calibration source {duplicates[0]!r} is listed more than once; names must be unique")
    windows = {}
    for source in sources:
        documents = read_documents(source)
        tokens = token_stream(tokenizer, documents)
        try:
            windows[source.name] = sample_windows(tokens, n_samples, seq_len, source_seed(seed, source.name))
        except ConfigError as exc:
            raise ConfigError(f"calibration source {source.name!r} ({source.path}): {exc}") from None
        log.info(
            "calibration source %s: %d documents, %d tokens, %d windows of %d tokens",
            source.name, len(documents), len(tokens), n_samples, seq_len,
        )
    return windows
