"""The SuperExec polls for a message soon after a ClientApp answered (client/node/superexec.py)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.node import flwr_compat
from client.node.superexec import (
    FIRST_TASK_POLL,
    TASK_GROWTH,
    TaskClock,
    adapt_task_polls,
    superexec_script,
)

ROOT = Path(__file__).resolve().parents[3]


class FakeProcess:
    """A ClientApp process: running until ``end()``."""

    def __init__(self) -> None:
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code

    def end(self) -> None:
        self.code = 0


def test_after_a_clientapp_ends_the_task_poll_starts_fast_and_backs_off(monkeypatch):
    # Prepare
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = TaskClock(0.2)
    process = FakeProcess()
    # Execute: idle, then a ClientApp runs, then it has answered
    clock.sleep(0.2)
    clock.started(process)  # type: ignore[arg-type]
    clock.sleep(0.2)
    process.end()
    for _ in range(40):
        clock.sleep(0.2)
    clock.sleep(5.0)  # not the task poll: Flower's own wait
    # Assert
    assert slept[:2] == [0.2, 0.2]  # idle, and while the ClientApp runs: as configured
    after = slept[2:-1]
    assert after[0] == FIRST_TASK_POLL
    assert all(b == pytest.approx(min(a * TASK_GROWTH, 0.2)) for a, b in itertools.pairwise(after))
    assert sum(after[: after.index(0.2)]) < 2.5  # back to the interval within 2.5 s
    assert after[-1] == 0.2 and slept[-1] == 5.0
    assert clock.running == []  # the ended process is forgotten (and reaped)


def test_the_executor_records_every_clientapp_it_starts(monkeypatch):
    """Flower's executor starts ClientApps with subprocess.Popen: each one is recorded."""
    loop, executor = flwr_compat.superexec_modules()
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(executor, "subprocess", executor.subprocess)
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.3")
    clock = adapt_task_polls()
    assert loop.time is clock and clock.task_poll == 0.3
    assert executor.subprocess.DEVNULL == subprocess.DEVNULL  # the rest is subprocess's
    process = executor.subprocess.Popen([sys.executable, "-c", "pass"])
    assert clock.running == [process]
    process.wait()


def test_the_superexec_command_runs_flowers_superexec_through_this_module(tmp_path):
    # Prepare
    script = superexec_script(tmp_path / "bin")
    # Execute
    shown = subprocess.run(
        [str(script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )
    # Assert
    assert script.name == "flower-superexec" and os.access(script, os.X_OK)
    assert "-m client.node.superexec" in script.read_text()
    assert shown.returncode == 0, shown.stderr
    assert "--runtime-api-address" in shown.stdout  # Flower's own SuperExec answered
