"""A run directory's JSON files, read one way by everything that reads them.

The store writes them (server/app/store.py); the best-round keeper, the tracker and
``fedfusion export`` read them too. Kept apart from the store, which imports torch and
the best-round keeper, so that those readers need neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["RunDirError", "read_run_file"]


class RunDirError(RuntimeError):
    """The output directory holds a run that this one must not continue or overwrite."""


def read_run_file(path: Path) -> dict[str, Any] | None:
    """A run directory's JSON file (None if absent); RunDirError if it is not one."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path} cannot be read ({err}): it is not a fedfusion run") from err
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is not a fedfusion run file")
    return data
