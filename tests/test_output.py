"""Atomic writes: the result replaces the target whole, a failed write leaves nothing, and the
file gets the mode a plain open() would give it (not tempfile's owner-only 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from mpq_jax.output import atomic_path, atomic_write_text, umask_mode


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_text_gives_umask_mode(tmp_path, umask):
    target = tmp_path / "new" / "report.json"
    atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert mode(target) == 0o666 & ~umask
    assert mode(target.parent) == 0o777 & ~umask
    atomic_write_text(target, "[]\n")  # replacing keeps the plain mode too
    assert target.read_text() == "[]\n" and mode(target) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_umask_mode_reads_without_changing_the_umask(umask):
    assert (umask_mode(False), umask_mode(True)) == (0o666 & ~umask, 0o777 & ~umask)
    assert os.umask(umask) == umask


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.md"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
