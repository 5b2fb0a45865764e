"""A server killed at any moment resumes after its last complete round, losing nothing.

``RunStore.begin`` decides where a restarted run continues: the last round whose
metrics record and checkpoint both exist, with that round's global model and the
history before it. A finished run is never overwritten, an unfinished one is resumed
only with the same settings and frozen weights, and only one server process writes a
run at a time. The end-to-end kills (ServerApp, SuperLink) are in tests/e2e.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from server.app.rounds import PlainRounds, run_rounds
from server.app.store import (
    RoundRecord,
    RunDirError,
    RunFinishedError,
    RunStore,
    restore_optimizer,
)
from server.app.strategy import build_strategy
from shared_model.config import RunConfig
from shared_model.server_optimizer import ServerOptimizer
from tests.support.grids import LAYOUT, START, Grid
from tests.support.grids import _task as _task  # the autouse fixture

CONFIG = {"num-rounds": 3, "seed": 7}


def record(server_round: int) -> RoundRecord:
    return RoundRecord(server_round, 0.5, None, None, {}, [], 0.1)


def killed_after_round_one(root) -> None:
    """A run whose server process died after completing round 1."""
    store = RunStore(root)
    store.begin(CONFIG, "base")
    store.save_round(record(1), {"w": torch.ones(4)})
    store.release()  # the process died: the kernel drops its lock


def test_a_new_directory_starts_a_run_and_an_unfinished_one_resumes(tmp_path):
    store = RunStore(tmp_path)
    assert store.begin(CONFIG, "base") is None
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "running"
    for r in range(3):
        store.save_round(record(r), {"w": torch.full((4,), float(r))})
    store.release()  # killed: no finish(), run.json still says running; the lock drops

    again = RunStore(tmp_path)
    point = again.begin(CONFIG, "base")
    assert point is not None and point.round == 2 and point.attempt == 2
    assert torch.equal(point.state["w"], torch.full((4,), 2.0))
    assert [r["round"] for r in again.rounds] == [0, 1, 2]  # the history is kept
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "running"
    assert info["attempts"][0]["resumed_after_round"] == 2
    assert info["attempts"][0]["after_status"] == "running"
    again.save_round(record(3), {"w": torch.full((4,), 3.0)})
    again.finish("completed", {"w": torch.full((4,), 3.0)})
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]


def test_a_failed_run_resumes_too_and_a_run_with_no_round_starts_over(tmp_path):
    store = RunStore(tmp_path)
    store.begin(CONFIG, "base")
    store.finish("failed", error="FederationError: too few")
    assert RunStore(tmp_path).begin(CONFIG, "base") is None  # no round complete: start over
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["attempts"][0]["after_error"] == "FederationError: too few"
    assert "error" not in info


@pytest.mark.fault(
    "A kill between a checkpoint and its record; a checkpoint deleted by hand",
    "The run resumes from the last round that has both",
    "every complete round",
)
def test_a_round_is_complete_only_with_its_record_and_its_checkpoint(tmp_path):
    store = RunStore(tmp_path)
    store.begin(CONFIG, "base")
    for r in range(3):
        store.save_round(record(r), {"w": torch.full((4,), float(r))})
    store.release()
    # killed after writing round 3's checkpoint, before its record
    (tmp_path / "checkpoints" / "round-0003.safetensors").write_bytes(
        (tmp_path / "checkpoints" / "round-0002.safetensors").read_bytes()
    )
    # and a record whose checkpoint was lost (deleted by hand)
    (tmp_path / "checkpoints" / "round-0002.safetensors").unlink()
    point = RunStore(tmp_path).begin(CONFIG, "base")
    assert point is not None and point.round == 1
    assert torch.equal(point.state["w"], torch.full((4,), 1.0))
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest == {"round": 1, "file": "round-0001.safetensors"}


@pytest.mark.fault(
    "Restarting into a finished run's directory",
    "Refused",
    "the finished run's files, byte for byte",
)
def test_a_finished_run_is_never_resumed_or_overwritten(tmp_path):
    killed_after_round_one(tmp_path)
    store = RunStore(tmp_path)
    store.begin(CONFIG, "base")
    store.finish("completed", {"w": torch.ones(4)})
    before = (tmp_path / "metrics.json").read_bytes()
    with pytest.raises(RunFinishedError, match="already completed"):
        RunStore(tmp_path).begin(CONFIG, "base")
    assert (tmp_path / "metrics.json").read_bytes() == before


@pytest.mark.fault(
    "Resuming with other settings or other frozen weights",
    "Refused, naming each key that differs",
    "the unfinished run, still resumable",
)
def test_other_settings_or_frozen_weights_are_refused_naming_them(tmp_path):
    killed_after_round_one(tmp_path)
    with pytest.raises(RunDirError, match=r"num-rounds \(3 -> 5\)"):
        RunStore(tmp_path).begin({**CONFIG, "num-rounds": 5}, "base")
    with pytest.raises(RunDirError, match="frozen weights"):
        RunStore(tmp_path).begin(CONFIG, "other")
    point = RunStore(tmp_path).begin(CONFIG, "base")  # and nothing was changed by refusing
    assert point is not None and point.round == 1


@pytest.mark.fault(
    "A corrupted checkpoint of the last complete round",
    "Refused, naming the file",
    "the run directory",
)
def test_an_unreadable_checkpoint_is_refused_not_trained_over(tmp_path):
    killed_after_round_one(tmp_path)
    (tmp_path / "checkpoints" / "round-0001.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RunDirError, match=r"round-0001\.safetensors.*cannot be read"):
        RunStore(tmp_path).begin(CONFIG, "base")


HOLDER = """
import sys, time
from server.app.store import RunStore
store = RunStore(__import__("pathlib").Path(sys.argv[1]))
store.lock()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.fault(
    "A second server process on the same run directory",
    "Refused, naming the process holding it; a killed holder releases it",
    "the run directory",
)
def test_only_one_server_process_writes_a_run_and_a_kill_releases_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            RunDirError, match=f"in use by another server process \\(pid {holder.pid}\\)"
        ):
            RunStore(tmp_path).lock(wait=0.5)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        RunStore(tmp_path).lock(wait=0.5)  # the kernel dropped the dead process's lock
    finally:
        holder.kill()
        holder.wait(10)


WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from server.app.store import RoundRecord, RunStore
    store = RunStore(Path(sys.argv[1]))
    store.begin({"num-rounds": 100000}, "base")
    for r in range(100000):
        record = RoundRecord(r, 0.5, None, None, {}, [], 0.1)
        store.save_round(record, {"w": torch.full((50000,), float(r))})
        if r == 1:
            print("writing", flush=True)
    """
)


@pytest.mark.fault(
    "`kill -9` of a process writing rounds, at random moments (6 runs)",
    "The resume point is the last round with both record and checkpoint",
    "every complete round and its model",
)
@pytest.mark.parametrize("seed", range(6))
def test_kill_9_at_any_moment_leaves_a_run_that_resumes_consistently(tmp_path, seed):
    """Property: wherever SIGKILL lands, the resume point's model is that round's, and
    the history is every round before it, once each."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        time.sleep(random.Random(seed).uniform(0.0, 0.6))
    finally:
        writer.kill()
        writer.wait(10)
    point = RunStore(tmp_path).begin({"num-rounds": 100000}, "base")
    assert point is not None and point.round >= 1
    assert torch.equal(point.state["w"], torch.full((50000,), float(point.round)))
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == list(range(point.round + 1))
    saved = load_file(str(tmp_path / "checkpoints" / f"round-{point.round:04d}.safetensors"))
    assert torch.equal(saved["w"], point.state["w"])


class CrashingGrid(Grid):
    """Every hospital trains (+1 per round); the server process 'dies' in round ``crash``."""

    def __init__(self, hospitals: int, crash: int | None = None) -> None:
        super().__init__(dict.fromkeys(range(1, hospitals + 1), "ok"))
        self.crash = crash
        self.rounds_sent: list[int] = []

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            if "config" in msg.content:
                server_round = int(msg.content["config"]["server-round"])
                if server_round == self.crash:
                    raise SystemExit("killed")  # not an Exception: nothing records it
                self.rounds_sent.append(server_round)
        return super().push_messages(messages)


# A plain federation of scripted hospitals, each adding 1 to every weight a round.
FOUR_PLAIN_ROUNDS = {
    "num-rounds": 4,
    "secagg.enabled": False,
    "server.fraction-evaluate": 0.0,
    "server.min-hospitals": 1,
    "server.round-timeout": 1.0,
    "server.momentum": 0.0,  # plain FedAvg: the updates' arithmetic is checked
}


def test_a_resumed_federation_continues_from_the_checkpoint_not_from_the_start(tmp_path):
    run = RunConfig.from_run_config(FOUR_PLAIN_ROUNDS)
    flat = run.to_run_config()
    store = RunStore(tmp_path)
    store.begin(flat, "")
    first = CrashingGrid(3, crash=3)
    with pytest.raises(SystemExit):
        run_rounds(PlainRounds(first, run, build_strategy(run, "", LAYOUT)), run, store, START)
    assert sorted(set(first.rounds_sent)) == [1, 2]
    round_two = (tmp_path / "checkpoints" / "round-0002.safetensors").read_bytes()
    store.release()

    store = RunStore(tmp_path)
    point = store.begin(flat, "")
    assert point is not None and point.round == 2
    second = CrashingGrid(3)
    driver = PlainRounds(second, run, build_strategy(run, "", LAYOUT))
    final = run_rounds(driver, run, store, point.state, first_round=point.round + 1)
    assert sorted(set(second.rounds_sent)) == [3, 4]  # rounds 1 and 2 are not run again
    np.testing.assert_allclose(LAYOUT.pack(final), 4.0)  # +1 in each of 4 rounds
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "round-0002.safetensors").read_bytes() == round_two


