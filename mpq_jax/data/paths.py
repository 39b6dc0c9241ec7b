"""Where things live: the shared data (corpora, tasks) — `$MPQ_SHARED_DIR`, else `../shared`
beside the repo — and mpq-jax's caches (`$MPQ_CACHE_DIR`, else `~/.cache/mpq_jax`).

Not for: reading the files themselves (see `mpq_jax.eval.perplexity` and the calibration
loaders).
"""

from __future__ import annotations

import os
from pathlib import Path

from mpq_jax.errors import ConfigError

SHARED_ENV = "MPQ_SHARED_DIR"
CACHE_ENV = "MPQ_CACHE_DIR"  # where converted tokenizers and calibration Hessians are cached
_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """The shared data folder; raises ConfigError saying how to point at it when absent."""
    candidates = [Path(os.environ[SHARED_ENV])] if os.environ.get(SHARED_ENV) else []
    candidates += [_REPO_ROOT.parent / "shared", Path.cwd().parent / "shared"]
    for path in candidates:
        if (path / "data").is_dir():
            return path
    raise ConfigError(
        f"shared data folder not found (looked in {', '.join(map(str, candidates))}); "
        f"set {SHARED_ENV} to the folder that holds data/corpora"
    )


def wikitext2_test_path() -> Path:
    return shared_dir() / "data" / "corpora" / "wikitext2" / "wiki.test.txt"


def cache_dir() -> Path:
    """Root of mpq-jax's caches: `$MPQ_CACHE_DIR`, else `~/.cache/mpq_jax`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mpq_jax")
