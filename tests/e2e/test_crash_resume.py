"""kill -9 in the middle of a round: the server resumes, a hospital rejoins, nothing is lost.

Simulation (SecAgg+ off, the plain FedAvg path): the ServerApp process is killed in
round 2 of 2; running the same `fedfusion simulate` again resumes after round 1.

Deployment on loopback (TLS, SecAgg+ on): a hospital's whole process tree is killed
while it trains round 2 (its ledger's write-ahead entry is on disk), the round completes
without it and the restarted hospital rejoins; then the SuperLink is killed in round 3
and `fedfusion server` restarted on the same state directory resumes after round 2.

In both, what "nothing lost" means is asserted: the metrics history holds every round
once; the last complete round's checkpoint is the one the resumed run started from and
is left untouched; every hospital's ledger after the restart begins with exactly what
it held when the kill landed (never reset), and adds one entry per round it trained
after it (never counted twice); a round killed mid-training stays counted in full; and
each ledger's epsilon is what an independent accountant (dp-accounting) computes from it.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from shared_model.datasets.export import write_manifest
from tests.support.dp import dp_accounting_epsilon
from tests.support.loopback import BIN, LoopbackDeployment
from tests.support.tracking import read_tracked_run

pytestmark = pytest.mark.slow


def history(ledger: Path) -> list[dict]:
    """The ledger's training releases (held-out evaluations are charged to their own part)."""
    return [
        e for e in json.loads(ledger.read_text())["history"] if e["mechanism"] != "held-out-stats"
    ]


