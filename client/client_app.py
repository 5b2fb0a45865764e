"""The hospital's Flower ClientApp: thin handlers around client/trainer.py.

A train reply carries ``arrays`` (the raw model's state_dict), ``metrics`` (num-examples,
train-loss, epsilon, ...) and ``hospital`` (its name, status and, when it declines, why).
A hospital that declines for its privacy budget replies without arrays; the server
counts that as a decline, not a failure.
"""

from __future__ import annotations

import logging
import warnings

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.privacy import dump_history, load_history
from client.site import open_site
from client.trainer import run_local_evaluation, run_local_round
from shared_model.config import HospitalConfig, RunConfig

__all__ = ["app"]

log = logging.getLogger("fedfusion.hospital")
app = ClientApp()
# A copy of the ledger history in Flower's per-node state: a ledger file that loses
# rounds this process already recorded is refused (client/privacy.py).
_LEDGER_COPY = "privacy-ledger"

# One process serves one hospital at a time; the two cores belong to the simulation's
# actors (or to the hospital's own machine), so do not oversubscribe them.
torch.set_num_threads(1)
# Opacus's hooks on the first layer fire although the radiograph needs no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model locally under DP and reply with the new weights."""
    run = RunConfig.from_run_config(context.run_config)
    site = open_site(HospitalConfig.from_node_config(context.node_config), run)
    config = msg.content["config"]
    seen = context.state.config_records.get(_LEDGER_COPY)
    result = run_local_round(
        msg.content["arrays"].to_torch_state_dict(),
        site,
        run,
        server_round=int(config["server-round"]),
        planned_rounds=int(config.get("planned-rounds", run.num_rounds)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        ledger_seen=load_history(str(seen["history"])) if seen else (),
    )
    if result.ledger_history:
        context.state[_LEDGER_COPY] = ConfigRecord({"history": dump_history(result.ledger_history)})
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.train_loss,
            "epsilon": result.epsilon,
            "max-epsilon": site.policy.max_epsilon,
            "noise-multiplier": result.noise_multiplier,
            "sample-rate": result.sample_rate,
            "steps": result.steps,
            "declined": int(not result.trained),
        }
    )
    status = ConfigRecord(
        {
            "hospital-id": site.name,
            "status": "trained" if result.trained else "declined",
            "reason": result.reason,
        }
    )
    content = RecordDict({"metrics": metrics, "hospital": status})
    if result.trained:
        content["arrays"] = ArrayRecord(result.weights)
    else:
        log.warning("%s %s", site.name, result.reason)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's held-out split."""
    run = RunConfig.from_run_config(context.run_config)
    site = open_site(HospitalConfig.from_node_config(context.node_config), run)
    result = run_local_evaluation(msg.content["arrays"].to_torch_state_dict(), site, run)
    metrics = MetricRecord({"num-examples": result.examples, "loss": result.loss, **result.metrics})
    return Message(
        RecordDict({"metrics": metrics, "hospital": ConfigRecord({"hospital-id": site.name})}),
        reply_to=msg,
    )
