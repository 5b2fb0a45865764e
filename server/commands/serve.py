"""`fedfusion server --config server.toml`: the coordinator of a real deployment.

It starts the SuperLink (TLS and hospital authentication unless explicitly insecure,
runtime dependency installation disabled, its database in the state directory),
registers the listed hospitals' public keys, waits until server.min-hospitals of them
are online, submits the federated run with `flwr run`, judges the outcome as
`fedfusion simulate` does, and stops everything it started. All state lives in one
directory: ``superlink.db``, ``flwr-home/``, ``runs/<time>/`` (checkpoints, metrics,
report) and the logs.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE
from flwr.supercore.constant import NodeStatus

from server.app.registry import REGISTRY_ENV
from server.app.store import RunDirError, RunFinishedError, RunStore
from server.app.tracking import tracking_env
from server.commands.config import ServerDeployConfig
from server.commands.superlink import (
    BIN,
    RunResult,
    app_dir,
    flower_env,
    flwr,
    judge_run,
    submit_run,
    to_toml,
)
from shared_model.config import ConfigError, RunConfig
from shared_model.processes import stop_processes

__all__ = ["INSECURE_WARNING", "run_server", "stale_status_wait", "superlink_command"]

INSECURE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! server.insecure = true: NO TLS and NO hospital authentication. Anyone on the !!
!! network can read the traffic and join as a hospital. Development use only.   !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""
_CONNECTION = "fedfusion"


def superlink_command(cfg: ServerDeployConfig) -> list[str]:
    """The flower-superlink command line for this deployment."""
    host, port = cfg.address.rsplit(":", 1)
    cmd = [
        str(BIN / "flower-superlink"),
        "--host",
        host,
        "--port",
        port,
        "--database",
        str(Path(cfg.state_dir) / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]
    if cfg.insecure:
        return [*cmd, "--insecure"]
    return [
        *cmd,
        "--ssl-ca-certfile",
        cfg.root_certificates,
        "--ssl-certfile",
        cfg.certificate,
        "--ssl-keyfile",
        cfg.private_key,
        "--enable-supernode-auth",
    ]


def _environment(cfg: ServerDeployConfig) -> dict[str, str]:
    """Flower's environment for this deployment, its connection the local SuperLink."""
    host, port = cfg.address.rsplit(":", 1)
    local = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host
    root_ca = "" if cfg.insecure else cfg.root_certificates
    return flower_env(Path(cfg.state_dir) / "flwr-home", (_CONNECTION, f"{local}:{port}", root_ca))


def _register(env: dict[str, str], key: str, superlink: subprocess.Popen, log: Path) -> None:
    """Register one hospital's public key, waiting for the SuperLink to accept requests."""
    name = Path(key).stem
    deadline = time.monotonic() + 90
    while True:
        reg = flwr(env, "supernode", "register", key, _CONNECTION, "--name", name)
        said = reg.stdout + reg.stderr
        if reg.returncode == 0 or "already" in said.lower():
            return
        if superlink.poll() is not None:
            raise RuntimeError(
                f"the SuperLink stopped (exit code {superlink.returncode}); see {log}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not register {key}: {said.strip()[-300:]}")
        time.sleep(1)


def _wait_online(env: dict[str, str], count: int, timeout: float, echo: Any) -> None:
    deadline, last = time.monotonic() + timeout, -1
    while True:
        listing = flwr(env, "supernode", "list", _CONNECTION, "--format", "json")
        try:
            nodes = json.loads(listing.stdout).get("nodes", [])
        except json.JSONDecodeError:
            nodes = []
        online = sum(n.get("status") == "online" for n in nodes)
        if online != last:
            echo(f"  hospitals online: {online} of the {count} needed")
            last = online
        if online >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {online} of {count} hospitals came online within "
                f"{timeout:.0f}s (server.wait-for-hospitals-timeout)"
            )
        time.sleep(2)


def stale_status_wait(
    database: Path, now: float | None = None, limit: float = float("inf")
) -> float:
    """Seconds until the online statuses a restarted SuperLink reads from ``database`` are current.

    Flower keeps a hospital online until two of its heartbeat intervals after its last
    heartbeat (``online_until``): until the latest of those instants passes, a hospital
    that is still reconnecting, or gone, counts as online. Read from Flower's SQLite
    state before the SuperLink starts; where it cannot be read, two of Flower's default
    intervals (60 s). Capped at two of the longest interval a hospital declared, and at
    ``limit``.
    """
    fallback = min(float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL), limit)
    try:
        uri = f"{Path(database).resolve().as_uri()}?mode=ro"  # a '#' or '%' in the path stays
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as con:
            rows = con.execute(
                "SELECT online_until, heartbeat_interval FROM node WHERE status = ?",
                (str(NodeStatus.ONLINE),),
            ).fetchall()
    except sqlite3.Error:
        return fallback
    try:
        until = [(float(u), float(i)) for u, i in rows]
    except (TypeError, ValueError):  # a schema this code does not know
        return fallback
    if not until:
        return 0.0
    cap = min(HEARTBEAT_PATIENCE * max(i for _, i in until), limit)
    left = max(u for u, _ in until) - (time.time() if now is None else now)
    return min(max(left, 0.0), cap)


