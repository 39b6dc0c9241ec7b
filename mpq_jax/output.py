"""Atomic file writes: results appear whole or not at all (temp path in the same folder, then
rename), with the modes a plain `open()` or `mkdir()` would have given them.

`tempfile` creates its files 0600 and folders 0700 on purpose; renamed into place as they
are, a report or packed model would be readable by its owner only. `apply_umask_mode`
restores the usual 0666 / 0777 masked by the process umask.

Not for: packed checkpoints' directory swap (see `mpq_jax.packed.io`, which uses the mode
helper from here).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def umask_mode(is_dir: bool) -> int:
    """The mode a new file (0o666) or folder (0o777) gets under the current umask."""
    # The only portable way to read the umask is to set it; it is put back at once. (A
    # thread creating a file in between would get the unmasked mode: we create none.)
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if is_dir else 0o666) & ~mask


def apply_umask_mode(path: str | Path, is_dir: bool = False) -> None:
    """chmod `path` (made by tempfile, so 0600 / 0700) to what open()/mkdir() would have made."""
    os.chmod(path, umask_mode(is_dir))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path` to write to; it replaces `path` when the block ends cleanly
    and is removed if the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        apply_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
