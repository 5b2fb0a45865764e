"""The privacy ledger's file: a lock, and its checksum.

Kept apart from the ledger's content (client/dp/ledger.py): how two of a hospital's
messages running at once take turns. The file itself is written atomically and synced
by :mod:`shared_model.files`, so a crash leaves the old or the new version, never half.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["checksum", "ledger_lock"]

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


def checksum(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``body``, as written in the file."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
