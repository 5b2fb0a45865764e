"""Per-hop timestamps of a deployed round, for the engineer measuring it; off by default.

With ``FEDFUSION_TIMELINE=/path/file.jsonl`` in the environment, every fedfusion process
of a deployment that passes a hop (the ServerApp sending a stage and reading replies,
a hospital's SuperNode pulling a message and pushing its reply, the fork server
starting a ClientApp, the ClientApp handling it) appends one JSON line: wall-clock time,
process id, the event and a few identifiers (stage, node id). Nothing a message carries
is written: no weights, metrics or keys. The processes all inherit the variable from the
one that starts the deployment, so one file holds the whole round;
``benchmarks/timeline.py`` turns it into a table.

Unset (the default), :func:`mark` costs one environment lookup.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["TIMELINE_ENV", "enabled", "mark", "read"]

TIMELINE_ENV = "FEDFUSION_TIMELINE"


def enabled() -> bool:
    """Whether this process records its hops."""
    return bool(os.environ.get(TIMELINE_ENV))


def mark(event: str, **fields: str | int | float | None) -> None:
    """Append ``event`` with the time now to the timeline file, if one is set.

    One ``write`` of one line to a file opened for appending, so lines from concurrent
    processes never interleave. A failure to write is ignored: timing never breaks a round.
    """
    path = os.environ.get(TIMELINE_ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields})
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)
    except OSError:
        pass


def read(path: Path) -> list[dict[str, Any]]:
    """The events of a timeline file, in time order (a torn last line is skipped)."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sorted(events, key=lambda e: float(e["t"]))
