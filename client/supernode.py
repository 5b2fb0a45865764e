"""`python -m client.supernode --poll-interval S ARGS`: Flower's SuperNode, waiting less.

Flower 1.41's SuperNode loop (``flwr.supernode.start_client_internal``) has fixed waits:
an idle SuperNode asks the SuperLink for work every 3 s, and while a ClientApp runs it
looks for the reply every 0.5 s. A round sends each hospital at least two messages
(train, evaluate; five under SecAgg+), so on a fast link those waits, not the work, set
the round time: about 1.5 s of idle wait per message on average.

This runs Flower's own ``flower-supernode`` with every wait of that loop scaled by
``poll-interval / 3``: the idle poll becomes ``poll-interval`` and the reply checks
shrink in proportion, and so do the retries for an object of a message that the server
is still uploading (Flower: after 1 s, doubling up to 10 s). Nothing else changes. The
cost is on the server: one request per hospital per interval while idle, hence
``connection.poll-interval`` (default 0.5 s). The module imports Flower only, never torch.
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
from types import ModuleType

__all__ = ["FLOWER_IDLE_POLL", "ScaledTime", "main"]

FLOWER_IDLE_POLL = 3.0  # seconds: the idle poll of flwr 1.41's SuperNode loop
_LOOP = "flwr.supernode.start_client_internal"


class ScaledTime:
    """The ``time`` module, with ``sleep`` scaled by a factor."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds * factor``."""
        time.sleep(seconds * self.factor)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def scale_waits(poll_interval: float) -> ModuleType:
    """Make Flower's SuperNode loop poll every ``poll_interval`` s when idle; returns it."""
    from flwr.supercore.constant import PULL_BACKOFF_CAP, PULL_INITIAL_BACKOFF

    loop = importlib.import_module(_LOOP)
    factor = poll_interval / FLOWER_IDLE_POLL
    loop.time = ScaledTime(factor)  # type: ignore[attr-defined]
    pull = getattr(loop.pull_objects, "func", loop.pull_objects)
    loop.pull_objects = functools.partial(  # type: ignore[attr-defined]
        pull,
        initial_backoff=PULL_INITIAL_BACKOFF * factor,
        backoff_cap=PULL_BACKOFF_CAP * factor,
    )
    return loop


def main(argv: list[str] | None = None) -> None:
    """Parse ``--poll-interval S``, then run ``flower-supernode`` with the other arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--poll-interval":
        raise SystemExit("usage: python -m client.supernode --poll-interval S [flower args]")
    scale_waits(float(args[1]))
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *args[2:]]
    flower_supernode()


if __name__ == "__main__":
    main()
