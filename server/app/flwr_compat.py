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
import timeit
from collections.abc import Callable
from logging import WARNING
from typing import Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.common.logger import log
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from server.app.registry import HospitalRegistry
from shared_model import secagg_primitives
from shared_model.protocol import SecAggSigned
from shared_model.secagg_signatures import advert_statement, public_line

__all__ = [
    "FLOWER_VERSION",
    "PATCHED",
    "PATCHED_SOURCES",
    "LegacyRounds",
    "SignedSecAggPlusWorkflow",
    "fast_object_pulls",
    "install_secagg_primitives",
]

FLOWER_VERSION = "1.42"
_WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
_STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")
_STAGE = ("self", "grid", "context", "state")
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
    # SignedSecAggPlusWorkflow extends these stages and reads the workflow's state
    **{f"{_WORKFLOW}:SecAggPlusWorkflow.{stage}": _STAGE for stage in _STAGES},
    f"{_WORKFLOW}:SecAggPlusWorkflow._check_threshold": ("self", "state"),
    f"{_WORKFLOW}:WorkflowState": None,
}
# What SignedSecAggPlusWorkflow relies on inside those stages (which messages each sends,
# what it reads back, which state fields it sets): the source it was checked against,
# by SHA-256 prefix. tests/test_flwr_compat.py fails when Flower's source changes.
PATCHED_SOURCES: dict[str, str] = {
    f"{_WORKFLOW}:SecAggPlusWorkflow.setup_stage": "892a5a68cc6aef04",
    f"{_WORKFLOW}:SecAggPlusWorkflow.share_keys_stage": "a22dfd6309540039",
    f"{_WORKFLOW}:SecAggPlusWorkflow.collect_masked_vectors_stage": "e2e2900e524ba35a",
    f"{_WORKFLOW}:SecAggPlusWorkflow.unmask_stage": "c4639d18768446e9",
    f"{_WORKFLOW}:SecAggPlusWorkflow._check_threshold": "5cbbc3639376397c",
    f"{_WORKFLOW}:WorkflowState": "91415782137e66cd",
}


def fast_object_pulls(initial: float, cap: float) -> None:
    """Retry an object of a reply that is still uploading after ``initial`` s, up to ``cap``.

    Replaces the ``pull_objects`` Flower's deployed grid calls (defaults 1 s and 10 s)
    with the same function and these two backoffs; every other argument is Flower's.
    """
    # Flower's deployed grid takes about 2 s to import: a simulation never loads it
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


