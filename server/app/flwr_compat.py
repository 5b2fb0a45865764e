"""Every patch of Flower internals the ServerApp makes, written for Flower 1.42.

Each entry of :data:`PATCHED` is a Flower symbol fedfusion replaces, with the parameter
names it had in that version; ``tests/test_flwr_compat.py`` fails when one disappears or
changes its parameters, so an upgrade shows which workaround to check.

- :func:`fast_object_pulls`: the deployed grid retries an object still uploading after
  1 s, doubling to 10 s, with no setting (``server/app/grid.py`` says why that matters).
- :func:`install_secagg_primitives`: the SecAgg+ workflow's key agreement, mask
  generator and secret sharing (``shared_model/secagg_primitives.py`` says why).
- :class:`LegacyRounds`: Flower's legacy machinery, which SecAgg+ needs, driven one
  round at a time (``DefaultWorkflow`` runs all rounds in a loop of its own, which
  would leave no room for fedfusion's per-round checkpoints and short-round policy).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from shared_model import secagg_primitives

__all__ = [
    "FLOWER_VERSION",
    "PATCHED",
    "LegacyRounds",
    "fast_object_pulls",
    "install_secagg_primitives",
]

FLOWER_VERSION = "1.42"
_WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
PATCHED: dict[str, tuple[str, ...] | None] = {
    "flwr.superlink.grid.http_grid:pull_objects": (
        "object_ids",
        "pull_object_fn",
        "max_concurrent_pulls",
        "max_time",
        "max_tries_per_object",
        "initial_backoff",
        "backoff_cap",
    ),
    f"{_WORKFLOW}:bytes_to_private_key": ("private_key_bytes",),
    f"{_WORKFLOW}:bytes_to_public_key": ("public_key_bytes",),
    f"{_WORKFLOW}:generate_shared_key": ("private_key", "public_key"),
    f"{_WORKFLOW}:pseudo_rand_gen": ("seed", "num_range", "dimensions_list"),
    f"{_WORKFLOW}:combine_shares": ("share_list",),
    # driven one round at a time by LegacyRounds (Flower's DefaultWorkflow loops itself)
    "flwr.server.compat.app_utils:start_update_client_manager_thread": ("grid", "client_manager"),
    "flwr.server.workflow.constant:MAIN_CONFIGS_RECORD": None,
    "flwr.server.workflow.constant:MAIN_PARAMS_RECORD": None,
    "flwr.server.workflow.constant:Key": None,
}


def fast_object_pulls(initial: float, cap: float) -> None:
    """Retry an object of a reply that is still uploading after ``initial`` s, up to ``cap``.

    Replaces the ``pull_objects`` Flower's deployed grid calls (defaults 1 s and 10 s)
    with the same function and these two backoffs; every other argument is Flower's.
    """
    from flwr.superlink.grid import http_grid

    pull = getattr(http_grid.pull_objects, "func", http_grid.pull_objects)
    http_grid.pull_objects = functools.partial(pull, initial_backoff=initial, backoff_cap=cap)


def install_secagg_primitives(shared_key: Callable[..., bytes]) -> None:
    """Make Flower's SecAgg+ workflow use fedfusion's primitives on the server's side.

    ``shared_key`` derives the pairwise mask keys the server needs to unmask hospitals
    that dropped out (bound to the round's instruction).
    """
    workflow = importlib.import_module(_WORKFLOW)
    workflow.bytes_to_private_key = secagg_primitives.bytes_to_private_key  # type: ignore[attr-defined]
    workflow.bytes_to_public_key = secagg_primitives.bytes_to_public_key  # type: ignore[attr-defined]
    workflow.generate_shared_key = shared_key  # type: ignore[attr-defined]
    workflow.pseudo_rand_gen = secagg_primitives.pseudo_rand_gen  # type: ignore[attr-defined]
    workflow.combine_shares = secagg_primitives.combine_shares  # type: ignore[attr-defined]


class LegacyRounds:
    """A legacy ``LegacyContext`` and its client manager, run one workflow round at a time.

    Starts Flower's thread that keeps the client manager's nodes current (as
    ``DefaultWorkflow`` does), then :meth:`run` runs ``workflow`` for one round from the
    given parameters; :meth:`close` stops the thread.
    """

    def __init__(self, grid: Any, context: Any) -> None:
        import timeit

        from flwr.app import ConfigRecord
        from flwr.server.compat.app_utils import start_update_client_manager_thread
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

        self.grid, self.context = grid, context
        self._thread, self._stop, ready = start_update_client_manager_thread(
            grid, context.client_manager
        )
        ready.wait()
        config = ConfigRecord()
        config[Key.START_TIME] = timeit.default_timer()
        context.state.config_records[MAIN_CONFIGS_RECORD] = config

    def run(self, workflow: Callable[[Any, Any], None], server_round: int, parameters: Any) -> None:
        """Run ``workflow`` (SecAgg+'s fit) as round ``server_round`` from ``parameters``."""
        import flwr.compat.common.recorddict_compat as compat
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        state = self.context.state
        state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            parameters, keep_input=True
        )
        state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND] = server_round
        workflow(self.grid, self.context)

    def close(self) -> None:
        """Stop the client manager's thread."""
        self._stop.set()
        self._thread.join()
