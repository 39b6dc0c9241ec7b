"""file_sha256: the streamed digest equals hashlib's over the whole file, whatever the chunking."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mpq_jax.digest import file_sha256


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096])
@pytest.mark.parametrize("chunk_bytes", [1, 4096, 1 << 20])
def test_streamed_digest_matches_hashlib(tmp_path, size, chunk_bytes):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path, chunk_bytes=chunk_bytes) == hashlib.sha256(data).hexdigest()


def test_chunk_size_must_be_positive(tmp_path):
    (tmp_path / "blob").write_bytes(b"x")
    with pytest.raises(ValueError, match="chunk_bytes"):
        file_sha256(tmp_path / "blob", chunk_bytes=0)
