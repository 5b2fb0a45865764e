"""``fedfusion simulate``: a local federation on Flower's own simulation engine.

It starts a private SuperLink (simulation mode) on a free loopback port, submits this
app with ``flwr run``, shows each round's progress, and then judges the outcome itself
(``server/commands/superlink.py``). Whatever happens, every process it started (the
SuperLink, the SuperExec, the simulation and its Ray workers) is stopped, by PID, before
it returns.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from server.app.store import RunDirError, RunStore
from server.app.tracking import tracking_env
from server.commands.superlink import (
    LocalSuperLink,
    RunResult,
    app_dir,
    flower_env,
    judge_run,
    submit_run,
    to_toml,
)
from shared_model.config import SIM_DEVICE_ENV, SIM_FEATURE_CACHE_ENV, ConfigError, RunConfig
from shared_model.files import write_json_atomic
from shared_model.processes import free_port
from shared_model.weights import base_fingerprint, initial_model

__all__ = ["run_simulation_cli"]

_SIMULATION_FILE = "simulation.json"  # the number of simulated hospitals, for a resume


def run_simulation_cli(
    *,
    hospitals: int,
    rounds: int,
    overrides: dict[str, Any],
    out: Path,
    timeout: float,
    verbose: bool,
    tolerate_failures: bool,
    echo: Any = print,
    feature_cache: Path | None = None,
    tracking: dict[str, str] | None = None,
    live: bool = False,
    hospital_device: str = "cpu",
) -> RunResult:
    """Run a local federation of ``hospitals`` x ``rounds`` and judge how it went.

    Frozen pretrained encoders' features are cached in ``feature_cache`` (default:
    ``.feature-cache`` beside ``out``), shared by the simulated hospitals and later runs.
    ``tracking`` (:func:`server.app.tracking.tracking_env`; default: the SQLite store
    beside ``out``) says where the run is logged to MLflow. ``live``: a progress bar of
    the rounds when the output is a terminal. ``hospital_device``: where the simulated
    hospitals train (their ``device`` setting: cpu, cuda, cuda:N or auto).
    """
    started = time.monotonic()
    out = out.expanduser().resolve()
    run_config = {**overrides, "num-rounds": rounds, "output-dir": str(out)}
    run = RunConfig.from_run_config(run_config)  # fail now, with the key named
    if run.secagg.enabled:  # refuse impossible share/threshold settings before starting
        run.secagg_plan(hospitals)
    if hospitals < run.server.min_hospitals:
        raise ConfigError(
            f"--hospitals {hospitals} is below server.min-hospitals "
            f"{run.server.min_hospitals}: the run would wait for hospitals "
            "that never come"
        )
    model = initial_model(run.model, run.seed)  # missing or mismatched weight files fail now
    resuming = _resumable(out, run, base_fingerprint(model), hospitals)
    if resuming:
        echo(f"fedfusion: {resuming}")
    project = app_dir()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / _SIMULATION_FILE, {"hospitals": hospitals})
    config_file = out / "run-config.toml"
    config_file.write_text(to_toml(run.to_run_config()), encoding="utf-8")
    # Ray's socket paths must stay short (107 bytes), so its temp dir lives in /tmp.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ffray-"))
    port = free_port()
    env = flower_env(
        out / ".flwr",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(port),
        RAY_TMPDIR=str(ray_tmp),
        RAY_DEDUP_LOGS="0",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",  # also silences Ray's tip about it
        **{
            SIM_FEATURE_CACHE_ENV: str(feature_cache or out.parent / ".feature-cache"),
            SIM_DEVICE_ENV: hospital_device,
        },
        **(tracking or tracking_env()),
    )
    result = RunResult(run_dir=out)
    echo(f"fedfusion: {hospitals} hospitals x {rounds} rounds on the embedded data -> {out}")
    link = LocalSuperLink(env, port, out / "superlink.log")
    try:
        with link, round_progress(echo, rounds, live) as show:
            rc, status, timed_out = submit_run(
                project,
                config_file,
                "local",
                env,
                out,
                timeout,
                verbose,
                show,
                ("--federation-config", f"num-supernodes={hospitals} client-resources-num-cpus=1"),
                superlink_pid=link.pid,
            )
    finally:
        result.leftover_processes = link.leftover
        shutil.rmtree(ray_tmp, ignore_errors=True)
    result.seconds = time.monotonic() - started
    result.problems = judge_run(rc, status, out, tolerate_failures)
    if timed_out:
        result.problems.insert(
            0, f"the run did not finish within --timeout {timeout:.0f}s and was stopped"
        )
    if result.leftover_processes:
        result.problems.append(
            f"processes still running after shutdown: {result.leftover_processes}"
        )
    metrics = out / "metrics.json"
    result.rounds = json.loads(metrics.read_text("utf-8"))["rounds"] if metrics.exists() else []
    return result


def _resumable(out: Path, run: RunConfig, base_hash: str, hospitals: int) -> str:
    """How a restart in ``out`` continues its unfinished run ("" for a new run).

    ConfigError if ``out`` holds anything else: a finished run, a run with other
    settings or another number of hospitals, or files that are not a run.
    """
    if not out.exists() or not any(out.iterdir()):
        return ""
    try:
        info = RunStore(out).unfinished(run.to_run_config(), base_hash)
    except RunDirError as err:
        raise ConfigError(str(err)) from err
    if info is None and (out / _SIMULATION_FILE).exists():
        return f"{out}: the earlier attempt never started its server; starting the run afresh"
    if info is None:
        raise ConfigError(
            f"output directory {out} is not empty and holds no fedfusion run: choose another --out"
        )
    sim = out / _SIMULATION_FILE
    before = json.loads(sim.read_text("utf-8")).get("hospitals") if sim.exists() else None
    if before != hospitals:
        raise ConfigError(
            f"{out} holds an unfinished run of {before} simulated hospitals, not {hospitals}: "
            f"resume it with --hospitals {before}, or choose another --out"
        )
    metrics = out / "metrics.json"
    done = json.loads(metrics.read_text("utf-8"))["rounds"] if metrics.exists() else []
    last = f"after round {done[-1]['round']}" if done else "from the start (no round was complete)"
    return (
        f"{out} holds an unfinished run ({info.get('status')}); resuming it {last}, "
        "with the hospitals' privacy ledgers as they are"
    )


_ROUND_LINE = re.compile(r"^round (\d+)/(\d+) (\||\(SecAgg\+\))")
RoundTick = Callable[[int, float, float | None], None]  # (rounds done, elapsed, left or None)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


def with_eta(
    echo: Any, rounds: int, clock: Any = time.monotonic, tick: RoundTick | None = None
) -> Any:
    """``echo`` that adds the elapsed time and an estimate of the time left to round lines.

    The estimate is the mean time of the training rounds finished after the first one
    this command saw (a resumed run starts later), times the rounds left. The first is
    left out, and no estimate follows it: it also carries one-off work (decoding, the
    frozen encoders' features), up to ten times a later round. A round starts when its
    SecAgg+ exchange does (``round k/N (SecAgg+)``) or, without SecAgg+, when the round
    before it finished (``round k-1/N | ...``). ``tick`` is told each finished round,
    for a progress bar.
    """
    started = clock()
    first: list[tuple[float, int]] = []  # (when, rounds done by then) at the first start
    after_first: list[tuple[float, int]] = []  # the same when the first of them finished

    def show(text: str) -> None:
        match = _ROUND_LINE.match(text.strip())
        if match:
            k, now, finished = int(match.group(1)), clock(), match.group(3) == "|"
            if not first:
                first.append((now, k if finished else k - 1))
            left = None
            if finished and k > first[0][1] and not after_first:
                after_first.append((now, k))
            elif finished and after_first and after_first[0][1] < k < rounds:
                t0, base = after_first[0]
                left = (now - t0) / (k - base) * (rounds - k)
            if finished:
                text += f" | {_clock(now - started)} elapsed"
                text += f", about {_clock(left)} left" if left is not None else ""
                if tick is not None:
                    tick(k, now - started, left)
        echo(text)

    return show


@contextmanager
def round_progress(echo: Any, rounds: int, live: bool) -> Iterator[Any]:
    """The run's ``echo``: in a terminal (``live``), lines above a rich bar of the rounds.

    Elsewhere (a log, CI, a test) each round line carries the elapsed time and time left.
    """
    console = Console()
    if not (live and console.is_terminal):
        yield with_eta(echo, rounds)
        return
    with Progress(
        "[bold]rounds",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[left]}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("rounds", total=rounds, left="")

        def tick(done: int, elapsed: float, left: float | None) -> None:
            bar.update(task, completed=done, left=f"about {_clock(left)} left" if left else "")
            bar.refresh()

        def line(text: str) -> None:
            bar.console.print(text, markup=False, highlight=False, soft_wrap=True)

        yield with_eta(line, rounds, tick=tick)
