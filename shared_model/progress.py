"""Progress of long work on stderr: rich bars in a terminal, a plain line now and then elsewhere.

In a terminal (a person watching) each stage gets a bar with a count and the time left.
Anywhere else (CI, systemd, docker logs) a bar would be noise: a line
``stage: done/total unit`` every few seconds instead. Imports rich (a dependency of
Flower and typer) only, never torch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["LINE_EVERY", "Advance", "progress"]

LINE_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal
Advance = Callable[[str, int], None]  # advance(stage, n): n more units done in stage


@contextmanager
def progress(total: int, unit: str = "records") -> Iterator[Advance]:
    """Yield ``advance(stage, n)``; every stage counts up to ``total`` ``unit``."""
    # rich loads when a bar is shown: the CLI modules import this one at start-up
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        done: dict[str, int] = {}
        last = [time.monotonic()]

        def line(stage: str, n: int) -> None:
            done[stage] = done.get(stage, 0) + n
            if time.monotonic() - last[0] >= LINE_EVERY:
                last[0] = time.monotonic()
                print(f"{stage}: {done[stage]}/{total} {unit}", file=sys.stderr, flush=True)

        yield line
        return
    if _live:  # inside another bar (a benchmark's part, say): more bars in the same display
        yield from _bars(_live[-1], total)
        return
    with Progress(
        "[bold]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bars:
        _live.append(bars)
        try:
            yield from _bars(bars, total)
        finally:
            _live.pop()


_live: list[Any] = []  # the rich Progress showing now (rich allows one live display)


def _bars(bars: Any, total: int) -> Iterator[Advance]:
    """Yield ``advance`` adding one bar per stage to ``bars``; remove them afterwards."""
    tasks: dict[str, Any] = {}

    def advance(stage: str, n: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total)
        bars.advance(tasks[stage], n)

    try:
        yield advance
    finally:
        for task in tasks.values():
            bars.remove_task(task)
