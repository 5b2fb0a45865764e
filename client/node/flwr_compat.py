"""Every patch of Flower internals the hospital's node runtime makes, for Flower 1.42.

Each entry of :data:`PATCHED` is a Flower symbol fedfusion replaces or runs by name, with
the parameter names it had in that version (``None``: it must only exist);
``tests/test_flwr_compat.py`` fails when one disappears or changes its parameters, and
when code listed in :data:`PATCHED_SOURCES` differs from the code the patch was
written against.

- :func:`scale_waits`: the SuperNode loop's fixed waits (``client/node/supernode.py``
  says why) through its ``time``, ``pull_objects`` and ``_push_messages``;
- the entry points a hospital's processes run: Flower's ``flower-supernode`` and
  ``flwr-clientapp`` (forked warm by ``client/node/warm.py``, pinned to the hospital's
  own code by ``client/node/pinned.py``).

The module imports Flower only, never torch.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = [
    "CLIENTAPP",
    "FLOWER_IDLE_POLL",
    "FLOWER_VERSION",
    "PATCHED",
    "PATCHED_SOURCES",
    "SUPERNODE",
    "scale_waits",
]

FLOWER_VERSION = "1.42"
FLOWER_IDLE_POLL = 3.0  # seconds: the idle poll of flwr 1.42's SuperNode loop
_LOOP = "flwr.supernode.start_client_internal"
CLIENTAPP = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"  # a ClientApp process
SUPERNODE = "flwr.supernode.cli.flower_supernode:flower_supernode"  # the SuperNode
PATCHED: dict[str, tuple[str, ...] | None] = {
    f"{_LOOP}:time": None,
    f"{_LOOP}:pull_objects": (
        "object_ids",
        "pull_object_fn",
        "max_concurrent_pulls",
        "max_time",
        "max_tries_per_object",
        "initial_backoff",
        "backoff_cap",
    ),
    f"{_LOOP}:_push_messages": ("state", "object_store", "send", "push_object"),
    "flwr.supercore.constant:PULL_INITIAL_BACKOFF": None,
    "flwr.supercore.constant:PULL_BACKOFF_CAP": None,
    CLIENTAPP: (),
    SUPERNODE: (),
}
# The code whose fixed waits scale_waits rescales: the idle poll (time.sleep(3)) and the
# reply waits (time.sleep(0.5)); ``tests/test_flwr_compat.py`` fails when it changes.
PATCHED_SOURCES: dict[str, str] = {
    f"{_LOOP}:start_client_internal": "9e89a6eb68fbec68",
    f"{_LOOP}:_push_messages": "00bb86faffdec114",
}


def entry(ref: str) -> Callable[[], None]:
    """The function a ``module:function`` reference names."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def scale_waits(clock: Any) -> ModuleType:
    """Make Flower's SuperNode loop sleep through ``clock`` and pull objects in its scale.

    ``clock`` stands in for the ``time`` module (``clock.factor`` scales the object-pull
    retries; ``clock.active()`` is called once a reply is sent). Returns the loop module.
    """
    # Flower loads only when the SuperNode is patched: the fork server and the pinned
    # start import this module for its names alone
    from flwr.supercore.constant import PULL_BACKOFF_CAP, PULL_INITIAL_BACKOFF

    loop = importlib.import_module(_LOOP)
    loop.time = clock  # type: ignore[attr-defined]
    pull = getattr(loop.pull_objects, "func", loop.pull_objects)
    loop.pull_objects = functools.partial(  # type: ignore[attr-defined]
        pull,
        initial_backoff=PULL_INITIAL_BACKOFF * clock.factor,
        backoff_cap=PULL_BACKOFF_CAP * clock.factor,
    )
    push = getattr(loop._push_messages, "__wrapped__", loop._push_messages)

    @functools.wraps(push)
    def push_then_poll_soon(*args: Any, **kwargs: Any) -> None:
        push(*args, **kwargs)  # the reply is sent: the loop goes back to polling
        clock.active()

    loop._push_messages = push_then_poll_soon  # type: ignore[attr-defined]
    return loop
