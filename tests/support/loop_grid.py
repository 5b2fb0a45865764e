"""The ServerApp's real SecAgg+ rounds against hospitals' ClientApps, in one process.

:class:`LoopGrid` is a Flower grid that delivers each message at once by calling the
hospital's ClientApp with that hospital's own ``Context`` (kept across messages, as a
SuperNode keeps it). ``server/app/secagg.py``'s driver runs on it unchanged: the
workflow, its consistency round, the strategy. ``before_push`` lets a test act between
stages (revoke a key, stop a hospital).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from server.app.secagg import SecAggRounds
from shared_model.config import RunConfig
from shared_model.masked_upload import UploadCodec
from shared_model.packing import WeightLayout
from tests.support.flower import make_context
from tests.support.hostile_server import NOW, hospital_app

__all__ = ["LoopGrid", "loop_federation", "secagg_round"]


def _received(msg: Message) -> Message:
    """The message as its hospital gets it: its own copy of every config record."""
    content = RecordDict()
    for name, record in msg.content.array_records.items():
        content.array_records[name] = record  # arrays are only read
    for name, config in msg.content.config_records.items():
        content.config_records[name] = ConfigRecord(dict(config))
    for name, metrics in msg.content.metric_records.items():
        content.metric_records[name] = MetricRecord(dict(metrics))
    return Message(content=content, metadata=copy.copy(msg.metadata))


class LoopGrid:
    """Hospitals ``contexts`` (node id -> Context), each answering through ``app``."""

    def __init__(self, app: ClientApp, contexts: dict[int, Context], run_id: int = 7) -> None:
        self.app, self.contexts = app, contexts
        self.run = SimpleNamespace(run_id=run_id)
        self.silent: set[int] = set()  # hospitals that no longer answer
        self.delivered: list[tuple[int, str]] = []  # (node, stage) of every message
        self.before_push: Callable[[str], None] | None = None  # called with each stage
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count()

    def get_node_ids(self) -> Iterable[int]:
        """The hospitals connected."""
        return [n for n in self.contexts if n not in self.silent]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now; keep its reply for :meth:`pull_messages`."""
        messages = list(messages)
        if self.before_push is not None and messages:
            configs = messages[0].content.config_records.get(RECORD_KEY_CONFIGS, {})
            self.before_push(str(configs.get(Key.STAGE, "")))
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_run_id"] = self.run.run_id
            node = msg.metadata.dst_node_id
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
            self.delivered.append((node, str(configs.get(Key.STAGE, ""))))
            if node not in self.silent:  # a copy, as if it crossed the wire (the mod edits it)
                self._replies[mid] = self.app(_received(msg), self.contexts[node])
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that arrived for ``message_ids``."""
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]


def loop_federation(
    tmp: Path,
    nodes: Sequence[int],
    upload: Callable[[int, dict], np.ndarray],
    codec: UploadCodec,
    layout: WeightLayout,
    mods: Sequence[Callable] = NOW,
) -> LoopGrid:
    """Simulated hospitals ``nodes`` (partitions 0..n-1, their keys under ``tmp``) on a grid."""
    app = hospital_app(mods, upload=upload, codec=codec, layout=layout)
    contexts = {
        n: make_context(
            {"output-dir": str(tmp)}, {"partition-id": i, "num-partitions": len(nodes)}, node_id=n
        )
        for i, n in enumerate(nodes)
    }
    return LoopGrid(app, contexts)


def secagg_round(
    run: RunConfig,
    grid: LoopGrid,
    layout: WeightLayout,
    server_round: int = 1,
    workflow: Callable[[dict], Any] | None = None,
    base_hash: str = "",
) -> SecAggRounds:
    """One SecAgg+ training round of the ServerApp's driver on ``grid``; the driver after it.

    ``workflow`` builds another workflow from the driver's settings (a comparison);
    ``base_hash``: the frozen weights' fingerprint, for hospitals that really train.
    """
    context = Context(
        run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
    driver = SecAggRounds(grid, context, run, layout, base_hash, hospitals=len(grid.contexts))
    if workflow is not None:
        driver.workflow = workflow(driver.workflow_settings)
    try:
        state = layout.unpack(np.zeros(layout.size, layout.numpy_dtype))
        driver.train_round(server_round, state, lambda state, new: new)
    finally:
        driver.rounds.close()
    return driver
