"""Content digests of files, read in fixed-size chunks so a multi-gigabyte checkpoint never
sits in memory at once.

The packed format records `file_sha256` of each tensor file in its manifest and checks it
on load (mpq_jax.packed.io); model fingerprints hash model files with it too. Not for:
hashing arrays or configs in memory (hash their bytes with hashlib directly).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 4 << 20  # 4 MiB: large enough that the hash, not the syscalls, sets the speed


def file_sha256(path: str | Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of the file at `path`, streamed `chunk_bytes` at a time."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()
