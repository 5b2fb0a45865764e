"""Bytes on the wire, per hospital and round: a Grid that meters what it carries.

Every message the ServerApp sends to a hospital, and every reply it gets back, passes
through ``MeteredGrid``. A message's size is the sum of its serialized objects, which is
what Flower transfers between SuperLink and SuperNode (gRPC framing and TLS records add
a few bytes more). Flower stores an object that several messages share (the global model
sent to every hospital) once at the SuperLink, but each hospital downloads it, so each
hospital is charged for it.

The round driver (``server/app/rounds.py``, and ``SecAggFedAvg.begin`` in
``server/app/secagg.py``) resets the meter when a round starts and records each hospital's
``bytes_up``/``bytes_down`` when it ends, and
``key_bytes_up``: the part of ``bytes_up`` that answered SecAgg+'s key stages (public
keys, encrypted key shares, unmasking shares) rather than carrying the masked update.

``send_and_receive`` also polls for replies with a backoff from 20 ms to 0.1 s (back to
20 ms whenever a reply arrives), where Flower's deployed grid sleeps 3 s between polls:
a SecAgg+ round waits for five message stages, so that sleep alone would add up to 15 s
to a round on loopback, and a simulated stage that takes 50 ms no longer waits 0.1-0.2 s.
The cap was 0.5 s: after a training stage of a few seconds the poll had grown to it, and
the per-hop timeline of a deployed round (``benchmarks/timeline.py``) showed the
training replies read up to 0.5 s after they reached the SuperLink. Ten requests a
second to the server's own SuperLink, while a stage is in flight, cost little.

A reply can be listed at the SuperLink while its SuperNode is still uploading its
objects. Flower's deployed grid then retries each missing object after 1 s, doubling up
to 10 s (``PULL_INITIAL_BACKOFF``, with no setting), and no other reply is read
meanwhile: in a deployed round on loopback this held up about one message stage in two
by 1.0-1.3 s. ``fast_object_pulls`` (``server/app/flwr_compat.py``) makes those retries
follow the reply polling above (20 ms, growing to 0.1 s); it is applied when a grid is
metered.

With ``FEDFUSION_TIMELINE`` set (``shared_model/timeline.py``), the grid marks when each
stage's messages leave and each reply is read.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from server.app.flwr_compat import fast_object_pulls
from server.app.store import HospitalRound
from shared_model import timeline
from shared_model.protocol import SecAggSigned

__all__ = ["MeteredGrid", "message_bytes", "metered"]

MIN_POLL, MAX_POLL = 0.02, 0.1  # seconds between the ServerApp's polls for replies


def message_bytes(msg: Message) -> int:
    """Serialized size of a message: its content's objects, or its error's reason."""
    if msg.has_error():
        return len(msg.error.reason.encode())
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


_KEY_STAGES = {Stage.SETUP, Stage.SHARE_KEYS, SecAggSigned.CONSISTENCY, Stage.UNMASK}


def _secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a server message opens, if it is one."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    stage = configs.get(Key.STAGE) if configs is not None else None
    return str(stage) if stage is not None else None


def _hop(msg: Message) -> str:
    """What a server message asks, for the timeline: its SecAgg+ stage, else its type."""
    return _secagg_stage(msg) or str(msg.metadata.message_type)


class MeteredGrid:
    """Delegates to a Flower Grid and counts the bytes to and from each node."""

    def __init__(self, grid: Grid, min_poll: float = MIN_POLL, max_poll: float = MAX_POLL) -> None:
        self._grid = grid
        self.min_poll, self.max_poll = min_poll, max_poll
        self.up: Counter[int] = Counter()  # node id -> bytes received from it
        self.down: Counter[int] = Counter()  # node id -> bytes sent to it
        self.key_up: Counter[int] = Counter()  # node id -> bytes of SecAgg+ key stages
        self._key_requests: set[str] = set()
        self._addressee: dict[str, int] = {}  # message id -> the node it was sent to
        self.errors: dict[int, str] = {}  # node id -> the reason of its last error reply
        self._hops: dict[str, str] = {}  # message id -> what it asked (timeline only)

    def reset(self) -> None:
        """Start counting a new round."""
        self.up.clear()
        self.down.clear()
        self.key_up.clear()
        self._key_requests.clear()
        self._addressee.clear()
        self.errors.clear()
        self._hops.clear()
        timeline.mark("server.round")

    def node_bytes(self, node_id: int) -> tuple[int, int, int]:
        """(bytes up, bytes down, key-stage bytes up) of one node since the last reset."""
        return self.up[node_id], self.down[node_id], self.key_up[node_id]

    def charge(self, entries: Iterable[HospitalRound]) -> None:
        """Record each hospital's bytes since the last reset on its round entry."""
        for entry in entries:
            entry.bytes_up, entry.bytes_down, entry.key_bytes_up = self.node_bytes(entry.node_id)

    def _received(self, replies: list[Message]) -> None:
        for msg in replies:
            # The SuperLink answers for a node it considers gone ("Node Unavailable") with
            # an error from itself (node 1): put the failure on the node that was asked,
            # or the round would blame node 1 and count the hospital again as silent.
            addressee = self._addressee.get(msg.metadata.reply_to_message_id)
            if addressee is not None and msg.metadata.src_node_id != addressee:
                msg.metadata.__dict__["_src_node_id"] = addressee
            if msg.has_error():
                self.errors[msg.metadata.src_node_id] = msg.error.reason
            hop = self._hops.get(msg.metadata.reply_to_message_id)
            timeline.mark("server.reply", stage=hop, node=msg.metadata.src_node_id)
            size = message_bytes(msg)
            self.up[msg.metadata.src_node_id] += size
            if msg.metadata.reply_to_message_id in self._key_requests:
                self.key_up[msg.metadata.src_node_id] += size

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push messages, then pull replies until all arrived or ``timeout`` passed (metered)."""
        pending = {i for i in self.push_messages(messages) if i}  # None: not pushed
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = self.min_poll
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {msg.metadata.reply_to_message_id for msg in got}
            wait = self.min_poll if got else min(wait * 1.5, self.max_poll)
            if pending:
                time.sleep(wait)
        timeline.mark("server.replies", pending=len(pending))
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Flower's push_messages, metered."""
        messages = list(messages)
        # Measured before the push: measuring deflates, and Flower's objects cache what
        # that computes in their __dict__. In simulation, Ray pickles a pushed message
        # in another thread at once, and messages share the model's arrays: a key added
        # mid-pickle failed it ("dictionary changed size during iteration"), and the
        # actor it had taken never returned to Flower's pool ("pop from empty list").
        sizes = [(msg.metadata.dst_node_id, message_bytes(msg)) for msg in messages]
        hop = _hop(messages[0]) if messages and timeline.enabled() else None
        timeline.mark("server.push", stage=hop, messages=len(messages))
        ids = list(self._grid.push_messages(messages))
        timeline.mark("server.pushed", stage=hop)
        for node, size in sizes:
            self.down[node] += size
        for msg in messages:  # Flower sets each pushed message's id on it
            if msg.metadata.message_id:
                self._addressee[msg.metadata.message_id] = msg.metadata.dst_node_id
                if hop is not None:
                    self._hops[msg.metadata.message_id] = hop
        # Flower returns one id per message in order (None where a push failed), or, in
        # simulation, only the ids that were stored; one batch is one protocol stage.
        if len(ids) == len(messages):
            stages = [_secagg_stage(msg) for msg in messages]
        else:
            stages = [_secagg_stage(messages[0]) if messages else None] * len(ids)
        self._key_requests.update(
            i for i, stage in zip(ids, stages, strict=True) if i and stage in _KEY_STAGES
        )
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Flower's pull_messages, metered."""
        replies = list(self._grid.pull_messages(message_ids))
        self._received(replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def metered(grid: Grid | MeteredGrid) -> MeteredGrid:
    """``grid`` with a meter (itself, if it has one already), and fast object pulls."""
    fast_object_pulls(MIN_POLL, MAX_POLL)
    return grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid)
