"""`python -m client.node.superexec ARGS`: Flower's SuperExec, picking up a message sooner.

Flower's SuperNode starts ``flower-superexec`` (by name, from PATH), which asks the
SuperNode for a new message to run every ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds
(Flower: 1 s; ``fedfusion hospital`` sets 0.2 s) and starts a ClientApp process for each.
Every message of a round waits for that poll: on average half an interval, and the
server waits for the slowest hospital.

The next message of a round usually follows soon after a ClientApp has answered (the
server collects the replies and sends the next stage), so, as the SuperNode's idle poll
does (``client/node/supernode.py``), this poll is adaptive: once a ClientApp process it
started has ended, the next poll comes after ``FIRST_TASK_POLL`` (20 ms) and each empty
one waits ``TASK_GROWTH`` times longer, back to the configured interval. Each poll is a
request to the hospital's own SuperNode on loopback, never to the server: about 25 more
per message, within about 2 s of its reply. An idle hospital polls as before.

``fedfusion hospital`` puts a ``flower-superexec`` that runs this module first on the
SuperNode's PATH (:func:`superexec_script`). Nothing else changes. The module imports
Flower only, never torch.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from client.node import flwr_compat
from client.node.pinned import module_script

__all__ = [
    "FIRST_TASK_POLL",
    "TASK_GROWTH",
    "TaskClock",
    "adapt_task_polls",
    "main",
    "superexec_script",
]

FIRST_TASK_POLL = 0.02  # seconds: the first task poll after a ClientApp process ended
TASK_GROWTH = 1.1  # each empty task poll after that waits this much longer


class TaskClock:
    """The ``time`` module for Flower's SuperExec loop: its task poll adaptive.

    :meth:`started` records each ClientApp process launched; when one has ended, the
    next task poll (a ``sleep`` of ``task_poll`` seconds) waits ``FIRST_TASK_POLL`` and
    each one after it ``TASK_GROWTH`` times longer, up to ``task_poll``. Other sleeps are
    Flower's own.
    """

    def __init__(self, task_poll: float) -> None:
        self.task_poll = task_poll
        self.next = task_poll  # the next task poll
        self.running: list[subprocess.Popen] = []

    def started(self, process: subprocess.Popen) -> None:
        """A ClientApp process was launched."""
        self.running.append(process)

    def sleep(self, seconds: float) -> None:
        """Sleep as Flower asked; its task poll adaptively."""
        if seconds != self.task_poll:
            time.sleep(seconds)
            return
        still = [p for p in self.running if p.poll() is None]  # poll() also reaps
        if len(still) < len(self.running):  # a reply was just given: a message may follow
            self.next = min(FIRST_TASK_POLL, self.task_poll)
        self.running = still
        wait, self.next = self.next, min(self.next * TASK_GROWTH, self.task_poll)
        time.sleep(wait)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def _recording_subprocess(clock: TaskClock) -> SimpleNamespace:
    """The ``subprocess`` module for Flower's executor: every ``Popen`` recorded."""

    def popen(*args: object, **kwargs: object) -> subprocess.Popen:
        process = subprocess.Popen(*args, **kwargs)  # type: ignore[call-overload]
        clock.started(process)
        return process

    return SimpleNamespace(**{**vars(subprocess), "Popen": popen})


def adapt_task_polls() -> TaskClock:
    """Make this process's SuperExec loop poll for tasks adaptively; returns its clock."""
    loop, executor = flwr_compat.superexec_modules()
    clock = TaskClock(loop._get_task_poll_interval())
    loop.time = clock  # type: ignore[attr-defined]
    executor.subprocess = _recording_subprocess(clock)  # type: ignore[attr-defined]
    return clock


def superexec_script(directory: Path) -> Path:
    """A ``flower-superexec`` in ``directory`` (for the SuperNode's PATH) that runs this."""
    return module_script(directory, "flower-superexec", "client.node.superexec")


def main() -> None:
    """Run Flower's ``flower-superexec`` with the adaptive task poll."""
    adapt_task_polls()
    sys.argv[0] = "flower-superexec"
    flwr_compat.entry(flwr_compat.SUPEREXEC)()


if __name__ == "__main__":
    main()
