"""Resume checkpoints of a block-by-block walk: each finished block written once, on its own.

A walk over the decoder blocks (sequential quantization, a QAT stage's per-block results)
that may be killed keeps its finished blocks in a `BlockStore`:

    <folder>/block_000/   one `mpq_jax.packed.io.save_quantized` checkpoint per finished block:
    <folder>/block_001/     model.safetensors  that block's params pytree, under the key "block"
    ...                     mpq_manifest.json  checksums, tree, and metadata
                                               {"block_store": 1, "fingerprint": ..., "index": i,
                                                "notes": the block's JSON notes}

Block i's folder is written once, when block i is finished, and never rewritten: a run of
n blocks writes each block's tensors exactly once (n writes of one block each, where
rewriting every finished block after every block would write n(n+1)/2 of them). The notes
and the fingerprint travel inside the block's own manifest, so one atomic write holds a block
and everything about it: `save_quantized` writes into a temporary folder beside the target and
renames it into place, so a block folder either is complete or does not exist (a kill mid-write
leaves only a `.block_NNN.tmp-*` folder, removed on the next open).

Reading back (`finished`) takes blocks 0, 1, ... while they exist and verify (sha256,
shapes, NaN/Inf, fingerprint, index):
- a store written under another fingerprint (other model, calibration or settings), or in
  the single-checkpoint layout of earlier versions, is cleared with a warning: start over;
- a block that cannot be read (disk trouble, a partial copy) is moved aside to
  `<folder>.corrupt-<time>/block_NNN` beside the folder (kept for a look at what broke,
  outside the scratch folder a finished run deletes), with a warning, and the blocks after
  it are deleted: the walk continues after the last good block of the contiguous run from 0.

Entries the store does not recognise are left alone.

Not here: what a block is or how it is computed (mpq_jax.capture), the fingerprint
(mpq_jax.fingerprint).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax

from mpq_jax.errors import CheckpointError
from mpq_jax.packed.io import MANIFEST_FILE, TENSORS_FILE, load_quantized, read_metadata, save_quantized

log = logging.getLogger(__name__)

STORE_VERSION = 1
_BLOCK_RE = re.compile(r"block_(\d{3,})")
_LEFTOVER_RE = re.compile(r"\.block_\d{3,}\.(tmp|old)-.*")  # what a killed save_quantized leaves


class BlockStore:
    """Finished blocks of one run (tagged with `fingerprint`) in `folder`, one folder each.

    Call `finished()` first: it checks the folder against the fingerprint, cleans it, and
    loads the finished blocks; `notes()` then holds their merged notes, and `write(i, ...)`
    adds block i, which must be the next one.
    """

    def __init__(self, folder: str | Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self._notes: list[dict] | None = None  # per finished block, in order; None until scanned

    def path(self, index: int) -> Path:
        return self.folder / f"block_{index:03d}"

    def finished(self) -> list[Any]:
        """Params of the finished blocks 0..k-1 (the contiguous good run from block 0), loaded.

        With several processes (one shared folder), process 0 scans first and clears what is
        stale or incomplete; the others read after it."""
        if jax.process_count() == 1:
            return self._scan()
        from mpq_jax import parallel

        blocks = self._scan() if parallel.is_leader() else None
        parallel.sync(f"block store {self.folder} scanned")
        return self._scan() if blocks is None else blocks

    def _scan(self) -> list[Any]:
        self._notes = []
        if not self.folder.is_dir():
            return []
        self._remove_leftovers()
        if (self.folder / MANIFEST_FILE).exists() or (self.folder / TENSORS_FILE).exists():
            log.warning("%s holds a resume checkpoint in an earlier layout (one file for all blocks); starting over", self.folder)
            self._clear()
            return []
        blocks: list[Any] = []
        while self.path(len(blocks)).exists():
            index, path = len(blocks), self.path(len(blocks))
            try:
                metadata = read_metadata(path)
                if index == 0 and metadata.get("fingerprint") != self.fingerprint:
                    log.warning("%s holds a run with other settings; starting over", self.folder)
                    self._clear()
                    return []
                self._check_metadata(metadata, index, path)
                params, metadata = load_quantized(path)
                if not isinstance(params, dict) or set(params) != {"block"}:
                    raise CheckpointError(f"{path} does not hold one block's params under 'block'")
            except CheckpointError as err:
                self._set_aside(index, err)
                break
            blocks.append(params["block"])
            self._notes.append(metadata["notes"])
        self._remove_blocks_from(len(blocks))
        return blocks

    def notes(self) -> dict:
        """The finished blocks' notes merged in block order (a later block's entry wins)."""
        merged: dict = {}
        for notes in self._notes or []:
            merged.update(notes)
        return merged

    def write(self, index: int, block_params: Any, notes: dict | None = None) -> None:
        """Store finished block `index` (the next one) with its JSON-serializable `notes`, atomically."""
        if self._notes is None:
            self._scan()  # checks the fingerprint and cleans up before anything is added
        if index != len(self._notes):
            raise ValueError(f"{self.folder}: block {index} written after {len(self._notes)} finished blocks; blocks are written in order")
        notes = dict(notes or {})
        metadata = {"block_store": STORE_VERSION, "fingerprint": self.fingerprint, "index": index, "notes": notes}
        save_quantized(self.path(index), {"block": block_params}, metadata)
        self._notes.append(notes)

    # ------------------------------------------------------------------ housekeeping

    def _check_metadata(self, metadata: dict, index: int, path: Path) -> None:
        if metadata.get("fingerprint") != self.fingerprint or metadata.get("index") != index:
            raise CheckpointError(
                f"{path} is not block {index} of this run (metadata says block {metadata.get('index')!r}, "
                f"fingerprint {str(metadata.get('fingerprint'))[:12]!r})"
            )
        if not isinstance(metadata.get("notes"), dict):
            raise CheckpointError(f"{path}: metadata field 'notes' is missing or not an object")

    def _set_aside(self, index: int, err: CheckpointError) -> None:
        """Move an unreadable block beside the folder (not delete it) and say so."""
        path = self.path(index)
        aside_dir = self.folder.with_name(f"{self.folder.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        aside = aside_dir / path.name
        try:
            aside_dir.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                aside = aside_dir / f"{path.name}.{time.time_ns()}"
            path.rename(aside)
            where = f"moved it to {aside}"
        except OSError as move_err:
            shutil.rmtree(path, ignore_errors=True)
            where = f"could not move it aside ({move_err}), deleted it"
        then = "starting over" if index == 0 else f"continuing after block {index - 1}"
        log.warning("resume checkpoint %s cannot be read (%s); %s and %s", path, err, where, then)

    def _remove_blocks_from(self, start: int) -> None:
        """Delete block folders from `start` on: after a gap or a bad block they are not trusted."""
        stale = [p for p in self._block_folders() if int(_BLOCK_RE.fullmatch(p.name).group(1)) >= start]
        if stale:
            log.info("%s: discarding %d block(s) after block %d, they will be redone", self.folder, len(stale), start - 1)
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)

    def _block_folders(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if _BLOCK_RE.fullmatch(p.name))

    def _remove_leftovers(self) -> None:
        for p in self.folder.iterdir():
            if _LEFTOVER_RE.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True)

    def _clear(self) -> None:
        """Remove what this store (or the earlier single-checkpoint layout) wrote; nothing else."""
        for p in self._block_folders():
            shutil.rmtree(p, ignore_errors=True)
        for name in (MANIFEST_FILE, TENSORS_FILE):
            (self.folder / name).unlink(missing_ok=True)
        self._notes = []
