"""Files written atomically: a crash leaves the old version or the new one, never half.

Every writer goes the same way: a temporary file in the target's own directory (a
rename is atomic only within one file system), its bytes flushed to disk, a rename over
the target, then the directory flushed so that the rename itself survives a power
loss. A failure before the rename removes the temporary file and leaves the target as
it was.

``mode`` is the new file's permission bits, set exactly (whatever the umask). The
default, 0600, is private: run records and ledgers stay their owner's. ``mode=None``
gives what ``open()`` would (0666 less the umask), for files meant to be read by others.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "PRIVATE",
    "write_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

PRIVATE = 0o600


def _temporary(path: Path, mode: int | None) -> Path:
    """A new, empty file beside ``path`` with ``mode``, created exclusively."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        except FileExistsError:  # another writer's name: draw again
            continue
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # exact, not reduced by the umask
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return tmp


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(
    path: Path,
    write: Callable[[Path], object],
    *,
    mode: int | None = PRIVATE,
    make_parents: bool = True,
) -> None:
    """Write ``path`` by calling ``write(tmp)`` on a temporary file, then renaming it.

    ``write`` is any function that writes a file at the path it is given, e.g.
    ``lambda tmp: torch.save(obj, tmp)`` or safetensors' ``save_file``; it finds the
    temporary file already there, empty, with its mode. ``make_parents=False``: a
    missing folder is an error (FileNotFoundError), not created.
    """
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, mode)
    try:
        write(tmp)
        if mode is not None:
            tmp.chmod(mode)  # in case ``write`` replaced the file rather than filled it
        _fsync(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def write_bytes_atomic(
    path: Path, data: bytes, *, mode: int | None = PRIVATE, make_parents: bool = True
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_bytes(data), mode=mode, make_parents=make_parents)


def write_text_atomic(
    path: Path,
    text: str,
    *,
    encoding: str = "utf-8",
    mode: int | None = PRIVATE,
    make_parents: bool = True,
) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`write_atomic`)."""
    write_bytes_atomic(path, text.encode(encoding), mode=mode, make_parents=make_parents)


def write_json_atomic(path: Path, data: Any, *, mode: int | None = PRIVATE) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (see :func:`write_atomic`).

    The text is made before the file is touched, so data that cannot be written as JSON
    leaves no trace.
    """
    write_text_atomic(path, json.dumps(data, indent=2), mode=mode)
