"""The certificates from `fedfusion certs` work with real Flower processes on loopback.

A SuperLink with TLS and SuperNode authentication accepts a registered hospital, refuses
an unregistered hospital key, and a plaintext SuperNode cannot connect. Every process is
stopped by PID, even when an assertion fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.certs import create_deployment
from server.simulation import free_port, stop_processes

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture
def deployment(tmp_path):
    certs = tmp_path / "certs"
    create_deployment(certs, ["127.0.0.1"], ["hospital-0", "hospital-1"])
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca/ca.crt"}"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    started: list[tuple[subprocess.Popen, list[str]]] = []

    def start(cmd: list[str], log: str) -> subprocess.Popen:
        with (tmp_path / log).open("w") as handle:  # a file, not a pipe: see below
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=tmp_path,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Flower's SuperExec outlives a SuperNode that fails to activate, in a session of
        # its own: only the address on its command line identifies it.
        markers = [str(tmp_path)] + [
            f"127.0.0.1:{cmd[i + 1]}" for i, a in enumerate(cmd) if a == "--port"
        ]
        started.append((proc, markers))
        return proc

    superlink = start(
        [
            str(BIN / "flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(tmp_path / "superlink.db"),
            "--ssl-ca-certfile",
            str(certs / "ca/ca.crt"),
            "--ssl-certfile",
            str(certs / "server/server.pem"),
            "--ssl-keyfile",
            str(certs / "server/server.key"),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ],
        "superlink.log",
    )
    try:
        yield {
            "certs": certs,
            "port": port,
            "env": env,
            "start": start,
            "tmp": tmp_path,
            "superlink": superlink,
        }
    finally:
        for proc, markers in started:
            assert stop_processes(proc.pid, markers, grace=3) == []
            proc.wait(10)


def run_to_exit(d, cmd: list[str], log: str, timeout: float = 90) -> tuple[int, str]:
    """Run a process that should exit by itself; returns (exit code, its log)."""
    proc = d["start"](cmd, log)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    return code, (d["tmp"] / log).read_text()


def flwr(d, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=d["env"],
        cwd=d["tmp"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def supernode(d, name: str, *, tls: bool = True) -> list[str]:
    cmd = [
        str(BIN / "flower-supernode"),
        "--superlink",
        f"127.0.0.1:{d['port']}",
        "--port",
        str(free_port()),
        "--auth-supernode-private-key",
        str(d["certs"] / f"hospitals/{name}/{name}.key"),
    ]
    return cmd + (["--root-certificates", str(d["certs"] / "ca/ca.crt")] if tls else ["--insecure"])


def test_registered_hospital_joins_unregistered_and_plaintext_are_refused(deployment):
    d = deployment
    deadline = time.monotonic() + 60
    while True:  # the SuperLink takes a few seconds to come up
        reg = flwr(
            d,
            "supernode",
            "register",
            str(d["certs"] / "hospitals/hospital-0/hospital-0.pub"),
            "tls",
            "--name",
            "hospital-0",
        )
        if reg.returncode == 0:
            break
        assert d["superlink"].poll() is None, (d["tmp"] / "superlink.log").read_text()
        assert time.monotonic() < deadline, reg.stdout + reg.stderr
        time.sleep(1)

    d["start"](supernode(d, "hospital-0"), "hospital-0.log")
    deadline = time.monotonic() + 60
    while True:
        listing = flwr(d, "supernode", "list", "tls", "--format", "json")
        nodes = json.loads(listing.stdout).get("nodes", []) if listing.returncode == 0 else []
        if any(n.get("status") == "online" for n in nodes):
            break
        assert time.monotonic() < deadline, (
            listing.stdout + (d["tmp"] / "hospital-0.log").read_text()
        )
        time.sleep(1)

    code, log = run_to_exit(d, supernode(d, "hospital-1"), "unregistered.log")
    assert code not in (0, None), log  # exits by itself, with an error
    assert "Failed to activate SuperNode" in log

    code, log = run_to_exit(d, supernode(d, "hospital-0", tls=False), "plaintext.log")
    assert code not in (0, None), log
