"""Warm ClientApp starts (client/node/warm.py): a forked child is a faithful cold start.

The fork server here runs ``tests.client.node.warm_probe:main`` in place of Flower's
``flwr-clientapp``, so that each test sees what a child was given and inherited.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from client.node import warm_stub
from client.node.warm import WarmStart, forkable
from shared_model.config import HospitalConfig

pytestmark = pytest.mark.skipif(not forkable(), reason="fork and Unix sockets only")
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def warm():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = WarmStart.start(env, label="test", entry="tests.client.node.warm_probe:main")
    yield server
    server.stop()


def run(warm: WarmStart, *args: str, cwd: Path | None = None, **env: str):
    """Start the stand-in as the SuperExec would: by name, from PATH."""
    full = {**os.environ, **env, "PATH": f"{warm.bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["flwr-clientapp", *args], env=full, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def seen(result) -> dict:
    return json.loads(result.stdout.splitlines()[0])


def test_a_child_gets_the_request_and_returns_its_exit_status(warm, tmp_path):
    result = run(warm, "--exit", "7", cwd=tmp_path, WARM_PROBE="from the SuperExec")
    assert result.returncode == 7, result.stderr
    child = seen(result)
    assert child["argv"][0] == str(warm.directory / "cold" / "flwr-clientapp")  # pinned
    assert child["argv"][1:] == ["--exit", "7"]
    assert child["cwd"] == str(tmp_path)
    assert child["probe"] == "from the SuperExec"
    assert "to stderr" in result.stderr  # the stand-in's own streams, not the server's
    assert child["pid"] != warm.process.pid


def test_a_child_runs_the_hospitals_own_clientapp_not_the_servers_bundle(warm, tmp_path):
    """torch comes preloaded, and so does the hospital's installed ClientApp: a bundle
    from the server first on sys.path (as Flower's loader puts it) is not what runs."""
    bundle = tmp_path / "bundle"
    (bundle / "client" / "app").mkdir(parents=True)
    for init in ("client/__init__.py", "client/app/__init__.py"):
        (bundle / init).write_text("")
    (bundle / "client/app/client_app.py").write_text("raise SystemExit('server code ran')\n")
    child = seen(run(warm, WARM_PROBE_BUNDLE=str(bundle)))
    assert child["torch_preloaded"]
    assert "client.app.client_app" in child["project_inherited"]
    assert "shared_model" in child["project_inherited"]
    assert not child["server_inherited"]
    assert child["clientapp_file"] == str(ROOT / "client" / "app" / "client_app.py")
    assert child["threads"] == 1  # the server started no thread a child could lose
    # it fetches its message's objects from the SuperNode without Flower's 1 s backoff
    assert child["message_pull_backoff"] == {"initial_backoff": 0.02, "backoff_cap": 0.5}
    assert child["fab_installed_once"]  # the app bundle is not unpacked for every message


def test_a_cold_start_runs_the_hospitals_own_clientapp_too(tmp_path):
    """warm-start = false, or the fork server down: `python -m client.node.pinned` pins it."""
    from client.node.pinned import cold_clientapp

    bundle = tmp_path / "bundle"
    (bundle / "client" / "app").mkdir(parents=True)
    for init in ("client/__init__.py", "client/app/__init__.py"):
        (bundle / init).write_text("")
    (bundle / "client/app/client_app.py").write_text("raise SystemExit('server code ran')\n")
    script = cold_clientapp(tmp_path / "bin")
    code = (
        "import sys; sys.argv = ['x']; import client.node.pinned as p; p.pin(); "
        f"sys.path.insert(0, {str(bundle)!r}); import importlib; "
        "print(importlib.import_module('client.app.client_app').__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(ROOT / "client" / "app" / "client_app.py")
    assert "-m client.node.pinned" in script.read_text()


def test_the_cold_start_script_quotes_an_interpreter_path_the_shell_would_split(
    tmp_path, monkeypatch
):
    from client.node.pinned import cold_clientapp

    python = tmp_path / "it's a $HOME dir" / "python"
    python.parent.mkdir()
    python.write_text('#!/bin/sh\nprintf "%s|" "$@"\n')
    python.chmod(0o700)
    monkeypatch.setattr(sys, "executable", str(python))
    script = cold_clientapp(tmp_path / "bin")
    out = subprocess.run([str(script), "a b"], capture_output=True, text=True, check=True)
    assert out.stdout == "-m|client.node.pinned|a b|"


def test_a_childs_garbage_collector_skips_the_inherited_heap(warm):
    """Frozen before the fork: a child's full collection does not walk (and copy) it."""
    child = seen(run(warm))
    assert child["gc_enabled"]
    assert child["gc_frozen"] > 100_000  # torch, Opacus, Flower ... as loaded
    assert child["gc_tracked"] < child["gc_frozen"] / 10  # what the child made itself


def test_children_do_not_share_random_state(warm):
    draws = {seen(run(warm))["numpy"] for _ in range(3)}
    assert len(draws) == 3


def test_an_exception_in_the_child_is_exit_1_with_its_traceback(warm):
    result = run(warm, "--raise")
    assert result.returncode == 1
    assert "the probe failed on purpose" in result.stderr
    assert seen(run(warm))["torch_preloaded"]  # the server is still serving


def test_terminating_the_stand_in_terminates_its_child(warm):
    env = {**os.environ, "PATH": f"{warm.bin_dir}{os.pathsep}{os.environ['PATH']}"}
    stand_in = subprocess.Popen(
        ["flwr-clientapp", "--sleep"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert stand_in.stdout is not None
    child = json.loads(stand_in.stdout.readline())["pid"]
    assert psutil.pid_exists(child)
    stand_in.send_signal(signal.SIGTERM)
    assert stand_in.wait(30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not psutil.pid_exists(child)


def test_a_malformed_request_is_refused_and_serving_goes_on(warm):
    sock_path = next(warm.directory.glob("*.sock"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(sock_path))
        raw.sendall(b"\x00\x00\x00\x05hello")  # a request with no standard streams
        raw.settimeout(30)
        assert raw.recv(8) == b""  # closed without starting anything
    assert run(warm, "--exit", "0").returncode == 0


def test_without_the_fork_server_the_stand_in_starts_cold(tmp_path):
    cold = tmp_path / "flwr-clientapp"
    cold.write_text('#!/bin/sh\necho "cold start: $*"\n')
    cold.chmod(0o700)
    env = {
        **os.environ,
        warm_stub.SOCKET_ENV: str(tmp_path / "no-server.sock"),
        warm_stub.COLD_ENV: str(cold),
    }
    result = subprocess.run(
        [sys.executable, "-IS", warm_stub.__file__, "--token", "t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0
    assert result.stdout.strip() == "cold start: --token t"
    assert "warm start unavailable" in result.stderr


def test_stopping_ends_running_children_and_removes_the_socket():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = WarmStart.start(env, entry="tests.client.node.warm_probe:main")
    path = {**env, "PATH": f"{server.bin_dir}{os.pathsep}{os.environ['PATH']}"}
    stand_in = subprocess.Popen(
        ["flwr-clientapp", "--sleep"], env=path, stdout=subprocess.PIPE, text=True
    )
    assert stand_in.stdout is not None
    child = json.loads(stand_in.stdout.readline())["pid"]
    server.stop()
    assert stand_in.wait(30) == 128 + signal.SIGTERM
    assert not psutil.pid_exists(child)
    assert not server.directory.exists()


def test_warm_start_is_on_by_default_and_can_be_turned_off():
    base = {"hospital-id": "h", "data-manifest": "m.csv", "state-dir": "s"}
    assert HospitalConfig.from_node_config(base).warm_start
    assert not HospitalConfig.from_node_config({**base, "warm-start": False}).warm_start
