"""``fedfusion simulate``: a local federation on Flower's own simulation engine.

It starts a private SuperLink (simulation mode) on a free loopback port, submits this
app with ``flwr run``, shows each round's progress, and then judges the outcome itself,
because ``flwr run`` exits 0 even when the run failed: it checks the exit code, the run
status that ``flwr ls`` reports, and the run directory's own ``run.json`` and metrics.
Whatever happens, every process it started (the SuperLink, the SuperExec, the
simulation and its Ray workers) is stopped, by PID, before it returns.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.app.store import RunDirError, RunStore, write_json_atomic
from shared_model.config import SIM_FEATURE_CACHE_ENV, ConfigError, RunConfig, parse_overrides
from shared_model.processes import free_port, stop_processes
from shared_model.weights import base_fingerprint, initial_model

__all__ = [
    "SimulationResult",
    "free_port",
    "parse_overrides",
    "run_simulation_cli",
    "stop_processes",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_SUPERLINK_START_TIMEOUT = 60.0
_SIMULATION_FILE = "simulation.json"  # the number of simulated hospitals, for a resume


@dataclass
class SimulationResult:
    """How a simulated federation ended."""

    run_dir: Path
    problems: list[str] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    leftover_processes: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the run completed and nothing was left running."""
        return not self.problems


