"""A grid of fake hospitals for the server's round logic, and Flower's task identity."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.app.strategy import packed_record
from shared_model.packing import PACKED_KEY, WeightLayout

__all__ = ["LAYOUT", "START", "Grid", "_task"]


LAYOUT = WeightLayout.of({"w": torch.zeros(8)})


START = {"w": torch.zeros(8)}


@pytest.fixture(autouse=True)
def _task(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class Grid:
    """Hospitals 1..n; each one 'ok' (trains: +1 on every weight), 'crash', 'silent' or
    'nan' (a broken update) in every round."""

    def __init__(self, behaviour: dict[int, str]) -> None:
        self.behaviour = behaviour
        self.replies: dict[str, Message] = {}
        self.ids = itertools.count()

    def get_node_ids(self):
        return list(self.behaviour)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"m{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            reply = self._reply(msg)
            if reply is not None:
                self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _reply(self, msg: Message) -> Message | None:
        kind = self.behaviour[msg.metadata.dst_node_id]
        if kind == "silent":
            return None
        if kind == "crash":
            return Message(Error(code=1, reason="<class 'RuntimeError'>:<'killed'>"), reply_to=msg)
        if kind == "unavailable":  # the SuperLink answers for a node gone quiet, as node 1
            reply = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = 1
            return reply
        config = msg.content["config"]
        weights = msg.content["arrays"][PACKED_KEY].numpy() + 1.0
        if kind == "nan":
            weights[0] = np.nan
        content = RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5, "declined": 0}),
                "hospital": ConfigRecord(
                    {"hospital-id": f"h{msg.metadata.dst_node_id}", "round": config["server-round"]}
                ),
            }
        )
        content["arrays"] = packed_record({"w": torch.from_numpy(weights)}, LAYOUT)
        return Message(content, reply_to=msg)