def wait_for(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def cmdline(proc: psutil.Process) -> str:
    """A process's command line; empty for a zombie (dead, not yet reaped) or one gone."""
    try:
        return " ".join(proc.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def kill_tree(root: psutil.Process, markers: tuple[str, ...] = ()) -> None:
    """SIGKILL a process, all its descendants and any process marked by ``markers``."""
    victims = [root, *root.children(recursive=True)]
    for proc in psutil.process_iter(["cmdline"]):
        if any(m in " ".join(proc.info["cmdline"] or []) for m in markers):
            victims.append(proc)
    for proc in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(victims, timeout=10)


def _key(entry: dict) -> tuple:
    return entry["round"], entry["noise_multiplier"], entry["sample_rate"], entry["steps"]


def assert_ledger_kept(
    before: list[dict], after: list[dict], resumed: list[int], killed_round: int, path: Path
) -> None:
    """The restart kept ``before`` and added one completed entry per round it ran.

    ``before`` is read once the kill landed. A hospital of the killed attempt may still
    have been training (its process was not the one killed), so an entry may yet go
    from started to completed, and one late entry for the killed round may follow.
    """
    tail, head = after[len(after) - len(resumed) :], after[: len(after) - len(resumed)]
    assert [e["round"] for e in tail] == resumed, (path, after)
    assert all(e["status"] == "completed" for e in tail), (path, tail)
    assert [_key(e) for e in head[: len(before)]] == [_key(e) for e in before], (
        f"{path}: the ledger lost or rewrote rounds it held when the server was killed"
    )
    for old, new in zip(before, head, strict=False):
        assert new["status"] == old["status"] or (old["status"], new["status"]) == (
            "started",
            "completed",
        )
    assert [e["round"] for e in head[len(before) :]] in ([], [killed_round]), (path, after)


def assert_epsilon_independent(ledger_path: Path, reported: float | None) -> None:
    ledger = json.loads(ledger_path.read_text())
    for part, spent, cap in (
        (lambda m: m != "held-out-stats", "epsilon", "max_epsilon"),
        (lambda m: m == "held-out-stats", "held_out_epsilon", "max_held_out_epsilon"),
    ):
        entries = [
            (e["noise_multiplier"], e["sample_rate"], e["steps"])
            for e in ledger["history"]
            if part(e["mechanism"])
        ]
        independent = dp_accounting_epsilon(entries, ledger["delta"], "rdp") if entries else 0.0
        assert ledger[spent] == pytest.approx(independent, rel=0.01)
        assert ledger[spent] <= ledger[cap] + 1e-9
    if reported is not None:  # what the hospital told the server in the last round
        assert reported == pytest.approx(ledger["epsilon"])


@pytest.mark.fault(
    "`kill -9` of the ServerApp process mid-round (simulation)",
    "The same command resumes after the last complete round",
    "checkpoints, metrics history, every ledger (each epsilon matches dp-accounting)",
)
def test_simulation_server_killed_mid_round_resumes_after_the_last_complete_round(tmp_path):
    out = tmp_path / "run"
    cmd = [
        str(BIN / "fedfusion"),
        "simulate",
        "-n",
        "3",
        "-r",
        "2",
        "--out",
        str(out),
        "-c",
        "secagg.enabled=false",
        "-c",
        "data.max-reports=900",  # 300 records a hospital: what is kept is checked, not learning
        "-c",
        # a round killed mid-training counts in full: 3 rounds' worth of this 2-round plan
        # must fit under each hospital's max-epsilon (10) for the resumed round to train
        "privacy.target-epsilon=4",
        "--timeout",
        "600",
    ]
    first_log = tmp_path / "first.log"
    with first_log.open("w") as handle:
        first = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "round 2/2\n" in first_log.read_text(), 300, "round 2 to start", poll=0.1)
        cli = psutil.Process(first.pid)
        (server,) = [p for p in cli.children(recursive=True) if "flwr-simulation" in cmdline(p)]
        server.kill()  # the ServerApp process, mid-round
        ledgers = {p.parent.name: history(p) for p in out.glob("hospitals/*/privacy_ledger.json")}
        code = first.wait(300)
    finally:
        first.kill()
        first.wait(10)
    said = first_log.read_text()
    assert code != 0, said
    hint = f"this run directory resumes it after round 1 (`fedfusion simulate --out {out}`"
    assert hint in said, said[-3000:]
    assert "stopped waiting for Flower to notice" in said  # not a minute later
    checkpoint = (out / "checkpoints" / "round-0001.safetensors").read_bytes()
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming it after round 1" in again.stdout
    # what a finished `fedfusion simulate` shows: each hospital's epsilon, the files, the
    # MLflow run; and it leaves no process of its own behind
    for shown in ("eps hospital-2", "report.md", "MLflow run"):
        assert shown in again.stdout, (shown, again.stdout[-3000:])
    assert [p.pid for p in psutil.process_iter() if str(out) in cmdline(p)] == []
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed"
    assert [a["resumed_after_round"] for a in info["attempts"]] == [1]
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]  # each once, the history intact
    assert (out / "checkpoints" / "round-0001.safetensors").read_bytes() == checkpoint
    tracked = read_tracked_run(out)  # the same MLflow run, continued; each round once
    assert tracked.runs_in_experiment == 1 and tracked.status == "FINISHED"
    assert tracked.history["eval/auroc"] == [(r["round"], r["eval_auroc"]) for r in rounds]
    assert [s for s, _ in tracked.history["train/loss"]] == [1, 2]
    assert len(ledgers) == 3
    for name, before in ledgers.items():
        path = out / "hospitals" / name / "privacy_ledger.json"
        assert [e["round"] for e in before][:1] == [1]
        assert_ledger_kept(before, history(path), [2], 2, path)
        (last,) = [h for h in rounds[-1]["hospitals"] if h["hospital"] == name]
        assert_epsilon_independent(path, last["epsilon"])


