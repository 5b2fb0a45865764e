"""`fedfusion hospital`: run one hospital's SuperNode from its own config file.

The file has two tables. ``[hospital]`` holds the hospital's facts and privacy policy
(hospital-id, data-manifest, state-dir, max-epsilon, delta). The ClientApp reads it
through the node config, so the hospital's limits override anything the server asks.
``[connection]`` says how the SuperNode reaches the server (server, root-certificates,
private-key, port, insecure).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client.app.secagg_checks import signing_keys
from client.dp.hospital_split import check_fractions
from client.dp.ledger import LEDGER_FILENAME, LedgerError, read_ledger
from client.dp.ledger_custody import check_against_backup, missing_ledger
from client.dp.patients import wanted_privacy_unit
from client.node.config import ConnectionConfig
from client.node.pinned import cold_clientapp
from client.node.superexec import superexec_script
from client.node.warm import WarmStart, forkable
from shared_model.config import ConfigError, HospitalConfig
from shared_model.errors import ExplainedError
from shared_model.manifest import RECORD_KEY, ManifestError, read_manifest_rows
from shared_model.processes import stop_processes

__all__ = [
    "SuperNodeLaunch",
    "explain_exit",
    "joined_before",
    "plan_supernode",
    "run_supernode",
    "run_until_joined",
    "supernode_environment",
]

_INSECURE_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! connection.insecure = true: this hospital talks to the server WITHOUT TLS.   !!
!! Anyone on the network can read and alter its traffic. Development use only.  !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


@dataclass(frozen=True)
class SuperNodeLaunch:
    """The SuperNode command for one hospital, and what to tell its operator."""

    hospital: HospitalConfig
    connection: ConnectionConfig
    command: list[str]
    warning: str = ""
    note: str = ""  # advice that stops nothing


def _check_budget_left(hospital: HospitalConfig) -> None:
    """ConfigError if the hospital's ledger is missing, cannot be trusted or is spent."""
    state = Path(hospital.state_dir).expanduser()
    backup = hospital.ledger_backup_file(state)
    ledger_file = state / LEDGER_FILENAME
    try:
        if not ledger_file.is_file():
            raise missing_ledger(state, backup)
        ledger = read_ledger(ledger_file)
        ledger.backup = backup
        check_against_backup(ledger)
        check_fractions(hospital, ledger)
    except LedgerError as err:
        raise ConfigError(f"hospital.state-dir: {err}") from err
    spent = ledger.epsilon()
    if spent >= hospital.max_epsilon:
        raise ConfigError(
            f"hospital.max-epsilon: this hospital's ledger ({ledger_file}) has already spent "
            f"epsilon {spent:.3f} of its max-epsilon {hospital.max_epsilon:g}, so it would "
            "decline every round; raise max-epsilon only if the hospital's privacy policy "
            "allows it"
        )


def _check_membership(hospital: HospitalConfig, path: Path) -> None:
    """ConfigError unless the members file lists this hospital with its signing key."""
    try:
        signing_keys(hospital)
    except ExplainedError as err:
        raise ConfigError(
            f"{path}: SecAgg+ needs this hospital in the federation's members file: {err} "
            "(`fedfusion certs init` writes members.toml beside each hospital's key; "
            "`fedfusion certs members` makes one from the hospitals' .pub files)"
        ) from err


def _check_patient_ids(hospital: HospitalConfig) -> None:
    """Refuse now, not in round 1, a manifest whose patient ids do not fit privacy-unit.

    Reads the manifest's text only (no image is decoded): patient ids blank on some
    records, or ``privacy-unit = 'patient'`` without a patient_id column, are ConfigError
    (client/dp/patients.py), as they would be when the first round opens the data.
    """
    try:
        rows = read_manifest_rows(Path(hospital.data_manifest))
    except ManifestError as err:
        raise ConfigError(f"hospital.data-manifest: {err}") from err
    ids = [
        (row.get("patient_id") or "").strip() or f"{RECORD_KEY}{n}" for n, row in enumerate(rows)
    ]
    wanted_privacy_unit(hospital.privacy_unit, ids, hospital.hospital_id)


