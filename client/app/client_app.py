"""The hospital's Flower ClientApp.

In a deployment Flower starts a fresh ClientApp process for every message, and a
SecAgg+ round sends four: key setup, key-share exchange, masked upload (which evaluates
and trains), and unmasking. Only the upload needs torch, so this module imports nothing
heavy: the handlers in ``client/app/handlers.py`` (torch, Opacus, the data) load when a
message actually trains or evaluates, and the key-exchange stages, which Flower's
``secaggplus_mod`` answers by itself, start in well under a second.

Every reply leaves through ``outbound_guard`` (``client/app/outbound.py``), the outermost
mod: it sends only fields it lists with their protection.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.app.outbound import outbound_guard
from client.app.secagg import secagg_mod

__all__ = ["app"]

# The guard sees each reply last; SecAgg+ messages go through Flower's secaggplus_mod.
app = ClientApp(mods=[outbound_guard, secagg_mod])


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
