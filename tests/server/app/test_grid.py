"""The metered grid charges each hospital for the bytes it sends and receives."""

import time

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from server.app.grid import MeteredGrid, message_bytes, metered
from tests.support.flower import make_message


class EchoGrid:
    """Each hospital replies with an array of its own size (node id x 1000 floats).

    Replies arrive one pull at a time, as from hospitals that finish at different times.
    """

    def __init__(self):
        self.queue = []

    def push_messages(self, messages):
        for msg in messages:
            node = msg.metadata.dst_node_id
            arrays = ArrayRecord([np.zeros(node * 1000, dtype=np.float32)])
            reply = Message(RecordDict({"arrays": arrays}), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            self.queue.append(reply)
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, message_ids):
        assert self.queue[0].metadata.reply_to_message_id in set(message_ids)
        return [self.queue.pop(0)]

    def get_node_ids(self):
        return [1, 2]


def request(node: int, floats: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord([np.ones(floats, dtype=np.float32)])})
    return make_message(content, MessageType.TRAIN, dst_node_id=node)


def test_message_bytes_follow_the_payload():
    small, large = message_bytes(request(1, 1_000)), message_bytes(request(1, 100_000))
    assert 4_000 < small < 6_000  # float32 payload plus a little framing
    assert 400_000 < large < 401_000
    metrics = make_message(RecordDict({"m": MetricRecord({"loss": 0.5})}), MessageType.TRAIN)
    assert message_bytes(metrics) < 1_000


def test_each_hospital_is_charged_its_own_traffic():
    grid = metered(EchoGrid())
    assert metered(grid) is grid and isinstance(grid, MeteredGrid)
    replies = grid.send_and_receive([request(1, 2_000), request(2, 2_000)])
    assert len(replies) == 2 and grid.get_node_ids() == [1, 2]  # delegation
    up1, down1, key1 = grid.node_bytes(1)
    up2, down2, _ = grid.node_bytes(2)
    assert key1 == 0  # no SecAgg+ stage here
    assert down1 == down2 > 8_000
    assert 4_000 < up1 < 5_000 and 8_000 < up2 < 9_000
    grid.reset()
    assert grid.node_bytes(1) == (0, 0, 0)


class LossyGrid(EchoGrid):
    """Flower's HTTP grid returns None for a message it could not push."""

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        self.queue = self.queue[:1]
        return [ids[0], None]


def test_a_message_that_was_not_pushed_is_not_waited_for():
    grid = metered(LossyGrid())
    started = time.monotonic()
    replies = grid.send_and_receive([request(1, 10), request(2, 10)], timeout=30)
    assert len(replies) == 1 and time.monotonic() - started < 5
    assert grid.node_bytes(2)[1] > 0  # it was still sent (and charged)


def _attributes(obj: object, out: dict[int, set] | None = None) -> dict[int, set]:
    """The keys of every dict reachable from a Flower object, read without touching any
    property (properties are what cache things)."""
    out = {} if out is None else out
    if id(obj) in out:
        return out
    if isinstance(obj, dict):
        out[id(obj)] = set(obj)
        for value in list(obj.values()):
            _attributes(value, out)
    elif isinstance(obj, list | tuple):
        for value in obj:
            _attributes(value, out)
    elif type(obj).__module__.startswith("flwr") and hasattr(obj, "__dict__"):
        _attributes(vars(obj), out)
    return out


class SnapshotGrid(EchoGrid):
    """Records every object's attributes at the moment a message is handed to Flower."""

    def push_messages(self, messages):
        messages = list(messages)
        self.pushed = [(msg, _attributes(msg)) for msg in messages]
        return super().push_messages(messages)


def test_metering_leaves_a_pushed_message_untouched():
    """In simulation, Ray pickles a pushed message in another thread at once, and the
    messages of a round share the model's arrays. Flower's objects cache what deflating
    computes in their __dict__, so measuring a message after pushing it changed a dict
    Ray was iterating ("dictionary changed size during iteration"), which also lost the
    actor from Flower's pool. The meter measures before it pushes."""
    shared = ArrayRecord([np.ones(50_000, dtype=np.float32)])  # one model, sent to all
    messages = [
        make_message(RecordDict({"arrays": shared}), MessageType.TRAIN, dst_node_id=n)
        for n in (1, 2)
    ]
    inner = SnapshotGrid()
    grid = metered(inner)
    grid.send_and_receive(messages)
    assert grid.node_bytes(1)[1] > 200_000
    for msg, at_push in inner.pushed:
        now = _attributes(msg)
        assert all(now[k] == at_push[k] for k in at_push), "an object changed after its push"


def test_a_reply_still_uploading_is_retried_within_the_reply_poll(monkeypatch):
    """Flower's grid waits 1 s, then 2, 4 ... for a missing object; metered, 20 ms to 0.5 s."""
    import threading
    from types import SimpleNamespace

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
    from flwr.superlink.grid import http_grid

    from server.app.grid import MAX_POLL, MIN_POLL

    waits: list[float] = []

    class Recorded(threading.Event):  # pull_objects's early stop: it waits out each backoff
        def wait(self, timeout=None):
            waits.append(timeout)
            return False

    flower_threading = SimpleNamespace(Event=Recorded, Lock=threading.Lock)
    monkeypatch.setattr(inflatable_utils, "threading", flower_threading)
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after
    tries = {"a": 0}

    def pull_object(object_id: str) -> bytes:
        tries[object_id] += 1
        if tries[object_id] <= 6:  # still uploading
            raise ObjectUnavailableError(object_id)
        return b"content"

    metered(EchoGrid())  # what the round loops do with the grid they are given
    assert http_grid.pull_objects(["a"], pull_object) == {"a": b"content"}
    assert len(waits) == 6
    assert waits[0] <= MIN_POLL * 1.2  # Flower's own jitter is +-20 %
    assert max(waits) <= MAX_POLL * 1.2
    assert sum(waits) < 1.5  # Flower's defaults: 1 + 2 + 4 + 8 + 10 + 10 s


def test_replies_are_polled_for_at_least_every_tenth_of_a_second(monkeypatch):
    """A hospital's reply waits at most MAX_POLL to be read, however long the stage ran;
    each reply read brings the poll back to MIN_POLL (the others are usually close)."""
    # Prepare
    from server.app import grid as grid_module
    from server.app.grid import MAX_POLL, MIN_POLL

    class SlowGrid(EchoGrid):  # each reply arrives only after 30 empty pulls
        def __init__(self):
            super().__init__()
            self.empty = 0

        def pull_messages(self, message_ids):
            self.empty += 1
            if self.empty % 31:
                return []
            return super().pull_messages(message_ids)

    slept: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", slept.append)
    grid = MeteredGrid(SlowGrid())
    # Execute
    replies = grid.send_and_receive([request(1, 10), request(2, 10)])
    # Assert
    assert len(replies) == 2
    assert MAX_POLL <= 0.1  # a reply read within 0.1 s of its arrival (Flower: 3 s)
    assert max(slept) == MAX_POLL and slept[0] <= 1.5 * MIN_POLL
    assert slept[30] == MIN_POLL  # after the first reply (the 31st pull): fast again
