"""Warm ClientApp starts for a deployed hospital: fork a ready process, don't re-import.

Flower's SuperExec starts a fresh ``flwr-clientapp`` process for every message a hospital
receives: a plain round sends two (train, evaluate), a SecAgg+ round four. Each cold start
imports Flower and torch again, about 3 s of CPU, which made a deployed round many times
slower than a simulated one.

``fedfusion hospital`` therefore starts a *fork server* beside its SuperNode: one process
that imports Flower's ClientApp runtime and the libraries a round needs (torch, Opacus,
scikit-learn, the image and text readers) once, then waits. A stand-in ``flwr-clientapp``
(``client/node/warm_stub.py``), first on the SuperExec's PATH, hands each request over a Unix
socket that only this user can open; the server forks a child that runs Flower's own
``flwr-clientapp`` entry point with the request's arguments, environment, working
directory and standard streams, and reports its exit status back.

What a child runs is what a cold start runs:

- the hospital's own installed ClientApp and shared code (``client``, ``shared_model``)
  are imported in the fork server, so the child runs them, never the code of the app
  bundle (FAB) the server sent (``client/node/pinned.py``); the server's package is not kept;
- the fork server never runs a torch operation or starts a thread, so a child's thread
  pools start fresh; Python's ``random`` reseeds itself after fork and NumPy's global
  generator is reseeded in the child;
- if the fork server is down, the stand-in starts Flower's ``flwr-clientapp`` cold.

The preloaded heap is frozen out of the garbage collector (``gc.freeze``) before each
fork, as Python's documentation advises for fork servers. Without it, a child's first
full collection walked the ~540,000 inherited objects and wrote to each one's header,
copying every page they sit on: a stall of 0.4-0.7 s in every message's ClientApp,
measured in a deployed round (the tokenizer or whatever else ran at that moment
appeared to take that long).

``hospital.warm-start = false`` turns this off.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from client.node import warm_stub
from client.node.flwr_compat import (
    CLIENTAPP,
    fast_message_pulls,
    install_each_fab_once,
    only_the_hospitals_clientapp,
)
from client.node.pinned import cold_clientapp, pin
from shared_model import timeline

__all__ = ["PRELOAD", "WarmStart", "forkable", "preload", "serve"]

# Third-party modules a ClientApp imports, loaded once in the fork server. A missing
# optional one (transformers, pydicom, ...) is skipped: the child imports what it needs.
PRELOAD = (
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.clientapp",
    "flwr.client.mod",
    "torch",
    "torch.nn.functional",
    "torch.utils.data",
    "opacus",
    "opacus.accountants",
    "opacus.accountants.analysis.rdp",
    "opacus.optimizers.optimizer_fast_gradient_clipping",
    "sklearn.metrics",
    "PIL.Image",
    "pydicom",
    "tokenizers",
    "transformers",
    "peft",
    "safetensors.torch",
    "cryptography.hazmat.primitives.ciphers",
)
# The server's package is never kept: a hospital has no use for it.
_DROPPED = ("server",)
_ANSWER = warm_stub._PID
_MAX_REQUEST = 1 << 20


def forkable() -> bool:
    """Whether this platform can fork a ClientApp (POSIX with Unix sockets)."""
    return hasattr(os, "fork") and hasattr(socket, "AF_UNIX") and hasattr(socket, "send_fds")


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import ``modules`` (those installed) and pin the hospital's own ClientApp.

    Returns the libraries loaded. The hospital's ``client`` and ``shared_model`` stay
    imported (``client/node/pinned.py``); the server's package is dropped.
    """
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # not installed, or broken: the child imports it itself
            continue
        loaded.append(name)
    pin()  # a failure here is a broken installation: the fork server does not start
    fast_message_pulls()  # every forked ClientApp inherits these three
    install_each_fab_once()
    only_the_hospitals_clientapp()
    for name in list(sys.modules):
        if name.split(".", 1)[0] in _DROPPED:
            del sys.modules[name]
    return loaded


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request from the stand-in: (argv, env, cwd) and its three standard streams."""
    conn.settimeout(10)
    head, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    try:
        if len(head) < 4 or len(fds) != 3:
            raise ValueError("malformed request (no length or not three streams)")
        (size,) = struct.unpack("!I", head[:4])
        if size > _MAX_REQUEST:
            raise ValueError(f"request of {size} bytes is over the {_MAX_REQUEST} limit")
        body = head[4:]
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("request cut short")
            body += chunk
        request = json.loads(body.decode("utf-8", "surrogateescape"))
        if not isinstance(request.get("argv"), list) or not isinstance(request.get("env"), dict):
            raise ValueError("request without argv or env")
        return request, fds
    except Exception:
        for fd in fds:
            os.close(fd)
        raise


def _run_child(request: dict, fds: list[int], inherited: list[socket.socket], entry: str) -> None:
    """In the forked child: become the ClientApp process the stand-in stands for. Never returns."""
    code = 1
    try:
        for sock in inherited:  # the server's sockets are not the ClientApp's business
            sock.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(request.get("cwd") or "/")
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        timeline.mark("clientapp.forked")
        if "numpy" in sys.modules:  # forked children would otherwise share its stream
            sys.modules["numpy"].random.seed()
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function)()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # the child must never fall back into the server's loop
        traceback.print_exc()
    finally:
        timeline.mark("clientapp.exit")
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.waitstatus_to_exitcode(wait_status)


def serve(socket_path: Path, parent_pid: int | None = None, entry: str = CLIENTAPP) -> None:
    """Listen on ``socket_path`` and fork one ClientApp per request, until told to stop.

    The socket is bound before the libraries load, so a message that arrives early waits
    in the backlog rather than starting cold. Only this user's processes may connect.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    Path(socket_path).chmod(stat.S_IRUSR | stat.S_IWUSR)
    listener.listen(64)
    started = time.monotonic()
    loaded = preload()
    print(
        f"fedfusion: warm ClientApp starts ready in {time.monotonic() - started:.1f} s "
        f"({len(loaded)} libraries preloaded)",
        file=sys.stderr,
        flush=True,
    )
    if threading.active_count() != 1:  # a thread would be lost, perhaps holding a lock
        raise RuntimeError("the fork server must be single-threaded before it forks")
    gc.collect()  # the import garbage goes now, not into the frozen heap
    gc.freeze()
    children: dict[int, socket.socket] = {}
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    try:
        while not stopping:
            if parent_pid is not None and os.getppid() != parent_pid:
                break  # the hospital process is gone
            for _key, _events in selector.select(timeout=0.1):
                conn, _ = listener.accept()
                _fork(conn, listener, children, entry)
            _reap(children)
    finally:
        listener.close()
        _stop_children(children)
        Path(socket_path).unlink(missing_ok=True)


