"""The Flower machinery both fedfusion commands drive: environment, SuperLink, run, verdict.

``fedfusion simulate`` and ``fedfusion server`` (and the loopback tests) set up Flower the
same way, here: one environment (:func:`flower_env`: this venv's commands first, no
telemetry, no update check, and no runtime dependency installation, which would
``uv sync`` the app and pull a CUDA torch), the ``flwr`` CLI against it (:func:`flwr`),
a local simulation SuperLink owned by PID (:class:`LocalSuperLink`), the run submitted
with ``flwr run`` (:func:`submit_run`), and the verdict (:func:`judge_run`): ``flwr run``
exits 0 even when the run failed, so the exit code, the status ``flwr ls`` reports, and
the run directory's own ``run.json`` and metrics are all checked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from shared_model.config import ConfigError
from shared_model.processes import free_port, stop_processes

__all__ = [
    "LocalSuperLink",
    "RunResult",
    "app_dir",
    "failed_replies",
    "flower_env",
    "flwr",
    "judge_run",
    "submit_run",
    "to_toml",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_SUPERLINK_START_TIMEOUT = 60.0
# Seconds `flwr run` may go on after the ServerApp process ended without recording how
# the run ended, before it is stopped (Flower notices only when its heartbeat expires).
SERVER_APP_GONE_GRACE = 5.0
_WATCH_POLL = 1.0  # seconds between looks at the ServerApp process
BIN = Path(sys.executable).parent  # this venv's commands: flwr, flower-superlink, ...


def flower_env(
    home: Path, connection: tuple[str, str, str] | None = None, **extra: str
) -> dict[str, str]:
    """The environment every Flower process fedfusion starts runs in.

    ``home`` becomes ``FLWR_HOME``; ``connection`` (name, address, CA certificate or ""
    for plaintext) is written to its ``config.toml`` as the default connection.
    """
    home.mkdir(parents=True, exist_ok=True)
    if connection is not None:
        name, address, root_ca = connection
        security = f'root-certificates = "{root_ca}"' if root_ca else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
            f'address = "{address}"\n{security}\n',
            encoding="utf-8",
        )
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        # Without this, the SuperLink would `uv sync` the app's dependencies (CUDA torch).
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        **extra,
    }


def flwr(
    env: dict[str, str], *args: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``flwr`` CLI in ``env``; its output captured."""
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class RunResult:
    """How a federation run ended (simulated or deployed)."""

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


def to_toml(config: dict[str, Any]) -> str:
    """A flat run config as TOML (Flower's ``--run-config`` file; lists for other files)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
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
            str(BIN / "flower-superlink"),
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

    @property
    def pid(self) -> int | None:
        """The SuperLink's process id, once started."""
        return self.proc.pid if self.proc is not None else None

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
    return None  # in flwr-run.log; failures reach the user through fedfusion's lines


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
    superlink_pid: int | None = None,
) -> tuple[int, str, bool]:
    """``flwr run`` the app on ``connection``, streaming progress into ``out/flwr-run.log``.

    Given the SuperLink's ``superlink_pid``, a ServerApp process under it that began the
    run (rewrote ``out/run.json``) and ends while that still says the run is running
    (killed, or crashed before it could record the outcome) stops ``flwr run`` after
    ``SERVER_APP_GONE_GRACE`` seconds: Flower itself notices only when the ServerApp's
    heartbeat expires, about a minute on.

    Returns (exit code, the run status `flwr ls` reports, whether it timed out).
    """
    cmd = [
        str(BIN / "flwr"),
        "run",
        str(project),
        connection,
        "--stream",
        *extra,
        "--run-config",
        str(config_file),
    ]
    before = _written_at(out / "run.json")  # a resumed run's, from its earlier attempt
    with (out / "flwr-run.log").open("a", encoding="utf-8") as log:  # a resumed run appends
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
        done, server_app_gone = threading.Event(), threading.Event()
        if superlink_pid is not None:
            threading.Thread(
                target=_stop_when_server_app_gone,
                args=(proc, superlink_pid, out / "run.json", before, done, server_app_gone),
                daemon=True,
            ).start()
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
            done.set()  # ends the watch
    if server_app_gone.is_set():
        echo(
            "  the ServerApp process ended without recording how the run ended: "
            "stopped waiting for Flower to notice"
        )
    # A SuperLink restarted on its old database also lists the runs of earlier attempts.
    which = ["--run-id", run_id] if run_id else []
    listing = flwr(env, "ls", connection, *which, "--format", "json", cwd=out)
    try:
        runs = json.loads(listing.stdout).get("runs", [])
        status = runs[-1]["status"] if runs else "unknown: no run listed"
    except (json.JSONDecodeError, KeyError, IndexError):
        status = f"unknown: `flwr ls` said {listing.stdout.strip()[:200]!r}"
    return rc, status, timed_out.is_set()


def _run_status(run_file: Path) -> str:
    try:
        return str(json.loads(run_file.read_text("utf-8")).get("status", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def _written_at(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _server_app_processes() -> tuple[str, ...]:
    """The commands Flower runs a ServerApp in: simulated, deployed."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType  # Flower: when it runs

    return tuple(TASK_TYPE_TO_COMMAND[t] for t in (TaskType.SIMULATION, TaskType.SERVER_APP))


def _server_app_running(superlink_pid: int) -> bool:
    """Whether a ServerApp process (not a zombie) runs under the SuperLink."""
    try:
        children = psutil.Process(superlink_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            line = " ".join(child.cmdline())
        except psutil.Error:  # gone meanwhile
            continue
        if any(name in line for name in _server_app_processes()):
            return True
    return False


def _stop_when_server_app_gone(
    proc: subprocess.Popen[str],
    superlink_pid: int,
    run_file: Path,
    before: int | None,
    done: threading.Event,
    gone: threading.Event,
) -> None:
    """Kill ``proc``, setting ``gone``, once the ServerApp ended unrecorded in ``run_file``.

    Only a ServerApp that began this attempt counts: it rewrote ``run_file`` (written at
    ``before`` when ``flwr run`` started; an earlier attempt's "running" does not count,
    and Flower may start a ServerApp again that died before it began). Returns when
    ``done`` is set.
    """
    seen, gone_since = False, None
    while not done.wait(_WATCH_POLL):
        if _server_app_running(superlink_pid):
            seen, gone_since = True, None
            continue
        began = _written_at(run_file) not in (None, before)
        if not seen or not began or _run_status(run_file) != "running":
            continue
        gone_since = gone_since or time.monotonic()
        if time.monotonic() - gone_since >= SERVER_APP_GONE_GRACE:
            gone.set()
            proc.kill()
            return


def judge_run(rc: int, status: str, out: Path, tolerate_failures: bool) -> list[str]:
    """Every reason to call the run failed (flwr run's exit code alone says nothing)."""
    problems = []
    if rc != 0:
        problems.append(f"`flwr run` exited with code {rc} (see {out / 'flwr-run.log'})")
    if status != "finished:completed":
        problems.append(f"Flower reports the run as {status!r}")
    run_file = out / "run.json"
    if not run_file.exists():
        problems.append(f"the ServerApp never started (no run.json); see {out / 'flwr-run.log'}")
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
            f"crashed; see {out / 'flwr-run.log'}): {resume}"
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
