"""The hospital's Flower ClientApp.

In a deployment Flower starts a fresh ClientApp process for every message, and a
SecAgg+ round sends five: key setup, key-share exchange, masked upload (which trains),
unmasking, and evaluation. Only two of them need torch, so this module imports nothing
heavy: the handlers in ``client/handlers.py`` (torch, Opacus, the data) load when a
message trains or evaluates, and the three key-exchange stages, which Flower's
``secaggplus_mod`` answers by itself, start in well under a second.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.secagg import secagg_mod

__all__ = ["app"]

# SecAgg+ messages go through Flower's secaggplus_mod (client/secagg.py); others pass.
app = ClientApp(mods=[secagg_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model locally under DP; reply with the new weights (SecAgg+: delta)."""
    from client import handlers  # torch loads only for messages that train

    return handlers.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's held-out split."""
    from client import handlers

    return handlers.evaluate(msg, context)