def _fork(
    conn: socket.socket, listener: socket.socket, children: dict[int, socket.socket], entry: str
) -> None:
    """Check the peer, read its request and fork the child that serves it."""
    try:
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            raise PermissionError(f"a process of uid {uid} asked for a ClientApp")
        request, fds = _read_request(conn)
    except (OSError, ValueError) as err:
        print(f"fedfusion: refused a warm-start request: {err}", file=sys.stderr, flush=True)
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # children never walk the inherited heap in their collections
    pid = os.fork()
    if pid == 0:
        _run_child(request, fds, [listener, conn, *children.values()], entry)
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):  # if the stand-in is gone, the child runs on
        conn.sendall(_ANSWER.pack(pid))
    children[pid] = conn


def _stop_children(children: dict[int, socket.socket], grace: float = 5.0) -> None:
    """Terminate running children, report their statuses, and kill any that linger."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + grace
        while children and time.monotonic() < deadline:
            _reap(children)
            time.sleep(0.05)


def _reap(children: dict[int, socket.socket]) -> None:
    """Collect finished children and send each stand-in its exit status."""
    while children:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sendall(_ANSWER.pack(_status(wait_status)))
            conn.close()


@dataclass
class WarmStart:
    """A running fork server and the PATH directory holding its ``flwr-clientapp`` stand-in."""

    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def bin_dir(self) -> Path:
        """The directory to put first on the SuperExec's PATH."""
        return self.directory / "bin"

    @classmethod
    def start(cls, env: dict[str, str], label: str = "", entry: str = CLIENTAPP) -> WarmStart:
        """Start the fork server with ``env`` and write the stand-in; the caller stops it.

        ``entry`` (``module:function``) is what each child runs: Flower's ``flwr-clientapp``.
        When the fork server cannot take a request, the stand-in starts the pinned cold
        ClientApp (``client/node/pinned.py``).
        """
        directory = Path(tempfile.mkdtemp(prefix="fedfusion-warm-"))  # mode 0700
        bin_dir = directory / "bin"
        bin_dir.mkdir()
        sock = directory / "clientapp.sock"
        cold = cold_clientapp(directory / "cold")
        stub = bin_dir / "flwr-clientapp"
        stub.write_text(
            "#!/bin/sh\n"
            f"{warm_stub.SOCKET_ENV}={shlex.quote(str(sock))} "
            f"{warm_stub.COLD_ENV}={shlex.quote(str(cold))} "
            f'exec {shlex.quote(sys.executable)} -IS {shlex.quote(warm_stub.__file__)} "$@"\n',
            encoding="utf-8",
        )
        stub.chmod(0o700)
        command = [
            sys.executable,
            "-m",
            "client.node.warm",
            "--socket",
            str(sock),
            "--entry",
            entry,
        ]
        command += ["--parent-pid", str(os.getpid())] + ([f"--label={label}"] if label else [])
        process = subprocess.Popen(command, env=env)
        deadline = time.monotonic() + 30  # binding comes first and takes well under a second
        while not sock.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return cls(directory, process)

    def stop(self) -> None:
        """Stop the fork server (it stops its running children) and remove its directory."""
        proc = self.process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """``python -m client.node.warm --socket PATH``: run the fork server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--label", default="", help="shown in ps; identifies the hospital")
    parser.add_argument("--entry", default=CLIENTAPP, help="module:function each child runs")
    args = parser.parse_args(argv)
    serve(args.socket, args.parent_pid, args.entry)


if __name__ == "__main__":
    main()
