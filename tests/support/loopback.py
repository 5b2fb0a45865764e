"""A whole deployment on loopback: certificates, TLS SuperLink, hospitals, cleanup.

The end-to-end tests (``tests/e2e``) and the deployment benchmark (``make bench``)
run what a real deployment runs, on 127.0.0.1: `fedfusion certs` files, a SuperLink with
TLS and SuperNode authentication, `fedfusion server --config` and `fedfusion hospital
--config`. Every process started is recorded with markers that identify it (and the
SuperExec it spawns) so that ``stop_all`` stops it by PID, whatever happened.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from client.dp.ledger import LEDGER_FILENAME
from server.commands.certs import create_deployment
from server.commands.superlink import BIN, flower_env, flwr
from shared_model.processes import free_port, stop_processes

__all__ = ["BIN", "HOSPITALS", "LoopbackDeployment"]

HOSPITALS = ["hospital-0", "hospital-1", "hospital-2", "hospital-3"]


class LoopbackDeployment:
    """A TLS SuperLink on loopback, and helpers to run Flower commands against it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.certs = tmp / "certs"
        create_deployment(self.certs, ["127.0.0.1"], HOSPITALS)
        self.port = free_port()
        self.env = flower_env(
            tmp / "flwr-home",
            ("tls", f"127.0.0.1:{self.port}", str(self.certs / "ca/ca.crt")),
        )
        self.started: list[tuple[subprocess.Popen, list[str]]] = []

    def start(self, cmd: list[str], log: str, markers: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start a long-running process, logging to a file (never a pipe: see below)."""
        with (self.tmp / log).open("w") as handle:
            proc = subprocess.Popen(
                cmd,
                env=self.env,
                cwd=self.tmp,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Flower's SuperExec outlives a SuperNode that fails to activate, in a session of
        # its own, and would hold a pipe open: only its address identifies it.
        found = [f"127.0.0.1:{cmd[i + 1]}" for i, a in enumerate(cmd) if a == "--port"]
        self.started.append((proc, [str(self.tmp), *found, *markers]))
        return proc

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the flwr CLI against the deployment."""
        return flwr(self.env, *args, timeout=timeout, cwd=self.tmp)

    def hospital(
        self,
        name: str,
        manifest: Path | None = None,
        *,
        tls: bool = True,
        policy: str = "",
        connection: str = "",
    ) -> tuple[list[str], str]:
        """A hospital file for `fedfusion hospital`; returns (command, cleanup marker).

        ``policy``: more lines of its [hospital] table (e.g. ``require-secagg = false``);
        ``connection``: more lines of its [connection] table (e.g. ``poll-interval = 1``).
        """
        port = free_port()
        if manifest is None:
            manifest = self.tmp / f"{name}-empty.csv"
            manifest.write_text("image,report,labels\n,no data,normal\n")
        key = self.certs / f"hospitals/{name}/{name}.key"
        security = f'root-certificates = "{self.certs / "ca/ca.crt"}"' if tls else "insecure = true"
        path = self.tmp / f"{name}-{'tls' if tls else 'plain'}.toml"
        path.write_text(
            f'[hospital]\nhospital-id = "{name}"\ndata-manifest = "{manifest}"\n'
            f'state-dir = "{self.tmp / f"{name}-state"}"\nmax-epsilon = 6.0\n'
            # the hospitals share this machine's cores, as simulated ones do
            f"threads = 1\n{policy}\n\n"
            f'[connection]\nserver = "127.0.0.1:{self.port}"\nprivate-key = "{key}"\n'
            f"port = {port}\n{security}\n{connection}\n"
        )
        if not (self.tmp / f"{name}-state" / LEDGER_FILENAME).exists():  # its operator, once
            started = subprocess.run(
                [str(BIN / "fedfusion"), "ledger", "init", "--config", str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            if started.returncode != 0:
                raise RuntimeError(
                    f"fedfusion ledger init failed: {started.stdout}{started.stderr}"
                )
        return [str(BIN / "fedfusion"), "hospital", "--config", str(path)], f"127.0.0.1:{port}"

    def server_file(self, hospitals: list[str], run: str) -> Path:
        """A server.toml for `fedfusion server` on this deployment's port and certificates."""
        keys = ", ".join(f'"{self.certs / f"hospitals/{h}/{h}.pub"}"' for h in hospitals)
        path = self.tmp / "server.toml"
        path.write_text(
            f'[server]\naddress = "127.0.0.1:{self.port}"\n'
            f'state-dir = "{self.tmp / "server-state"}"\n'
            f'root-certificates = "{self.certs / "ca/ca.crt"}"\n'
            f'certificate = "{self.certs / "server/server.pem"}"\n'
            f'private-key = "{self.certs / "server/server.key"}"\n'
            f"hospitals = [{keys}]\ntimeout = 600.0\n\n[run]\n{run}"
        )
        return path

    def wait_registered(self, count: int, deadline_s: float = 90) -> None:
        """Wait until ``count`` hospital keys are registered on the SuperLink."""
        deadline = time.monotonic() + deadline_s
        while True:
            listing = self.flwr("supernode", "list", "tls", "--format", "json")
            try:
                nodes = json.loads(listing.stdout).get("nodes", [])
            except json.JSONDecodeError:
                nodes = []
            if len(nodes) >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} keys not registered: {listing.stdout}{listing.stderr}")
            time.sleep(1)

    def run_to_exit(
        self, cmd: list[str], log: str, timeout: float = 90, markers: tuple[str, ...] = ()
    ) -> tuple[int | None, str]:
        """Run a process that should exit by itself; returns (exit code, its log)."""
        proc = self.start(cmd, log, markers)
        try:
            code: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, (self.tmp / log).read_text()

    def federate(
        self, manifests: dict[str, Path], run: str, timeout: float = 300, policy: str = ""
    ) -> tuple[int | None, str, Path | None]:
        """`fedfusion server` plus one `fedfusion hospital` per manifest, run to the end.

        ``run`` is the body of server.toml's [run] table, ``policy`` more lines of every
        hospital's [hospital] table. Returns the server's exit code
        (None if it did not finish within ``timeout``), its log, and the run directory.
        """
        names = list(manifests)
        server_toml = self.server_file(names, run)
        server = self.start(
            [str(BIN / "fedfusion"), "server", "--config", str(server_toml)],
            "fedfusion-server.log",
        )
        self.wait_registered(len(names))
        for name, manifest in manifests.items():
            cmd, marker = self.hospital(name, manifest, policy=policy)
            self.start(cmd, f"{name}.log", (marker,))
        try:
            code: int | None = server.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        out = next(iter(self.runs()), None)
        return code, (self.tmp / "fedfusion-server.log").read_text(), out

    def runs(self) -> list[Path]:
        """The server's run directories, oldest first (beside them: the MLflow store)."""
        runs = self.tmp / "server-state" / "runs"
        return sorted(p.parent for p in runs.glob("*/run.json"))

    def stop_all(self) -> list[int]:
        """Stop every process started, by PID; returns any that survived."""
        leftover = []
        for proc, markers in self.started:
            leftover += stop_processes(proc.pid, markers, grace=3)
            proc.wait(10)
        return leftover