class _Relay:
    """A grid through which a workflow stage's messages are amended and its replies read.

    ``amend`` may change each message before it is sent, or return None to withhold it
    (a revoked hospital); ``replies`` collects what came back.
    """

    def __init__(
        self,
        grid: Any,
        amend: Callable[[Any], Any | None] | None = None,
        replies: list[Any] | None = None,
    ) -> None:
        self._grid, self._amend, self._replies = grid, amend, replies

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        """Send the amended messages, keep the replies."""
        if self._amend is not None:
            messages = [m for m in map(self._amend, messages) if m is not None]
        got = list(self._grid.send_and_receive(messages, timeout=timeout))
        if self._replies is not None:
            self._replies.extend(got)
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class SignedSecAggPlusWorkflow(SecAggPlusWorkflow):  # type: ignore[misc]
    """Flower's ``SecAggPlusWorkflow`` with signed keys and a consistency round.

    The hospitals (``client/app/secagg_guard.py``) take part only in this protocol. What
    it adds to Flower's four stages, without changing their messages:

    - key setup: each reply carries the hospital's signed key advertisement; with a
      ``registry`` (`fedfusion server`), one that no registered key signed drops the
      hospital from the round;
    - key sharing: each hospital gets its neighbours' advertisements with their keys;
    - consistency (new, before unmasking): every survivor gets the set of hospitals that
      completed the key exchange and the set whose uploads arrived, and signs it;
    - unmasking: every survivor gets those signatures; dropped hospitals are those that
      completed the key exchange but did not upload (Flower counts every hospital
      sampled, so one lost at key setup would fail the round).

    With a registry, a hospital whose key leaves it mid-run gets no further message.
    """

    def __init__(self, *, registry: HospitalRegistry | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.registry = registry
        self._reset()

    def _reset(self) -> None:
        self.members: dict[int, str] = {}  # node id -> member, verified against the registry
        self.adverts: dict[int, tuple[str, bytes]] = {}  # node id -> (member, signature)
        self.verified: dict[int, bytes] = {}  # node id -> the registered key line it used
        self.revoked: set[int] = set()
        self.completed: set[int] = set()

    def _allowed(self, msg: Message) -> Message | None:
        """``msg``, or None for a hospital whose key is no longer registered."""
        nid = msg.metadata.dst_node_id
        if self.registry is None or nid not in self.members:
            return msg
        listed = self.registry.current().keys.get(self.members[nid])
        if listed is not None and public_line(listed) == self.verified[nid]:
            return msg
        if nid not in self.revoked:
            self.revoked.add(nid)
            log(
                WARNING,
                "[fedfusion] %s (node %d): its key is no longer registered; its messages "
                "are refused from now on",
                self.members[nid],
                nid,
            )
        return None

    def _advert(self, nid: int) -> tuple[str, bytes]:
        return self.adverts.get(nid, ("", b""))

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Flower's key setup; keeps each hospital's signed advertisement."""
        self._reset()
        replies: list[Message] = []
        ok = super().setup_stage(_Relay(grid, replies=replies), context, state)
        plan = (len(state.sampled_node_ids), state.num_shares, state.threshold)
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        allowed = self.registry.current() if self.registry is not None else None
        for msg in replies:
            if msg.has_error():
                continue
            out = msg.content.config_records[RECORD_KEY_CONFIGS]
            nid = msg.metadata.src_node_id
            member = str(out.get(SecAggSigned.MEMBER, ""))
            self.adverts[nid] = (member, bytes(out.get(SecAggSigned.SIGNATURE, b"")))  # type: ignore[arg-type]
            if allowed is None:
                continue
            pks = (out[SecAggKey.PUBLIC_KEY_1], out[SecAggKey.PUBLIC_KEY_2])
            statement = advert_statement(msg.metadata.run_id, server_round, nid, plan, *pks)  # type: ignore[arg-type]
            if allowed.verify(member, self.adverts[nid][1], statement):
                self.members[nid], self.verified[nid] = member, public_line(allowed.keys[member])
            else:
                log(
                    WARNING,
                    "[fedfusion] node %d: its keys carry no signature of a registered "
                    "hospital (it claimed %r): refused",
                    nid,
                    member,
                )
                state.active_node_ids.discard(nid)
        return bool(ok) and self._check_threshold(state)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Flower's key sharing, each key list with its signed advertisements."""

        def amend(msg: Message) -> Message | None:
            keys = msg.content.config_records[RECORD_KEY_CONFIGS]
            nodes = [int(k) for k in keys if k != SecAggKey.STAGE]
            msg.content.config_records[SecAggSigned.ADVERTS] = ConfigRecord(
                {
                    SecAggSigned.NODES: nodes,
                    SecAggSigned.MEMBERS: [self._advert(n)[0] for n in nodes],
                    SecAggSigned.SIGS: [self._advert(n)[1] for n in nodes],
                }
            )
            return self._allowed(msg)

        ok = super().share_keys_stage(_Relay(grid, amend), context, state)
        self.completed = set(state.active_node_ids)
        return bool(ok)

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Flower's masked upload (to registered hospitals only)."""
        relay = _Relay(grid, self._allowed)
        return bool(super().collect_masked_vectors_stage(relay, context, state))

    def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """The consistency round, then Flower's unmasking with the signatures."""
        survivors, completed = sorted(state.active_node_ids), sorted(self.completed)
        group = str(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        view = {SecAggSigned.COMPLETED: completed, SecAggSigned.SURVIVORS: survivors}

        def ask(nid: int) -> Message:
            stage = ConfigRecord({SecAggKey.STAGE: SecAggSigned.CONSISTENCY, **view})
            content = RecordDict({RECORD_KEY_CONFIGS: stage})
            return Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=group)

        relay = _Relay(grid, self._allowed)
        signed: dict[int, bytes] = {}
        for msg in relay.send_and_receive([ask(n) for n in survivors], timeout=self.timeout):
            if msg.has_error():
                state.failures.append(Exception(msg.error))
                continue
            out = msg.content.config_records[RECORD_KEY_CONFIGS]
            signed[msg.metadata.src_node_id] = bytes(out.get(SecAggSigned.SIGNATURE, b""))  # type: ignore[arg-type]
        quorum = max(state.threshold, len(completed) // 2 + 1)
        if len(signed) < quorum:
            log(
                WARNING,
                "[fedfusion] SecAgg+: %d of %d survivors signed the survivor set, %d needed",
                len(signed),
                len(survivors),
                quorum,
            )
            return False
        nodes = sorted(signed)
        record = ConfigRecord(
            {
                **view,
                SecAggSigned.NODES: nodes,
                SecAggSigned.MEMBERS: [self._advert(n)[0] for n in nodes],
                SecAggSigned.SIGS: [signed[n] for n in nodes],
            }
        )

        def amend(msg: Message) -> Message | None:
            msg.content.config_records[SecAggSigned.SIGNATURES] = record
            return self._allowed(msg)

        state.sampled_node_ids = set(self.completed)
        return bool(super().unmask_stage(_Relay(grid, amend), context, state))