def app_dir() -> Path:
    """The project directory holding the Flower app's pyproject.toml."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text("utf-8"):
        raise ConfigError(
            f"fedfusion simulate runs the Flower app from its source checkout, but {root} "
            "has no pyproject.toml with [tool.flwr.app]; install with `pip install -e .`"
        )
    return root


def _to_toml(config: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        return json.dumps(str(value))  # a TOML basic string

    return "".join(f"{key} = {fmt(value)}\n" for key, value in sorted(config.items()))


class LocalSuperLink:
    """A simulation-mode SuperLink on 127.0.0.1:port, owned by PID and stopped on exit.

    On exit it stops the SuperLink, its descendants and any process carrying one of the
    run's private paths; ``leftover`` lists PIDs that would not die (none, normally).
    """

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env, self.port, self.log_path = env, port, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.leftover: list[int] = []

    def __enter__(self) -> LocalSuperLink:
        cmd = [
            str(Path(sys.executable).parent / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--control-api-address",
            f"127.0.0.1:{free_port()}",
            "--disable-runtime-dependency-installation",
        ]
        with self.log_path.open("a", encoding="utf-8") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + _SUPERLINK_START_TIMEOUT
        while not _healthy(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the local SuperLink exited with code {self.proc.returncode} at start; "
                    f"see {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the local SuperLink did not start within "
                    f"{_SUPERLINK_START_TIMEOUT:.0f}s; see {self.log_path}"
                )
            time.sleep(0.3)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.leftover = stop_processes(self.proc.pid, _markers(self.env))
            self.proc.wait(timeout=10)  # reap it


def _markers(env: dict[str, str]) -> list[str]:
    return [env["FLWR_HOME"], env["RAY_TMPDIR"]]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text("utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _show(line: str, verbose: bool) -> str | None:
    """The part of a Flower log line worth showing, or None to keep it in the log only."""
    text = _ANSI.sub("", line).rstrip()
    if verbose:
        return text
    if "[fedfusion]" in text:
        return text.split("[fedfusion]", 1)[1].strip()
    return None  # in simulation.log; failures reach the user through fedfusion's lines


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
) -> SimulationResult:
    """Run a local federation of ``hospitals`` x ``rounds`` and judge how it went.

    Frozen pretrained encoders' features are cached in ``feature_cache`` (default:
    ``.feature-cache`` beside ``out``), shared by the simulated hospitals and later runs.
    """
    started = time.monotonic()
    out = out.expanduser().resolve()
    run_config = {**overrides, "num-rounds": rounds, "output-dir": str(out)}
    run = RunConfig.from_run_config(run_config)  # fail now, with the key named
    model = initial_model(run.model, run.seed)  # missing or mismatched weight files fail now
    if run.secagg.enabled:  # refuse impossible share/threshold settings before starting
        run.secagg_plan(hospitals)
    if hospitals < run.server.min_hospitals:
        raise ConfigError(
            f"--hospitals {hospitals} is below server.min-hospitals "
            f"{run.server.min_hospitals}: the run would wait for hospitals "
            "that never come"
        )
    resuming = _resumable(out, run, base_fingerprint(model), hospitals)
    if resuming:
        echo(f"fedfusion: {resuming}")
    project = app_dir()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / _SIMULATION_FILE, {"hospitals": hospitals})
    flwr_home = out / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    config_file = out / "run-config.toml"
    config_file.write_text(_to_toml(run.to_run_config()), encoding="utf-8")
    # Ray's socket paths must stay short (107 bytes), so its temp dir lives in /tmp.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ffray-"))
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        # Without this, the SuperLink would `uv sync` the app's dependencies (CUDA torch).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_TMPDIR": str(ray_tmp),
        "RAY_DEDUP_LOGS": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # also silences Ray's tip about it
        SIM_FEATURE_CACHE_ENV: str(feature_cache or out.parent / ".feature-cache"),
    }
    result = SimulationResult(run_dir=out)
    echo(f"fedfusion: {hospitals} hospitals x {rounds} rounds on the embedded data -> {out}")
    link = LocalSuperLink(env, port, out / "superlink.log")
    try:
        with link:
            rc, status, timed_out = submit_run(
                project,
                config_file,
                "local",
                env,
                out,
                timeout,
                verbose,
                echo,
                ("--federation-config", f"num-supernodes={hospitals} client-resources-num-cpus=1"),
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


def submit_run(
    project: Path,
    config_file: Path,
    connection: str,
    env: dict[str, str],
    out: Path,
    timeout: float,
    verbose: bool,
    echo: Any,
    extra: tuple[str, ...] = (),
) -> tuple[int, str, bool]:
    """``flwr run`` the app on ``connection``, streaming progress into ``out/simulation.log``.

    Returns (exit code, the run status `flwr ls` reports, whether it timed out).
    """
    flwr = str(Path(sys.executable).parent / "flwr")
    cmd = [
        flwr,
        "run",
        str(project),
        connection,
        "--stream",
        *extra,
        "--run-config",
        str(config_file),
    ]
    with (out / "simulation.log").open("a", encoding="utf-8") as log:  # a resumed run appends
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=out,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        timed_out = threading.Event()

        def stop() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, stop)
        timer.start()
        run_id = ""
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                started = _RUN_STARTED.search(line)
                if started and not run_id:
                    run_id = started.group(1)
                shown = _show(line, verbose)
                if shown:
                    echo(f"  {shown}")
            rc = proc.wait()
        finally:
            timer.cancel()
    # A SuperLink restarted on its old database also lists the runs of earlier attempts.
    which = ["--run-id", run_id] if run_id else []
    listing = subprocess.run(
        [flwr, "ls", connection, *which, "--format", "json"],
        env=env,
        cwd=out,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(listing.stdout).get("runs", [])
        status = runs[-1]["status"] if runs else "unknown: no run listed"
    except (json.JSONDecodeError, KeyError, IndexError):
        status = f"unknown: `flwr ls` said {listing.stdout.strip()[:200]!r}"
    return rc, status, timed_out.is_set()


def judge_run(rc: int, status: str, out: Path, tolerate_failures: bool) -> list[str]:
    """Every reason to call the run failed (flwr run's exit code alone says nothing)."""
    problems = []
    if rc != 0:
        problems.append(f"`flwr run` exited with code {rc} (see {out / 'simulation.log'})")
    if status != "finished:completed":
        problems.append(f"Flower reports the run as {status!r}")
    run_file = out / "run.json"
    if not run_file.exists():
        problems.append(f"the ServerApp never started (no run.json); see {out / 'simulation.log'}")
        return problems
    info = json.loads(run_file.read_text("utf-8"))
    rounds = json.loads((out / "metrics.json").read_text("utf-8"))["rounds"]
    where = f"resumes it after round {rounds[-1]['round']}" if rounds else "starts it again"
    resume = (
        f"restarting with the same settings on this run directory {where} "
        f"(`fedfusion simulate --out {out}`; `fedfusion server` finds it in its state-dir)"
    )
    if info["status"] == "running":
        problems.append(
            "the server process ended without recording how the run ended (it was killed or "
            f"crashed; see {out / 'simulation.log'}): {resume}"
        )
    elif info["status"] not in {"completed", "stopped-early"}:
        problems.append(
            f"the run {info['status']}: {info.get('error') or 'no reason given'} ({resume} "
            "if the settings stay the same; changed settings need a new run directory)"
        )
    trained = [r for r in rounds if r["round"] > 0]
    if trained and all(r.get("skipped") for r in trained):
        problems.append(
            f"no round trained: all {len(trained)} had too few updates and were skipped "
            "(server.short-round)"
        )
    lost = failed_replies(rounds)
    if lost and not tolerate_failures:
        problems.append(f"{lost} (pass --tolerate-failures to accept a run with failed hospitals)")
    return problems


def failed_replies(rounds: list[dict[str, Any]]) -> str:
    """What went wrong at hospitals over a run, in one line ("" if nothing did)."""
    failures = sum(r["failures"] + r["eval_failures"] + r.get("rejected", 0) for r in rounds)
    if not failures:
        return ""
    bad = {"failed", "rejected"}
    reasons = {h["reason"] for r in rounds for h in r["hospitals"] if h["status"] in bad}
    reasons.discard("")
    said = "; ".join(sorted(reasons))[:500] or (
        "no reason recorded: hospitals that dropped out of SecAgg+ or evaluation; the run "
        "log holds Flower's errors"
    )
    where = sorted(
        {r["round"] for r in rounds if r["failures"] + r["eval_failures"] + r.get("rejected", 0)}
    )
    return f"{failures} hospital replies failed (rounds {where}): {said}"