def plan_supernode(config_file: Path) -> SuperNodeLaunch:
    """Check a hospital file and build its SuperNode command; ConfigError names the key."""
    path = Path(config_file).expanduser().resolve()
    connection = ConnectionConfig.from_file(path)
    hospital = HospitalConfig.from_node_config({"config-file": str(path)})
    if not hospital.hospital_id:
        raise ConfigError(f"{path}: hospital.hospital-id is required")
    if not hospital.data_manifest:
        raise ConfigError(f"{path}: hospital.data-manifest is required")
    if not Path(hospital.data_manifest).is_file():
        raise ConfigError(f"hospital.data-manifest: {hospital.data_manifest} does not exist")
    if not hospital.state_dir:
        raise ConfigError(f"{path}: hospital.state-dir is required (it keeps the privacy ledger)")
    _check_patient_ids(hospital)
    _check_budget_left(hospital)
    node_config = f"config-file='{path}'"
    if not hospital.secagg_signing_key:  # it signs with the key the server registers
        node_config += f" secagg-signing-key='{connection.private_key}'"
    if hospital.secagg_required:  # a hospital no other would accept fails now
        _check_membership(
            dataclasses.replace(
                hospital, secagg_signing_key=hospital.secagg_signing_key or connection.private_key
            ),
            path,
        )
    if hospital.device != "cpu":  # a GPU index that is not there fails now, not in round 1
        from shared_model.devices import resolve_device  # imports torch: only when it matters

        resolve_device(hospital.device, "hospital.device")  # no GPU at all: warned, the CPU
    command = [
        # Flower's flower-supernode, polling every connection.poll-interval (node/supernode.py)
        sys.executable,
        "-m",
        "client.node.supernode",
        "--poll-interval",
        str(connection.poll_interval),
        "--heartbeat-interval",
        str(connection.heartbeat_interval),
        "--superlink",
        connection.server,
        "--port",
        str(connection.port),
        "--auth-supernode-private-key",
        connection.private_key,
        # The ClientApp reads the [hospital] table itself, through this one node key.
        "--node-config",
        node_config,
    ]
    if connection.insecure:
        command.append("--insecure")
    else:
        command += ["--root-certificates", connection.root_certificates]
    note = (
        "note: the privacy ledger's backup is in state-dir/ledger-backup, on the same storage "
        "as the ledger: set hospital.ledger-backup to a folder elsewhere, so that a lost or "
        "edited state directory still shows"
        if not hospital.ledger_backup
        else ""
    )
    warning = _INSECURE_WARNING if connection.insecure else ""
    return SuperNodeLaunch(
        hospital=hospital, connection=connection, command=command, warning=warning, note=note
    )


_ACTIVATION_REFUSED = "Failed to activate SuperNode"


def explain_exit(code: int, log_text: str, launch: SuperNodeLaunch) -> str:
    """A plain explanation of why the SuperNode stopped, for the hospital's IT team."""
    if _ACTIVATION_REFUSED in log_text:
        public = Path(launch.connection.private_key).with_suffix(".pub")
        return (
            "the server refused to let this hospital join. Either its key is not "
            f"registered: send {public} to the server operator, who registers it with "
            f"`flwr supernode register {public.name} <connection> --name "
            f"{launch.hospital.hospital_id}` (`fedfusion server` registers the keys in "
            "its file as it starts: a hospital that connected before that is refused, "
            "and joins when started again); or the server still counts this hospital as "
            "online: another copy of it runs with the same key, or its previous run "
            "stopped less than connection.rejoin-timeout "
            f"({launch.connection.rejoin_timeout:g}s) ago."
        )
    if code != 0:
        return (
            f"the SuperNode stopped with exit code {code}; check connection.server "
            f"({launch.connection.server}) and the TLS files"
        )
    return ""


_JOINED = "supernode.json"  # in the hospital's state-dir: the server it last joined


def joined_before(launch: SuperNodeLaunch) -> bool:
    """Whether this hospital's SuperNode was once accepted by this server."""
    path = Path(launch.hospital.state_dir).expanduser() / _JOINED
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("server") == (
            launch.connection.server
        )
    except (OSError, ValueError, AttributeError):
        return False


def _remember_join(launch: SuperNodeLaunch, line: str) -> None:
    """Note that the server accepted this hospital (Flower printed its SuperNode ID)."""
    state = Path(launch.hospital.state_dir).expanduser()
    state.mkdir(parents=True, exist_ok=True)
    record = {
        "server": launch.connection.server,
        "node_id": line.rsplit(":", 1)[-1].strip(),
        "joined": time.time(),
    }
    (state / _JOINED).write_text(json.dumps(record), encoding="utf-8")


