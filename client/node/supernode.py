"""`python -m client.node.supernode --poll-interval S ARGS`: Flower's SuperNode, waiting less.

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) has fixed waits:
an idle SuperNode asks the SuperLink for work every 3 s, and while a ClientApp runs it
looks for the reply every 0.5 s. A round sends each hospital at least two messages
(train, evaluate; five under SecAgg+), so on a fast link those waits, not the work, set
the round time: about 1.5 s of idle wait per message on average.

This runs Flower's own ``flower-supernode`` with those waits shortened:

- the idle poll becomes ``poll-interval``. The cost is on the server: one request per
  hospital per interval while idle, hence ``connection.poll-interval`` (default 0.5 s);
- an object of a message that the server is still uploading (the SuperLink lists a
  message before its objects have all arrived) is asked for again after
  ``OBJECT_RETRY`` (20 ms, doubling up to 0.5 s; Flower: after 1 s, doubling up to
  10 s; scaled to the poll interval before, 0.17 s, which the per-hop timeline showed
  in most message stages);
- the checks for a finished ClientApp's reply, and for its content, look at this
  SuperNode's own state, never the network: every ``REPLY_POLL`` (10 ms) instead of
  0.5 s;
- the idle poll is adaptive. A round's next message usually follows a hospital's reply
  within a few seconds (the server waits for the slowest hospital, aggregates, then
  sends the next stage), and with a fixed poll it waited for the hospital's next poll:
  measured on loopback, 0.3-0.5 s per message, because the polls fall into step with
  the rounds. After each reply the poll starts at ``FIRST_POLL`` (50 ms) and grows by
  ``IDLE_GROWTH`` (a fifth) at each empty poll back to ``poll-interval``: a message
  that comes 1 s after the reply waits at most about 0.2 s (growing by half, as
  before: 0.4 s), for about 13 more requests per reply, all within 3 s of it.

- the heartbeat comes every ``connection.heartbeat-interval`` (Flower's: 30 s), which
  sets how soon the server notices a crashed hospital and lets it rejoin.

Nothing else changes. The module imports Flower only, never torch.
"""

from __future__ import annotations

import sys
import time
from types import ModuleType

from client.node import flwr_compat
from client.node.flwr_compat import FLOWER_IDLE_POLL

__all__ = [
    "FIRST_POLL",
    "FLOWER_IDLE_POLL",
    "FLOWER_REPLY_POLL",
    "IDLE_GROWTH",
    "OBJECT_RETRY",
    "REPLY_POLL",
    "ScaledTime",
    "main",
    "scale_waits",
]

FIRST_POLL = 0.05  # seconds: the first idle poll after the node answered a message
IDLE_GROWTH = 1.2  # each empty idle poll after a reply waits this much longer
FLOWER_REPLY_POLL = 0.5  # seconds: flwr 1.42's checks of its own state for a reply
REPLY_POLL = 0.01  # seconds: those checks here (local state, no request)
OBJECT_RETRY = (0.02, 0.5)  # seconds: first retry of an object still uploading, and the cap


class ScaledTime:
    """The ``time`` module for Flower's SuperNode loop: waits shortened, the idle poll adaptive.

    The idle poll waits ``poll_interval``; once the node has handled a message
    (``active``) it starts at ``FIRST_POLL`` and grows by ``IDLE_GROWTH`` at each empty
    poll, back up to ``poll_interval``. The reply checks wait ``REPLY_POLL``; any other
    ``sleep`` is scaled by ``poll_interval / FLOWER_IDLE_POLL``.
    """

    def __init__(self, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self.factor = poll_interval / FLOWER_IDLE_POLL
        self.idle = poll_interval  # the next idle poll

    def object_backoff(self, initial: float, cap: float) -> tuple[float, float]:
        """Flower's retry backoff for an object still uploading, shortened to ``OBJECT_RETRY``."""
        return min(OBJECT_RETRY[0], initial), min(OBJECT_RETRY[1], cap)

    def active(self) -> None:
        """The node just answered a message: the next one likely follows within a second."""
        self.idle = min(FIRST_POLL, self.poll_interval)

    def sleep(self, seconds: float) -> None:
        """Sleep as Flower asked, scaled; an idle poll adaptively."""
        if seconds == FLOWER_REPLY_POLL:
            time.sleep(min(REPLY_POLL, seconds * self.factor))
            return
        if seconds != FLOWER_IDLE_POLL:
            time.sleep(seconds * self.factor)
            return
        wait, self.idle = self.idle, min(self.idle * IDLE_GROWTH, self.poll_interval)
        time.sleep(wait)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def scale_waits(poll_interval: float) -> ModuleType:
    """Make Flower's SuperNode loop wait in proportion to ``poll_interval``; returns it.

    Its idle poll becomes ``poll_interval`` (from ``FIRST_POLL`` right after each reply),
    its reply checks ``REPLY_POLL``, and its object-pull retries ``OBJECT_RETRY``.
    """
    return flwr_compat.scale_waits(ScaledTime(poll_interval))


_USAGE = (
    "usage: python -m client.node.supernode --poll-interval S [--heartbeat-interval S] "
    "[flower args]"
)


def main(argv: list[str] | None = None) -> None:
    """Run ``flower-supernode``, its waits from ``--poll-interval``, ``--heartbeat-interval``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--poll-interval":
        raise SystemExit(_USAGE)
    scale_waits(float(args[1]))
    args = args[2:]
    if args[:1] == ["--heartbeat-interval"]:
        if len(args) < 2:
            raise SystemExit(_USAGE)
        flwr_compat.heartbeat_every(float(args[1]))
        args = args[2:]
    sys.argv = ["flower-supernode", *args]
    flwr_compat.entry(flwr_compat.SUPERNODE)()


if __name__ == "__main__":
    main()
