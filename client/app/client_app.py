"""The hospital's Flower ClientApp.

In a deployment Flower starts a fresh ClientApp process for every message, and a
SecAgg+ round sends four: key setup, key-share exchange, masked upload (which evaluates
and trains), and unmasking. Only the upload needs torch, so this module imports nothing
heavy: the handlers in ``client/app/handlers.py`` (torch, Opacus, the data) load when a
message actually trains or evaluates, and the key-exchange stages, which Flower's
``secaggplus_mod`` answers by itself, start in well under a second.

Every reply leaves through ``outbound_guard`` (``client/app/outbound.py``), the outermost
mod: it sends only fields it lists with their protection. Inside it, ``timeline_mod``
marks when a message's handling starts and ends, only when a per-hop timeline is
recorded (``shared_model/timeline.py``).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from client.app.outbound import outbound_guard
from client.app.secagg import secagg_mod
from shared_model import timeline

__all__ = ["app", "timeline_mod"]


def timeline_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mark the start and end of handling ``msg`` on the timeline, when one is recorded."""
    if not timeline.enabled():
        return call_next(msg, context)
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
    stage = configs.get(Key.STAGE) if configs is not None else None
    what = str(stage) if stage is not None else str(msg.metadata.message_type)
    timeline.mark("clientapp.handle", stage=what, node=context.node_id)
    reply = call_next(msg, context)
    timeline.mark("clientapp.handled", stage=what, node=context.node_id)
    return reply


# The guard sees each reply last; SecAgg+ messages go through Flower's secaggplus_mod.
app = ClientApp(mods=[outbound_guard, timeline_mod, secagg_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model locally under DP; reply with the new weights (SecAgg+: delta)."""
    from client.app import handlers  # torch loads only for messages that train

    return handlers.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's held-out split."""
    from client.app import handlers  # torch loads only for messages that evaluate

    return handlers.evaluate(msg, context)