def _run_dir(
    state: Path, settings: dict[str, Any], base_hash: str, new_run: bool, echo: Any
) -> Path:
    """The latest run in ``state`` if it is unfinished, else a new run directory.

    ConfigError if the unfinished run cannot be resumed with these settings: the
    operator then restores them, or passes --new-run to leave it unfinished.
    """
    runs = state / "runs"
    previous = (
        sorted(p for p in runs.glob("*") if (p / "run.json").exists()) if runs.exists() else []
    )
    if previous and not new_run:
        last = previous[-1]
        store = RunStore(last)
        try:
            same = RunConfig.from_run_config({**settings, "output-dir": str(last)})
            info = store.unfinished(same.to_run_config(), base_hash)
        except RunFinishedError:
            info = None  # start the next run
        except RunDirError as err:
            raise ConfigError(
                f"{err} (or pass --new-run to leave it unfinished and start a new run)"
            ) from err
        if info is not None:
            echo(f"fedfusion server: resuming the unfinished run in {last} ({info['status']})")
            return last
    out = runs / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out.mkdir(parents=True, exist_ok=False)
    return out


def run_server(
    cfg: ServerDeployConfig,
    run: RunConfig,
    run_settings: dict[str, Any],
    echo: Any = print,
    verbose: bool = False,
    *,
    base_hash: str = "",
    new_run: bool = False,
    tracking: dict[str, str] | None = None,
    server_file: Path | None = None,
) -> RunResult:
    """Start the SuperLink, register hospitals, run the federation, stop; judge the run.

    If the state directory's latest run is unfinished (its server was killed, or it
    failed), it is resumed after its last complete round, unless ``new_run``.
    ``base_hash`` is the frozen weights' fingerprint, which a resumed run must share.
    ``tracking`` (:func:`server.app.tracking.tracking_env`) says where the run is logged.
    ``server_file``: the file this came from; the ServerApp reads its ``hospitals`` again
    at every SecAgg+ stage (``server/app/registry.py``), so that a key removed from it
    mid-run is refused at its next message.
    """
    state = Path(cfg.state_dir)
    out = _run_dir(state, {**run.to_run_config(), **run_settings}, base_hash, new_run, echo)
    config_file = out / "run-config.toml"
    full = {**run.to_run_config(), **run_settings, "output-dir": str(out)}
    config_file.write_text(to_toml(full), encoding="utf-8")
    RunConfig.from_run_config(full)
    env = {**_environment(cfg), **(tracking or tracking_env())}
    if server_file is not None and cfg.hospital_keys():
        env[REGISTRY_ENV] = str(Path(server_file).expanduser().resolve())
    log = state / "superlink.log"
    database = state / "superlink.db"
    restarted = database.exists()
    # (a hospital may declare a heartbeat interval of up to 30 minutes: the wait for its
    # stale status is capped by the operator's own wait for hospitals)
    limit = run.server.wait_for_hospitals_timeout
    settle = stale_status_wait(database, limit=limit) if restarted else 0.0
    started = time.monotonic()
    with log.open("a", encoding="utf-8") as handle:
        superlink = subprocess.Popen(
            superlink_command(cfg),
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    result = RunResult(run_dir=out)
    try:
        echo(
            f"fedfusion server: SuperLink on {cfg.address} (pid {superlink.pid}); state in {state}"
        )
        for key in cfg.hospital_keys():
            _register(env, key, superlink, log)
            echo(f"  registered {Path(key).stem}")
        if restarted:
            # The database still says who was online when the SuperLink stopped. Until
            # that status expires, a hospital still reconnecting counts as online, and a
            # round would start without it.
            echo(
                f"  restarted on its old database: waiting {settle:.0f}s for the "
                "hospitals' online status to be current"
                if settle > 0
                else "  restarted on its old database: the hospitals' online status is current"
            )
            time.sleep(max(settle - (time.monotonic() - started), 0))
        _wait_online(env, run.server.min_hospitals, run.server.wait_for_hospitals_timeout, echo)
        rc, status, timed_out = submit_run(
            app_dir(),
            config_file,
            _CONNECTION,
            env,
            out,
            cfg.timeout,
            verbose,
            echo,
            superlink_pid=superlink.pid,
        )
    except RuntimeError as err:
        result.problems = [str(err)]
        return result
    finally:
        result.leftover_processes = stop_processes(
            superlink.pid, [str(state), f"--parent-pid {superlink.pid}"]
        )
        superlink.wait(10)
        result.seconds = time.monotonic() - started
    # Hospitals that dropped out are expected in a real federation: each round went on
    # without them if enough remained (or was skipped or failed, which judge_run sees).
    result.problems = judge_run(rc, status, out, tolerate_failures=True)
    if timed_out:
        result.problems.insert(
            0, f"the run did not finish within server.timeout {cfg.timeout:.0f}s"
        )
    metrics = out / "metrics.json"
    result.rounds = json.loads(metrics.read_text("utf-8"))["rounds"] if metrics.exists() else []
    return result
