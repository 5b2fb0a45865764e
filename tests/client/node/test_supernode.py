"""The hospital's SuperNode polls every connection.poll-interval (client/node/supernode.py)."""

from __future__ import annotations

import importlib
import itertools
import time

import pytest

from client.node.launch import plan_supernode
from client.node.supernode import FIRST_POLL, FLOWER_IDLE_POLL, ScaledTime, scale_waits
from tests.support.hospitals import hospital_file


@pytest.fixture
def loop():
    """Flower's SuperNode loop module, restored after the test scaled it."""
    module = importlib.import_module("flwr.supernode.start_client_internal")
    saved = module.time, module.pull_objects, module._push_messages
    yield module
    module.time, module.pull_objects, module._push_messages = saved


def test_the_idle_poll_becomes_the_configured_interval(monkeypatch, loop):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    original_pull = loop.pull_objects
    scaled = scale_waits(0.3)
    scaled.time.sleep(FLOWER_IDLE_POLL)  # the idle poll
    scaled.time.sleep(0.5)  # waiting for a reply
    assert slept == [0.3, 0.3 * 0.5 / FLOWER_IDLE_POLL]
    assert isinstance(loop.time, ScaledTime) and loop.time.monotonic is time.monotonic
    # an object the server is still uploading: retried after 0.1 s, not 1 s
    backoffs = loop.pull_objects.keywords
    assert backoffs == pytest.approx({"initial_backoff": 0.1, "backoff_cap": 1.0})
    assert scale_waits(0.3).pull_objects.func is original_pull  # not wrapped twice


def test_after_a_reply_the_idle_poll_starts_fast_and_backs_off(monkeypatch, loop):
    """The next message of a round follows soon: polled for within 50 ms, then less often."""
    slept, pushed = [], []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(loop, "_push_messages", lambda **kw: pushed.append(kw))
    scaled = scale_waits(0.5)
    scaled._push_messages(state="s")  # Flower's loop, once it has sent a reply
    assert pushed == [{"state": "s"}]
    for _ in range(8):
        scaled.time.sleep(FLOWER_IDLE_POLL)
    assert slept[0] == FIRST_POLL
    assert all(b == pytest.approx(min(a * 1.5, 0.5)) for a, b in itertools.pairwise(slept))
    assert slept[-1] == 0.5  # an idle node is back to one request per interval
    scaled.time.sleep(0.5)  # a reply check is not an idle poll: scaled only
    assert slept[-1] == pytest.approx(0.5 * 0.5 / FLOWER_IDLE_POLL)
    scale_waits(0.5)._push_messages()  # wrapping again wraps Flower's, not ours
    assert pushed[-1] == {}


def test_the_hospital_command_runs_the_scaled_supernode(tmp_path):
    path = hospital_file(tmp_path, **{"poll-interval": "0.25"})
    command = plan_supernode(path).command
    assert command[1:5] == ["-m", "client.node.supernode", "--poll-interval", "0.25"]
    assert "--superlink" in command and "flower-supernode" not in " ".join(command)
