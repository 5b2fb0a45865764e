"""Processes started on behalf of the user: free ports, and stopping them by PID.

Both the coordinator (``fedfusion simulate``, the SuperLink) and a hospital
(``fedfusion hospital``, its SuperNode) start Flower processes and must stop every one.
"""

from __future__ import annotations

import contextlib
import os
import socket

import psutil

__all__ = ["free_port", "stop_processes"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_processes(root_pid: int, markers: list[str], grace: float = 5.0) -> list[int]:
    """Stop a process, its descendants, its process group and any process marked by a path.

    A process whose command line holds one of ``markers`` is stopped too: that catches
    daemons that left the tree, such as Ray's. So is every process in the group that
    ``root_pid`` leads (processes started with ``start_new_session``): when the root was
    killed, its orphaned children are found that way. Returns the PIDs still alive
    afterwards (none, normally).
    """
    procs: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(root_pid)
        procs[root.pid] = root
        procs.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if proc.pid != me and (any(m in cmdline for m in markers) or _group(proc) == root_pid):
            procs[proc.pid] = proc
    for proc in procs.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=grace)
    return [p.pid for p in alive]


def _group(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None
