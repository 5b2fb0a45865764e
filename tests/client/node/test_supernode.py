"""The hospital's SuperNode polls every connection.poll-interval (client/node/supernode.py)."""

from __future__ import annotations

import importlib
import itertools
import sys
import time
from types import SimpleNamespace

import pytest

from client.node.launch import plan_supernode
from client.node.supernode import (
    FIRST_POLL,
    FLOWER_IDLE_POLL,
    FLOWER_REPLY_POLL,
    IDLE_GROWTH,
    REPLY_POLL,
    ScaledTime,
    scale_waits,
)
from shared_model.timeline import TIMELINE_ENV, read
from tests.support.hospitals import hospital_file


@pytest.fixture
def loop():
    """Flower's SuperNode loop module, restored after the test scaled it."""
    module = importlib.import_module("flwr.supernode.start_client_internal")
    saved = module.time, module.pull_objects, module._push_messages, module._pull_and_store_message
    yield module
    (
        module.time,
        module.pull_objects,
        module._push_messages,
        module._pull_and_store_message,
    ) = saved


def test_the_idle_poll_becomes_the_configured_interval(monkeypatch, loop):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    original_pull = loop.pull_objects
    scaled = scale_waits(0.3)
    scaled.time.sleep(FLOWER_IDLE_POLL)  # the idle poll
    scaled.time.sleep(FLOWER_REPLY_POLL)  # waiting for a reply: a look at its own state
    scaled.time.sleep(2.0)  # any other wait: in proportion
    assert slept == [0.3, REPLY_POLL, 2.0 * 0.3 / FLOWER_IDLE_POLL]
    assert REPLY_POLL <= 0.02
    assert isinstance(loop.time, ScaledTime) and loop.time.monotonic is time.monotonic
    # an object the server is still uploading: retried after 20 ms, not 1 s
    backoffs = loop.pull_objects.keywords
    assert backoffs == pytest.approx({"initial_backoff": 0.02, "backoff_cap": 0.5})
    assert scale_waits(0.3).pull_objects.func is original_pull  # not wrapped twice


def test_after_a_reply_the_idle_poll_starts_fast_and_backs_off(monkeypatch, loop):
    """The next message of a round follows soon: polled for within 50 ms, then less often.

    A message 1 s after the reply waits at most about 0.2 s (Flower: 3 s); within 3 s
    the node is back to one request per interval.
    """
    slept, pushed = [], []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(loop, "_push_messages", lambda **kw: pushed.append(kw))
    scaled = scale_waits(0.5)
    scaled._push_messages(state="s")  # Flower's loop, once it has sent a reply
    assert pushed == [{"state": "s"}]
    for _ in range(20):
        scaled.time.sleep(FLOWER_IDLE_POLL)
    assert slept[0] == FIRST_POLL
    assert all(b == pytest.approx(min(a * IDLE_GROWTH, 0.5)) for a, b in itertools.pairwise(slept))
    elapsed = list(itertools.accumulate(slept))
    first_after_1s = next(i for i, t in enumerate(elapsed) if t >= 1.0)
    assert slept[first_after_1s] <= 0.22  # the wait that a message at 1 s falls into
    assert elapsed[slept.index(0.5)] <= 3.0  # fast polling ends within 3 s of the reply
    assert slept[-1] == 0.5  # an idle node is back to one request per interval
    scaled.time.sleep(FLOWER_REPLY_POLL)  # a reply check is not an idle poll
    assert slept[-1] == REPLY_POLL
    scale_waits(0.5)._push_messages()  # wrapping again wraps Flower's, not ours
    assert pushed[-1] == {}


def test_a_pulled_message_and_a_sent_reply_are_marked_on_the_timeline(tmp_path, monkeypatch, loop):
    """Only when a message arrived (Flower returns its run id); empty polls mark nothing."""
    # Prepare
    trace = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(TIMELINE_ENV, str(trace))
    arrivals = iter([None, 42, None])

    def flower_pull(receive, **_kw: object) -> int | None:
        return receive()  # Flower asks the SuperLink, then downloads the objects

    monkeypatch.setattr(loop, "_pull_and_store_message", flower_pull)
    monkeypatch.setattr(loop, "_push_messages", lambda **kw: None)
    state = SimpleNamespace(get_node_id=lambda: 7)
    scaled = scale_waits(0.5)
    # Execute
    got = [
        scaled._pull_and_store_message(state=state, receive=lambda: next(arrivals))
        for _ in range(3)
    ]
    scaled._push_messages(state=state)
    # Assert
    assert got == [None, 42, None]  # Flower's loop sees what Flower returned
    events = read(trace)
    names = [e["event"] for e in events]
    assert names == ["node.listed", "node.pulled", "node.reply-wait", "node.sent"]
    assert all(e["node"] == 7 for e in events)
    assert scale_waits(0.5)._pull_and_store_message.__wrapped__ is flower_pull  # not twice


def test_the_hospital_command_runs_the_scaled_supernode(tmp_path):
    path = hospital_file(tmp_path, **{"poll-interval": "0.25"})
    command = plan_supernode(path).command
    assert command[1:5] == ["-m", "client.node.supernode", "--poll-interval", "0.25"]
    assert "--superlink" in command and "flower-supernode" not in " ".join(command)


def test_the_heartbeat_interval_is_the_hospitals_setting(tmp_path, monkeypatch):
    """Flower sends a heartbeat every 30 s and the server frees a crashed hospital 60 s
    after its last one; connection.heartbeat-interval sets both, within Flower's bounds."""
    from client.node import flwr_compat
    from client.node import supernode as wrapper
    from shared_model.config import ConfigError

    def command(case: str, **connection: str) -> list[str]:
        (tmp_path / case).mkdir()
        return plan_supernode(hospital_file(tmp_path / case, **connection)).command

    default = command("default")
    assert default[default.index("--heartbeat-interval") + 1] == "30.0"  # Flower's own
    shorter = command("shorter", **{"heartbeat-interval": "12"})
    assert shorter[shorter.index("--heartbeat-interval") + 1] == "12.0"
    with pytest.raises(ConfigError, match="heartbeat-interval"):
        command("too-short", **{"heartbeat-interval": "5"})  # the SuperLink refuses < 10 s
    # freed 180 s after its last heartbeat: a restart retrying for 120 s would give up first
    with pytest.raises(ConfigError, match="rejoin-timeout 120s is shorter than the 180s"):
        command("long", **{"heartbeat-interval": "90"})
    command("long-enough", **{"heartbeat-interval": "90", "rejoin-timeout": "200"})

    fleet = importlib.import_module("flwr.supernode.fleet_http_connection")
    sender = importlib.import_module("flwr.supercore.heartbeat")
    for module in (fleet, sender):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(wrapper, "scale_waits", lambda poll: None)
    ran = []
    monkeypatch.setattr(flwr_compat, "entry", lambda ref: lambda: ran.append(sys.argv))
    wrapper.main(["--poll-interval", "0.5", "--heartbeat-interval", "12", "--superlink", "x:1"])
    assert ran == [["flower-supernode", "--superlink", "x:1"]]
    assert fleet.HEARTBEAT_DEFAULT_INTERVAL == sender.HEARTBEAT_DEFAULT_INTERVAL == 12.0