def test_fedfusion_simulate_resumes_only_its_own_unfinished_run(tmp_path):
    """`fedfusion simulate --out DIR` on a DIR that is not new (server/commands/simulate.py)."""
    from server.commands.simulate import _resumable
    from shared_model.config import ConfigError

    out = tmp_path / "run"
    run = RunConfig.from_run_config({"output-dir": str(out)})
    assert _resumable(out, run, "base", 3) == ""  # new
    out.mkdir()
    (out / "simulation.json").write_text('{"hospitals": 3}')
    assert "afresh" in _resumable(out, run, "base", 3)  # an attempt that never started
    store = RunStore(out)
    store.begin(run.to_run_config(), "base")
    store.save_round(record(1), {"w": torch.ones(4)})
    store.release()
    assert "resuming it after round 1" in _resumable(out, run, "base", 3)
    with pytest.raises(ConfigError, match="--hospitals 3"):
        _resumable(out, run, "base", 4)
    with pytest.raises(ConfigError, match="other settings"):
        _resumable(out, RunConfig.from_run_config({"output-dir": str(out), "seed": 1}), "base", 3)
    store = RunStore(out)
    store.begin(run.to_run_config(), "base")
    store.finish("completed")
    with pytest.raises(ConfigError, match="already completed"):
        _resumable(out, run, "base", 3)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="holds no fedfusion run"):
        _resumable(other, run, "base", 3)


@pytest.mark.fault(
    "The server killed mid-run with server momentum (FedAvgM) on",
    "The run resumes with the momentum it had, landing on the uninterrupted run's model",
    "the server optimizer's state, with every round's checkpoint",
)
def test_server_momentum_resumes_exactly_as_an_uninterrupted_run(tmp_path):
    """FedAvgM's velocity is checkpointed: a killed run continues on the same trajectory."""
    run = RunConfig.from_run_config({**FOUR_PLAIN_ROUNDS, "server.momentum": 0.5})
    flat = run.to_run_config()

    whole = tmp_path / "whole"
    store = RunStore(whole)
    store.begin(flat, "")
    driver = PlainRounds(CrashingGrid(3), run, build_strategy(run, "", LAYOUT))
    uninterrupted = run_rounds(driver, run, store, START)
    # each round averages to +1: velocity 1, 1.5, 1.75, 1.875 -> the model moves 6.125
    np.testing.assert_allclose(LAYOUT.pack(uninterrupted), 6.125)

    killed = tmp_path / "killed"
    store = RunStore(killed)
    store.begin(flat, "")
    first = CrashingGrid(3, crash=3)
    with pytest.raises(SystemExit):
        run_rounds(PlainRounds(first, run, build_strategy(run, "", LAYOUT)), run, store, START)
    store.release()
    assert (killed / "checkpoints" / "round-0002.server-optimizer.safetensors").exists()

    store = RunStore(killed)
    point = store.begin(flat, "")
    assert point is not None and point.round == 2
    optimizer = ServerOptimizer(run.server.momentum, run.server.learning_rate)
    restore_optimizer(optimizer, point.optimizer, point.state)  # as the ServerApp does
    driver = PlainRounds(CrashingGrid(3), run, build_strategy(run, "", LAYOUT))
    resumed = run_rounds(driver, run, store, point.state, point.round + 1, optimizer=optimizer)
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name

    # a fresh optimizer on resume (the velocity lost) would land elsewhere
    store = RunStore(tmp_path / "lost")
    store.begin(flat, "")
    driver = PlainRounds(CrashingGrid(3), run, build_strategy(run, "", LAYOUT))
    lost = run_rounds(driver, run, store, point.state, point.round + 1)
    assert not np.allclose(LAYOUT.pack(lost), 6.125)


def test_a_checkpointed_velocity_that_does_not_fit_is_a_run_the_server_cannot_continue():
    """The optimizer (shared_model) raises its own error; the server's resume reads it as
    a RunDirError, the error every other unresumable checkpoint raises, message kept."""
    optimizer = ServerOptimizer(momentum=0.5)
    with pytest.raises(RunDirError, match="server optimizer's checkpoint does not fit this model"):
        restore_optimizer(optimizer, {"w": torch.zeros(4)}, {"w": torch.zeros(3)})
    assert optimizer.velocity == {}  # nothing taken from the refused checkpoint
