"""The `flwr-clientapp` stand-in of a warm-start hospital (see ``client/node/warm.py``).

Flower's SuperExec starts this, by name from PATH, once for every message. It runs with
``python -IS``: the standard library only, no site-packages, so it starts in a few
milliseconds. It hands its arguments, environment, working directory and standard
streams to the hospital's fork server over a Unix socket, forwards termination signals
to the ClientApp the server forked, and exits with that ClientApp's exit status.

When the fork server cannot take the request, it runs Flower's own ``flwr-clientapp``
in its place: a cold start, never a lost message.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "FEDFUSION_WARM_SOCKET"
COLD_ENV = "FEDFUSION_COLD_CLIENTAPP"
_PID = struct.Struct("!q")  # the fork server's answers: the child's pid, then its status


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the fork server closed the connection")
        data += chunk
    return data


def _cold(cold: str, argv: list[str], why: str) -> None:
    sys.stderr.write(f"fedfusion: warm start unavailable ({why}); starting {cold} cold\n")
    sys.stderr.flush()
    os.execv(cold, argv)


def main() -> int:
    """Run one ClientApp through the fork server; returns its exit status."""
    path = os.environ.pop(SOCKET_ENV, "")
    cold = os.environ.pop(COLD_ENV, "")
    if not path or not cold:
        sys.stderr.write(f"{sys.argv[0]}: run by `fedfusion hospital` only ({SOCKET_ENV} unset)\n")
        return 2
    argv = [cold, *sys.argv[1:]]
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()})  # noqa: PTH109 - no pathlib: start fast
    body = request.encode("utf-8", "surrogateescape")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        socket.send_fds(sock, [struct.pack("!I", len(body)) + body], [0, 1, 2])
        (child,) = _PID.unpack(_read(sock, _PID.size))
    except OSError as err:  # nothing was started: a cold start loses nothing
        sock.close()
        _cold(cold, argv, str(err))
        return 1  # not reached: execv replaced this process

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    try:
        (status,) = _PID.unpack(_read(sock, _PID.size))
    except OSError as err:
        sys.stderr.write(f"fedfusion: lost the fork server while pid {child} ran ({err})\n")
        return 1
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
