"""``python -m benchmarks.timeline``: where a deployed round's time goes, hop by hop.

Runs one deployed federation on loopback with TLS (the deployment of ``--suite secagg``:
3 hospitals, 300 reports each, DP on, 4 rounds) with ``FEDFUSION_TIMELINE`` set, so that
every process marks the hops it passes (``shared_model/timeline.py``), then lays out one
round (the one before the last, which also ends the run; round 1 warms up) as a table. For each
message stage, each hop's time is taken at the slowest hospital (the one the server waits
for), from the round's start:

- ``server: sent``: the ServerApp has pushed the stage's messages to the SuperLink;
- ``SuperNode: got message``: the hospital's SuperNode found the message (its idle
  poll) and listed it for its SuperExec;
- ``ClientApp: forked``: Flower's SuperExec found it (its task poll) and the fork
  server started a ClientApp for it, while
- ``SuperNode: got objects``: the SuperNode downloads the message's objects (the
  model, keys) from the SuperLink;
- ``ClientApp: handling``: Flower's ClientApp runtime has fetched the message from its
  SuperNode and calls fedfusion's handler; ``handled``: the handler returned;
- ``ClientApp: exited``: the reply is back at the SuperNode and the process ends;
- ``SuperNode: sent``: the SuperNode noticed the reply and pushed it to the SuperLink;
- ``server: all replies``: the ServerApp's polling has read every hospital's reply.

Results: ``benchmarks/results/timeline.md`` and ``timeline.json``.

``python -m benchmarks.timeline idle``: what polling costs while nothing happens, in CPU
(:func:`idle_cpu`): one connected hospital and its SuperLink, idle, at the default
``connection.poll-interval`` and SuperExec task poll, and at faster ones.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.federation import REPORTS_PER_HOSPITAL, _deploy
from shared_model.timeline import TIMELINE_ENV, read
from tests.support.loopback import LoopbackDeployment

__all__ = ["Hop", "hops_of_round", "idle_cpu", "main", "run_timeline", "write_timeline"]

RESULTS = Path(__file__).resolve().parent / "results"
# (event, label): the hops of one message, in the order a message passes them
_HOPS = (
    ("node.listed", "SuperNode: got message"),
    ("clientapp.forked", "ClientApp: forked"),
    ("node.pulled", "SuperNode: got objects"),
    ("clientapp.handle", "ClientApp: handling"),
    ("clientapp.handled", "ClientApp: handled"),
    ("clientapp.exit", "ClientApp: exited"),
    ("node.sent", "SuperNode: sent"),
)


@dataclass(frozen=True)
class Hop:
    """One hop of one stage: when the slowest hospital passed it, and the fastest."""

    stage: str
    hop: str
    at: float  # seconds from the round's start, slowest hospital
    first: float  # the same, fastest hospital
    step: float  # seconds since the previous hop (slowest hospital)


def _rounds(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The events split at each ``server.round`` mark (a round's start)."""
    rounds: list[list[dict[str, Any]]] = []
    for event in events:
        if event["event"] == "server.round":
            rounds.append([])
        if rounds:
            rounds[-1].append(event)
    return rounds


def hops_of_round(round_events: list[dict[str, Any]]) -> list[Hop]:
    """The hop table of one round's events (those from one ``server.round`` to the next).

    A ClientApp's ``forked`` and ``exited`` marks carry no node id; its own ``handle``
    mark (same process) names the node. Node-side events are matched to the stage whose
    push precedes them.
    """
    start = float(round_events[0]["t"])
    node_of_pid = {e["pid"]: e["node"] for e in round_events if e["event"] == "clientapp.handle"}
    stage: str | None = None
    order: list[str] = []
    at: dict[tuple[str, str], list[float]] = defaultdict(list)
    for event in round_events:
        name = event["event"]
        t = float(event["t"]) - start
        if name == "server.push":
            stage = str(event.get("stage"))
            order.append(stage)
        if stage is None:
            continue
        if name in ("server.pushed", "server.replies"):
            at[stage, name].append(t)
        elif name in dict(_HOPS):
            node = event.get("node", node_of_pid.get(event["pid"]))
            if node is not None:
                at[stage, name].append(t)
    table: list[Hop] = []
    previous = 0.0
    for stage in order:
        hops = [
            ("server.pushed", "server: sent"),
            *_HOPS,
            ("server.replies", "server: all replies"),
        ]
        for name, label in hops:
            times = at.get((stage, name))
            if not times:
                continue
            slowest = max(times)
            table.append(
                Hop(stage=stage, hop=label, at=slowest, first=min(times), step=slowest - previous)
            )
            previous = slowest
    return table


