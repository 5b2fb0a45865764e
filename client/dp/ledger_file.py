"""The privacy ledger's file: atomic, synced writes, a lock, and its checksum.

Kept apart from the ledger's content (client/dp/ledger.py): how a file is written so
that a crash leaves the old or the new version, never half of one, and how two of a
hospital's messages running at once take turns.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["checksum", "ledger_lock", "write_synced"]

_LOCKS_HELD: dict[Path, int] = {}  # this process's ledger locks, by folder (re-entrant)


@contextmanager
def ledger_lock(state_dir: Path) -> Iterator[None]:
    """An exclusive lock (fcntl.flock) on a hospital's ledger folder, for a ledger change.

    Flower may run two of a hospital's messages at once, each its own process: every
    read-modify-write of the ledger holds this lock. Re-entrant within a process.
    """
    folder = Path(state_dir).resolve()
    if _LOCKS_HELD.get(folder):
        _LOCKS_HELD[folder] += 1
        try:
            yield
        finally:
            _LOCKS_HELD[folder] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".ledger.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        _LOCKS_HELD[folder] = 1
        try:
            yield
        finally:
            del _LOCKS_HELD[folder]
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_synced(path: Path, text: str, make_folder: bool = True) -> None:
    """Write atomically: a temporary file in the same directory, fsync, rename, fsync dir."""
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ledger-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        Path(tmp).unlink(missing_ok=True)


def checksum(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``body``, as written in the file."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