def run_until_joined(
    launch: SuperNodeLaunch,
    echo: Callable[[str], object] = print,
    run: Callable[[SuperNodeLaunch], tuple[int, str]] | None = None,
    retry_every: float = 5.0,
) -> tuple[int, str]:
    """Run the SuperNode, retrying while the server refuses to activate this hospital.

    A hospital restarted after a crash is refused until the server notices that its
    previous connection is gone: Flower marks a node offline two heartbeat intervals
    (connection.heartbeat-interval, 30 s by default) after its last heartbeat. So if
    this hospital joined this server before (``joined_before``), a refused activation
    is retried every ``retry_every`` seconds for up to connection.rejoin-timeout. A
    hospital that never joined is refused for its key at once, and any other exit
    returns at once. ``run`` defaults to
    :func:`run_supernode`.
    """
    run = run or run_supernode
    deadline = time.monotonic() + launch.connection.rejoin_timeout
    while True:
        code, output = run(launch)
        if (
            _ACTIVATION_REFUSED not in output
            or not joined_before(launch)
            or time.monotonic() + retry_every > deadline
        ):
            return code, output
        left = deadline - time.monotonic()
        echo(
            f"{launch.hospital.hospital_id}: the server refused to let this hospital join "
            f"(yet); retrying in {retry_every:g}s, for up to {left:.0f}s more "
            "(connection.rejoin-timeout). After a crash, the server frees a hospital's "
            f"previous connection {2 * launch.connection.heartbeat_interval:g}s after its "
            "last heartbeat (two connection.heartbeat-interval)."
        )
        time.sleep(retry_every)


def supernode_environment(first: Path | None = None) -> dict[str, str]:
    """The SuperNode's environment: this venv's commands first, prompt task pick-up.

    The SuperNode starts ``flower-superexec``, and that starts ``flwr-clientapp``, by
    name from PATH: a service manager's PATH rarely holds the venv, so it is put first
    (after ``first``, which holds the warm-start stand-in and the adaptive
    ``flower-superexec``, when given). The SuperExec then looks for new messages every
    0.2 s instead of every second, and from 20 ms after each ClientApp
    (``client/node/superexec.py``).
    """
    dirs = [str(d) for d in (first, Path(sys.executable).parent) if d is not None]
    return {
        **os.environ,
        "PATH": os.pathsep.join([*dirs, os.environ.get("PATH", "")]),
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get(
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2"
        ),
    }


def run_supernode(launch: SuperNodeLaunch) -> tuple[int, str]:
    """Run the SuperNode in the foreground, echoing its output; returns (code, output tail).

    Flower's SuperExec, which the SuperNode starts in a session of its own, can outlive a
    SuperNode that stopped (for instance one whose key was refused) and keep retrying
    forever. When the SuperNode ends, the SuperExec serving its port is stopped too.
    """
    tail: deque[str] = deque(maxlen=200)
    runtime = f"127.0.0.1:{launch.connection.port}"
    warm = None
    if launch.hospital.warm_start and forkable():
        try:
            warm = WarmStart.start(supernode_environment(), label=f"SuperNode runtime {runtime}")
        except OSError as err:  # slower, never fatal: Flower starts each ClientApp afresh
            print(f"fedfusion: warm ClientApp starts unavailable ({err}); starting cold")
    # Either way, ClientApps run this hospital's own installed code (client/node/pinned.py).
    cold = None if warm else cold_clientapp().parent
    first = warm.bin_dir if warm else cold
    superexec_script(first)  # the SuperExec, picking up each message sooner (superexec.py)
    proc = subprocess.Popen(
        launch.command,
        env=supernode_environment(first),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )

    def relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line)
            if "SuperNode ID:" in line:
                _remember_join(launch, line)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        code = proc.wait()
    finally:
        stop_processes(proc.pid, [f"--runtime-api-address {runtime}"])
        if warm is not None:
            warm.stop()
        if cold is not None:
            shutil.rmtree(cold, ignore_errors=True)
    reader.join(timeout=5)
    return code, "".join(tail)