def run_timeline(
    secagg: bool = True, hospitals: int = 3, rounds: int = 4, reports: int = REPORTS_PER_HOSPITAL
) -> tuple[list[Hop], list[float], int]:
    """One traced deployed run: its round before the last, hop by hop.

    Returns (that round's hops, the round times after warm-up, the rounds traced).
    """
    with tempfile.TemporaryDirectory(prefix="fedfusion-timeline-") as tmp:
        trace = Path(tmp) / "timeline.jsonl"
        os.environ[TIMELINE_ENV] = str(trace)  # every process of the deployment inherits it
        try:
            run = _deploy(hospitals, rounds, secagg, Path(tmp), print, reports)
        finally:
            os.environ.pop(TIMELINE_ENV, None)
        traced = [r for r in _rounds(read(trace)) if any(e["event"] == "server.push" for e in r)]
    if not traced:
        raise RuntimeError("the deployed run marked no round: is FEDFUSION_TIMELINE passed on?")
    # round 1 warms up; the last one also ends the run
    chosen = traced[-2] if len(traced) > 1 else traced[0]
    return hops_of_round(chosen), run.seconds, len(traced)


def write_timeline(
    hops: list[Hop], seconds: list[float], secagg: bool, out: Path = RESULTS
) -> Path:
    """Write ``timeline.md`` and ``timeline.json``; returns the Markdown file."""
    mode = "SecAgg+" if secagg else "plain"
    created = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    (out / "timeline.json").write_text(
        json.dumps(
            {
                "created": created,
                "mode": mode,
                "round-seconds": seconds,
                "hops": [asdict(h) for h in hops],
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    lines = [
        f"# One deployed {mode} round, hop by hop ({created} UTC)",
        "",
        "3 hospitals on loopback with TLS; seconds from the round's start, at the slowest "
        "hospital (fastest in brackets); rounds 2-4 took "
        + ", ".join(f"{s:.2f}" for s in seconds)
        + " s.",
        "",
        "| stage | hop | at (s) | step (s) |",
        "| --- | --- | ---: | ---: |",
        *(f"| {h.stage} | {h.hop} | {h.at:.2f} ({h.first:.2f}) | {h.step:+.2f} |" for h in hops),
        "",
    ]
    path = out / "timeline.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _cpu_seconds(root: psutil.Process) -> float:
    """User + system CPU seconds of ``root`` and every process below it, so far."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def idle_cpu(
    poll_interval: float, task_poll: float, seconds: float = 60.0, settle: float = 40.0
) -> dict[str, float]:
    """CPU share (% of one core) of an idle connected hospital and of its SuperLink.

    One hospital joins a TLS SuperLink on loopback with ``connection.poll-interval =
    poll_interval`` and its SuperExec polling every ``task_poll`` seconds, then sits
    idle: after ``settle`` seconds (the fork server's imports), the CPU time of the
    hospital's process tree (SuperNode, SuperExec, fork server) and of the SuperLink is
    measured over ``seconds``.
    """
    with tempfile.TemporaryDirectory(prefix="fedfusion-idle-") as tmp:
        d = LoopbackDeployment(Path(tmp))
        d.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(task_poll)
        try:
            superlink = d.start_superlink()
            d.register("hospital-0")
            cmd, marker = d.hospital("hospital-0", connection=f"poll-interval = {poll_interval}")
            hospital = d.start(cmd, "hospital-0.log", (marker,))
            d.wait_online(1)
            time.sleep(settle)
            trees = {
                "hospital": psutil.Process(hospital.pid),
                "superlink": psutil.Process(superlink.pid),
            }
            before = {k: _cpu_seconds(p) for k, p in trees.items()}
            time.sleep(seconds)
            after = {k: _cpu_seconds(p) for k, p in trees.items()}
        finally:
            leftover = d.stop_all()
        if leftover:
            raise RuntimeError(f"processes left running after the idle run: {leftover}")
    return {k: 100.0 * (after[k] - before[k]) / seconds for k in trees}


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.timeline [plain | idle]``: trace a round, or idle CPU."""
    args = sys.argv[1:] if argv is None else argv
    if "idle" in args:
        for poll, task in ((0.5, 0.2), (0.1, 0.2), (0.5, 0.05)):
            cpu = idle_cpu(poll, task)
            print(
                f"poll-interval {poll} s, task poll {task} s: hospital {cpu['hospital']:.1f} %, "
                f"SuperLink {cpu['superlink']:.1f} % of a core",
                flush=True,
            )
        return
    secagg = "plain" not in args
    hops, seconds, traced = run_timeline(secagg)
    print(f"{traced} rounds traced")
    print(write_timeline(hops, seconds, secagg).read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
