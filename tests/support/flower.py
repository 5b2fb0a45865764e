"""Build Flower messages and contexts by hand, as Flower's own tests do."""

from __future__ import annotations

import time
from typing import Any

from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict
from flwr.common import DEFAULT_TTL

from server.app.strategy import packed_record
from shared_model.config import RunConfig
from shared_model.packing import WeightLayout
from shared_model.weights import base_fingerprint, initial_model, shared_state


def make_message(
    content: RecordDict,
    message_type: str,
    dst_node_id: int = 1,
    *,
    run_id: int = 1,
    group_id: str = "1",
) -> Message:
    """An instruction message from the server, as a ClientApp handler receives it."""
    metadata = Metadata(
        run_id=run_id,
        message_id=f"msg-{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def make_context(
    run_config: dict[str, Any], node_config: dict[str, Any], node_id: int = 1
) -> Context:
    """A ClientApp context with the given run and node configs."""
    return Context(
        run_id=1,
        node_id=node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config=run_config,
    )


def global_request(run_config: dict[str, Any]) -> tuple[ArrayRecord, dict[str, Any]]:
    """What the server sends in round 1: the packed trainable weights, and their checks."""
    run = RunConfig.from_run_config(run_config)
    model = initial_model(run.model, run.seed)
    state = shared_state(model)
    layout = WeightLayout.of(state)
    checks = {"base-hash": base_fingerprint(model), "weights-layout": layout.digest}
    return packed_record(state, layout), checks
