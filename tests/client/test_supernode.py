"""The hospital's SuperNode polls every connection.poll-interval (client/supernode.py)."""

from __future__ import annotations

import importlib
import inspect
import time

import pytest

from client.launch import plan_supernode
from client.supernode import FLOWER_IDLE_POLL, ScaledTime, scale_waits
from tests.client.test_launch import hospital_file


def test_flowers_supernode_loop_still_has_the_waits_we_scale():
    """If a Flower upgrade changes its idle poll, this fails and FLOWER_IDLE_POLL is revisited."""
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    source = inspect.getsource(loop)
    assert f"time.sleep({FLOWER_IDLE_POLL:g})" in source
    assert "time.sleep(0.5)" in source


def test_the_idle_poll_becomes_the_configured_interval(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    original = loop.time, loop.pull_objects
    try:
        scaled = scale_waits(0.3)
        scaled.time.sleep(FLOWER_IDLE_POLL)  # the idle poll
        scaled.time.sleep(0.5)  # waiting for a reply
        assert slept == [0.3, 0.3 * 0.5 / FLOWER_IDLE_POLL]
        assert isinstance(loop.time, ScaledTime) and loop.time.monotonic is time.monotonic
        # an object the server is still uploading: retried after 0.1 s, not 1 s
        backoffs = loop.pull_objects.keywords
        assert backoffs == pytest.approx({"initial_backoff": 0.1, "backoff_cap": 1.0})
        assert scale_waits(0.3).pull_objects.func is original[1]  # not wrapped twice
    finally:
        loop.time, loop.pull_objects = original


def test_the_hospital_command_runs_the_scaled_supernode(tmp_path):
    path = hospital_file(tmp_path, **{"poll-interval": "0.25"})
    command = plan_supernode(path).command
    assert command[1:5] == ["-m", "client.supernode", "--poll-interval", "0.25"]
    assert "--superlink" in command and "flower-supernode" not in " ".join(command)
