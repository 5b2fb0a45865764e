"""The hospital's train and evaluate handlers: thin translations around client/trainer.py.

``client/client_app.py`` imports this module (and with it torch and Opacus) only when a
message actually trains or evaluates.

A train reply carries ``arrays`` (the raw model's trainable parameters), ``metrics`` (num-examples,
train-loss, epsilon, ...) and ``hospital`` (its name, status and, when it declines, why).
A hospital that declines for its privacy budget replies without arrays; the server
counts that as a decline, not a failure.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.privacy import dump_history, known_rdp, load_history, remember_rdp
from client.secagg import (
    delta_ndarrays,
    is_legacy,
    legacy_evaluate_reply,
    legacy_fit_reply,
    legacy_request,
)
from client.site import open_site
from client.trainer import run_local_evaluation, run_local_round
from shared_model.config import HospitalConfig, RunConfig
from shared_model.model import hospital_fingerprint, hospital_layout
from shared_model.packing import PACKED_KEY, LayoutError, WeightLayout

__all__ = ["evaluate", "train"]

log = logging.getLogger("fedfusion.hospital")
# A copy of the ledger history in Flower's per-node state: a ledger file that loses
# rounds this process already recorded is refused (client/privacy.py).
_LEDGER_COPY = "privacy-ledger"
# The per-step RDP this node has computed, kept between its messages' processes.
_RDP_CACHE = "privacy-rdp"

# Opacus's hooks on the first layer fire although the radiograph needs no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class BaseMismatchError(RuntimeError):
    """The hospital's frozen weights differ from the server's: it must not train."""


def _request(
    msg: Message, run: RunConfig, hospital: HospitalConfig
) -> tuple[dict[str, torch.Tensor], Any, bool]:
    """The global weights and config of a request, in either record format.

    Only trainable parameters travel, packed into one array in the layout both sides
    derive from the model (``weights-layout``: its digest); the frozen rest is this
    hospital's own, and must hash to what the server built (``base-hash``). Either
    mismatch refuses the request before any data is read.
    """
    model = hospital.local_model(run.model)
    layout = hospital_layout(model, run.seed)
    if is_legacy(msg.content):  # SecAgg+ runs in Flower's legacy records
        weights, config = legacy_request(msg, layout)
        legacy = True
    else:
        weights, config = unpack_record(msg.content["arrays"], layout), msg.content["config"]
        legacy = False
    sent = str(config.get("weights-layout", ""))
    if sent != layout.digest:
        raise LayoutError(
            f"{hospital.name}: the server's trainable weights are laid out as {sent or 'none'}, "
            f"this hospital's model as {layout.digest}: the server and this hospital disagree "
            "on the model settings or the fedfusion version"
        )
    expected = str(config.get("base-hash", ""))
    own = hospital_fingerprint(model, run.seed)
    if expected != own:
        raise BaseMismatchError(
            f"{hospital.name}: the frozen model weights here (sha256 {own[:12]}) differ from the "
            f"server's ({expected[:12] or 'none sent'}); frozen weights are never sent, so "
            "every hospital needs the same pretrained files (model.text-model, "
            "model.image-weights, or the hospital's text-model / image-weights copies) and "
            "the same fedfusion version"
        )
    return weights, config, legacy


def packed_record(state: dict[str, torch.Tensor], layout: WeightLayout) -> ArrayRecord:
    """The trainable weights as they travel: one flat array (shared_model/packing.py)."""
    return ArrayRecord({PACKED_KEY: Array(layout.pack(state))})


def unpack_record(record: ArrayRecord, layout: WeightLayout) -> dict[str, torch.Tensor]:
    """The weights a packed record holds; LayoutError if it is not one that fits ``layout``."""
    if list(record) != [PACKED_KEY]:
        raise LayoutError(f"expected one packed {PACKED_KEY!r} array, got {list(record)[:3]}")
    return layout.unpack(record[PACKED_KEY].numpy())


def train(msg: Message, context: Context) -> Message:
    """Train the global model locally under DP and reply with the new weights.

    Under SecAgg+ the reply carries the delta instead, which secagg_mod masks.
    """
    run = RunConfig.from_run_config(context.run_config)
    hospital = HospitalConfig.from_node_config(context.node_config)
    weights, config, legacy = _request(msg, run, hospital)
    remember_rdp(context.state.config_records.get(_RDP_CACHE, {}))  # before the ledger opens
    site = open_site(hospital, run)
    seen = context.state.config_records.get(_LEDGER_COPY)
    result = run_local_round(
        weights,
        site,
        run,
        server_round=int(config["server-round"]),
        planned_rounds=int(config.get("planned-rounds", run.num_rounds)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        ledger_seen=load_history(str(seen["history"])) if seen else (),
    )
    if result.ledger_history:
        context.state[_LEDGER_COPY] = ConfigRecord({"history": dump_history(result.ledger_history)})
    used = ((e.noise_multiplier, e.sample_rate) for e in result.ledger_history)
    context.state[_RDP_CACHE] = ConfigRecord(known_rdp(used))
    if not result.trained:
        log.warning("%s %s", site.name, result.reason)
    metrics = {
        "num-examples": result.num_examples,
        "train-loss": result.train_loss,
        "epsilon": result.epsilon,
        "max-epsilon": site.policy.max_epsilon,
        "noise-multiplier": result.noise_multiplier,
        "sample-rate": result.sample_rate,
        "steps": result.steps,
        "declined": int(not result.trained),
    }
    layout = hospital_layout(site.model, run.seed)
    if legacy:  # a declined hospital uploads a zero delta with weight 0
        return legacy_fit_reply(
            msg,
            delta_ndarrays(result.weights, weights, layout),
            result.num_examples,
            {**metrics, "hospital-id": site.name, "reason": result.reason},
            run.secagg,
        )
    status = ConfigRecord(
        {
            "hospital-id": site.name,
            "reason": result.reason,
            "status": "trained" if result.trained else "declined",
            "round": int(config["server-round"]),  # the server refuses a stale update
        }
    )
    content = RecordDict({"metrics": MetricRecord(metrics), "hospital": status})
    if result.trained:
        content["arrays"] = packed_record(result.weights, layout)
    return Message(content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's held-out split."""
    run = RunConfig.from_run_config(context.run_config)
    hospital = HospitalConfig.from_node_config(context.node_config)
    weights, _config, legacy = _request(msg, run, hospital)
    site = open_site(hospital, run)
    result = run_local_evaluation(weights, site, run)
    if legacy:
        return legacy_evaluate_reply(
            msg, result.loss, result.examples, {**result.metrics, "hospital-id": site.name}
        )
    metrics = MetricRecord({"num-examples": result.examples, "loss": result.loss, **result.metrics})
    return Message(
        RecordDict({"metrics": metrics, "hospital": ConfigRecord({"hospital-id": site.name})}),
        reply_to=msg,
    )