@pytest.mark.fault(
    (
        "`kill -9` of a hospital mid-training, then of the SuperLink mid-round (loopback, "
        "TLS, SecAgg+)"
    ),
    (
        "The round completes without the hospital, which rejoins; the same `fedfusion server`"
        " command resumes the run"
    ),
    "checkpoints, metrics history, every ledger, the killed round counted in full",
)
@pytest.mark.timeout(1200)  # two heartbeat expiries (20 s each) and three server starts
def test_deployment_hospital_and_superlink_killed_mid_round_both_recover(tmp_path):
    d = LoopbackDeployment(tmp_path)
    names = ["hospital-0", "hospital-1", "hospital-2"]
    victim = "hospital-2"
    sizes = {"hospital-0": 160, "hospital-1": 160, victim: 480}  # the victim trains longest
    manifests = {
        n: write_manifest(tmp_path / f"{n}-data", i, sizes[n]) for i, n in enumerate(names)
    }
    ledger = {n: tmp_path / f"{n}-state" / "privacy_ledger.json" for n in names}
    server_toml = d.server_file(
        names,
        "num-rounds = 4\nserver.min-hospitals = 3\nserver.wait-for-hospitals-timeout = 120.0\n"
        "secagg.stage-timeout = 60.0\nprivacy.target-epsilon = 3.0\nserver.round-timeout = 120.0\n",
    )
    server_cmd = [str(BIN / "fedfusion"), "server", "--config", str(server_toml)]
    server_log = tmp_path / "fedfusion-server.log"
    try:
        server = d.start(server_cmd, server_log.name)
        d.wait_registered(len(names))
        hospitals = {}
        for name, manifest in manifests.items():
            # heartbeats every 10 s: the server frees a killed hospital after 20 s, not 60
            cmd, marker = d.hospital(name, manifest, connection="heartbeat-interval = 10")
            hospitals[name] = (d.start(cmd, f"{name}.log", (marker,)), cmd, marker)

        # 1. the victim is killed while it trains round 2: its write-ahead entry is on disk
        def training_round_two() -> bool:
            try:
                last = history(ledger[victim])[-1]
            except (OSError, ValueError, IndexError):  # not written yet, or mid-rename
                return False
            return (last["round"], last["status"]) == (2, "started")

        wait_for(training_round_two, 300, f"{victim} to start training round 2", poll=0.01)
        proc, cmd, marker = hospitals[victim]
        kill_tree(psutil.Process(proc.pid), (marker,))
        killed = history(ledger[victim])
        assert killed[-1]["round"] == 2 and killed[-1]["status"] == "started"
        d.start(cmd, f"{victim}-restarted.log", (marker,))  # and rejoins

        # 2. the SuperLink is killed in round 3; `fedfusion server` stops, reporting it
        wait_for(lambda: "round 3/4 (SecAgg+)" in server_log.read_text(), 300, "round 3")
        time.sleep(1.0)
        (out,) = d.runs()
        checkpoint = (out / "checkpoints" / "round-0002.safetensors").read_bytes()
        (superlink,) = [
            p for p in psutil.Process(server.pid).children() if "flower-superlink" in cmdline(p)
        ]
        superlink.kill()
        ledgers = {n: history(ledger[n]) for n in names}
        assert server.wait(180) != 0
        said = server_log.read_text()
        assert "resumes it after round 2" in said, said[-3000:]

        # 3. the same command resumes the run after round 2
        code, said = d.run_to_exit(server_cmd, "fedfusion-server-2.log", timeout=600)
        assert code == 0, said[-4000:]
        assert f"resuming the unfinished run in {out}" in said
        # it let the stale statuses expire, no longer than two 10 s heartbeats
        settled = re.search(r"waiting (\d+)s for the hospitals' online status", said)
        assert settled or "online status is current" in said, said[-3000:]
        assert not settled or int(settled.group(1)) <= 20, settled.group(0)
        # each hospital declared its own heartbeat interval to the server
        with contextlib.closing(sqlite3.connect(d.tmp / "server-state" / "superlink.db")) as db:
            declared = db.execute("SELECT heartbeat_interval FROM node").fetchall()
        assert sorted(declared) == [(10.0,)] * len(declared) and len(declared) >= 3
        assert d.runs() == [out]  # no new run
        info = json.loads((out / "run.json").read_text())
        assert info["status"] == "completed", info
        assert [a["resumed_after_round"] for a in info["attempts"]] == [2]
        rounds = json.loads((out / "metrics.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
        assert rounds[2]["failures"] == 1  # the victim, dropped out of SecAgg+
        trained = [h["hospital"] for h in rounds[2]["hospitals"] if h["status"] == "trained"]
        assert sorted(trained) == ["hospital-0", "hospital-1"]  # (it may rejoin to evaluate)
        for r in rounds[3:]:
            assert sorted(h["hospital"] for h in r["hospitals"]) == names  # it rejoined
        assert (out / "checkpoints" / "round-0002.safetensors").read_bytes() == checkpoint
        for name in names:
            assert_ledger_kept(ledgers[name], history(ledger[name]), [3, 4], 3, ledger[name])
            (last,) = [h for h in rounds[-1]["hospitals"] if h["hospital"] == name]
            assert_epsilon_independent(ledger[name], last["epsilon"])
        # the round the victim was killed in stays counted, in full
        assert history(ledger[victim])[: len(killed)] == killed
    finally:
        assert d.stop_all() == []
