"""Bytes on the wire, per hospital and round: a Grid that meters what it carries.

Every message the ServerApp sends to a hospital, and every reply it gets back, passes
through ``MeteredGrid``. A message's size is the sum of its serialized objects, which is
what Flower transfers between SuperLink and SuperNode (gRPC framing and TLS records add
a few bytes more). Flower stores an object that several messages share (the global model
sent to every hospital) once at the SuperLink, but each hospital downloads it, so each
hospital is charged for it.

The round loops (``server/strategy.py``, ``server/secagg.py``) reset the meter when a
round starts and record each hospital's ``bytes_up``/``bytes_down`` when it ends.

``send_and_receive`` also polls for replies every 0.2 s, where Flower's deployed grid
sleeps 3 s between polls: a SecAgg+ round waits for five message stages, so that sleep
alone added up to 15 s to a round on loopback.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

__all__ = ["MeteredGrid", "message_bytes", "metered"]


def message_bytes(msg: Message) -> int:
    """Serialized size of a message: its content's objects, or its error's reason."""
    if msg.has_error():
        return len(msg.error.reason.encode())
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


class MeteredGrid:
    """Delegates to a Flower Grid and counts the bytes to and from each node."""

    def __init__(self, grid: Grid, poll_interval: float = 0.2) -> None:
        self._grid = grid
        self.poll_interval = poll_interval
        self.up: Counter[int] = Counter()  # node id -> bytes received from it
        self.down: Counter[int] = Counter()  # node id -> bytes sent to it

    def reset(self) -> None:
        """Start counting a new round."""
        self.up.clear()
        self.down.clear()

    def node_bytes(self, node_id: int) -> tuple[int, int]:
        """(bytes up, bytes down) of one node since the last reset."""
        return self.up[node_id], self.down[node_id]

    def _sent(self, messages: list[Message]) -> None:
        for msg in messages:
            self.down[msg.metadata.dst_node_id] += message_bytes(msg)

    def _received(self, replies: list[Message]) -> None:
        for msg in replies:
            self.up[msg.metadata.src_node_id] += message_bytes(msg)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push messages, then pull replies until all arrived or ``timeout`` passed (metered)."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {msg.metadata.reply_to_message_id for msg in got}
            if pending:
                time.sleep(self.poll_interval)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Flower's push_messages, metered."""
        messages = list(messages)
        self._sent(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Flower's pull_messages, metered."""
        replies = list(self._grid.pull_messages(message_ids))
        self._received(replies)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def metered(grid: Grid | MeteredGrid) -> MeteredGrid:
    """``grid`` with a meter (itself, if it has one already)."""
    return grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid)
