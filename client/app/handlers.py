"""The hospital's train and evaluate handlers: thin translations around client/app/trainer.py.

``client/app/client_app.py`` imports this module (and with it torch and Opacus) only when a
message actually trains or evaluates. Every reply leaves through the outbound guard
(``client/app/outbound.py``), which lists each field and its protection.

- A plain train reply carries ``arrays`` (the raw model's trainable parameters, after
  DP-SGD), ``metrics`` (the released record count and train loss, epsilon, the public
  DP parameters) and ``hospital`` (its name, status and, when it declines, why). A
  hospital that declines replies without arrays; the server counts a decline, not a
  failure.
- Under SecAgg+ the reply is one masked vector (``shared_model/masked_upload.py``): the
  weighted update, the weight, the train loss, and the held-out statistics of the model
  received, which the hospital evaluates before it trains.
- A plain evaluate reply carries the held-out statistics only if the hospital's
  ``share-evaluation`` allows; the hospital keeps its own metrics either way.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app.secagg import (
    UploadError,
    inside_masked_upload,
    is_legacy,
    legacy_fit_reply,
    legacy_request,
)
from client.app.site import Site, open_site
from client.app.trainer import LocalRound, run_local_evaluation, run_local_round
from client.dp import accounting
from client.dp.ledger import dump_history, load_history
from shared_model.config import HospitalConfig, RunConfig
from shared_model.errors import ExplainedError
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import PACKED_KEY, LayoutError, WeightLayout
from shared_model.protocol import (
    ARRAYS,
    CONFIG,
    EVALUATION,
    EVALUATION_STATISTICS,
    HOSPITAL,
    METRICS,
    Reply,
    Request,
    Status,
)
from shared_model.weights import hospital_fingerprint, hospital_layout

__all__ = ["evaluate", "train"]

log = logging.getLogger("fedfusion.hospital")
# A copy of the ledger history in Flower's per-node state: a ledger file that loses
# releases this process already recorded is refused (client/dp/ledger.py).
_LEDGER_COPY = "privacy-ledger"
# The per-step RDP this node has computed, kept between its messages' processes.
_RDP_CACHE = "privacy-rdp"

# Opacus's hooks on the first layer fire although the radiograph needs no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


class BaseMismatchError(ExplainedError, RuntimeError):
    """The hospital's frozen weights differ from the server's: it must not train."""


class MalformedRequestError(ExplainedError, ValueError):
    """A request that makes no sense, or came the wrong way: refused before any data is read."""


def _request(
    msg: Message, context: Context, run: RunConfig, hospital: HospitalConfig
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
        if not inside_masked_upload(context):
            raise MalformedRequestError(
                "refused a request in SecAgg+'s record format that did not come through "
                "SecAgg+'s masked-upload stage: its reply would leave unmasked"
            )
        weights, config = legacy_request(msg, layout)
        legacy = True
    else:
        weights, config = unpack_record(msg.content[ARRAYS], layout), msg.content[CONFIG]
        legacy = False
    sent = str(config.get(Request.WEIGHTS_LAYOUT, ""))
    if sent != layout.digest:
        raise LayoutError(
            f"{hospital.name}: the server's trainable weights are laid out as {sent or 'none'}, "
            f"this hospital's model as {layout.digest}: the server and this hospital disagree "
            "on the model settings or the fedfusion version"
        )
    expected = str(config.get(Request.BASE_HASH, ""))
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

    Under SecAgg+ the reply is the masked upload: the weighted delta, the weight, the
    train loss and (first, on the model received) the held-out evaluation.
    """
    run = RunConfig.from_run_config(context.run_config)
    hospital = HospitalConfig.from_node_config(context.node_config)
    weights, config, legacy = _request(msg, context, run, hospital)
    server_round, planned_rounds = _round_numbers(config, run)
    # the per-step RDP this node computed in earlier messages, before the ledger opens
    accounting.RDP.absorb(context.state.config_records.get(_RDP_CACHE, {}))
    site = open_site(hospital, run)
    evaluation = EvalStats.zeros(run.model.labels)
    if legacy and bool(config.get(Request.EVALUATE, False)):
        bound = int(run.secagg.max_weight)  # what one upload can hold
        evaluation = run_local_evaluation(weights, site, run, server_round, bound).stats
    if legacy and bool(config.get(Request.EVALUATE_ONLY, False)):
        result = _evaluated_only(weights, site, context)
    else:
        seen = context.state.config_records.get(_LEDGER_COPY)
        result = run_local_round(
            weights,
            site,
            run,
            server_round=server_round,
            planned_rounds=planned_rounds,
            secure_aggregation=legacy,
            proximal_mu=float(config.get(Request.PROXIMAL_MU, 0.0)),
            ledger_seen=load_history(str(seen["history"])) if seen else (),
        )
    if result.ledger_history:
        context.state[_LEDGER_COPY] = ConfigRecord({"history": dump_history(result.ledger_history)})
    used = ((e.noise_multiplier, e.sample_rate) for e in result.ledger_history)
    context.state[_RDP_CACHE] = ConfigRecord(accounting.RDP.export(used))
    if not result.trained and result.reason != _EVALUATED_ONLY:
        log.warning("%s %s", site.name, result.reason)
    layout = hospital_layout(site.model, run.seed)
    if legacy:
        return _masked_upload(msg, result, weights, layout, evaluation, site, run)
    metrics = {
        Reply.NUM_EXAMPLES: result.num_examples,
        Reply.TRAIN_LOSS: result.train_loss,
        **_public_figures(result, site),
    }
    status = ConfigRecord(
        {
            Status.HOSPITAL_ID: site.name,
            Status.REASON: result.reason,
            Status.STATUS: Status.TRAINED if result.trained else Status.DECLINED,
            Status.ROUND: server_round,  # the server refuses a stale update
        }
    )
    content = RecordDict({METRICS: MetricRecord(metrics), HOSPITAL: status})
    if result.trained:
        content[ARRAYS] = packed_record(result.weights, layout)
    return Message(content, reply_to=msg)


_EVALUATED_ONLY = "evaluated the final model (the run's last exchange); no training"


def _round_numbers(config: Any, run: RunConfig) -> tuple[int, int]:
    """(server round, planned rounds) of a training request, checked.

    The noise is planned once, from the first request's planned rounds: a request with
    fewer than one round would fix a plan that declines every round after it.
    """
    try:
        server_round = int(config[Request.SERVER_ROUND])
        planned = int(config.get(Request.PLANNED_ROUNDS, run.num_rounds))
    except (KeyError, TypeError, ValueError) as err:
        raise MalformedRequestError(f"the request's round numbers cannot be read ({err})") from err
    if server_round < 1 or planned < 1:
        raise MalformedRequestError(
            f"refused a training request for round {server_round} of {planned} planned: "
            "both must be at least 1"
        )
    return server_round, planned


def _evaluated_only(weights: dict[str, torch.Tensor], site: Site, context: Context) -> LocalRound:
    """The last SecAgg+ exchange: nothing trained, the ledger only read."""
    seen = context.state.config_records.get(_LEDGER_COPY)
    ledger = site.open_ledger(load_history(str(seen["history"])) if seen else ())
    return LocalRound(
        False,
        _EVALUATED_ONLY,
        weights,
        0,
        float("nan"),
        0,
        float("inf")
        if not site.policy.enabled and site.policy.allow_non_private
        else ledger.epsilon(),
        ledger.noise_multiplier or 0.0,
        0.0,
        tuple(ledger.history),
    )


def _public_figures(result: LocalRound, site: Site) -> dict[str, int | float]:
    """What a train reply says in the clear: functions of public values only."""
    return {
        Reply.EPSILON: result.epsilon,
        Reply.MAX_EPSILON: site.policy.max_epsilon,
        Reply.NOISE_MULTIPLIER: result.noise_multiplier,
        Reply.SAMPLE_RATE: result.sample_rate,
        Reply.STEPS: result.steps,
        Reply.DECLINED: int(not result.trained and result.reason != _EVALUATED_ONLY),
    }


def _masked_upload(
    msg: Message,
    result: LocalRound,
    received: dict[str, torch.Tensor],
    layout: WeightLayout,
    evaluation: EvalStats,
    site: Site,
    run: RunConfig,
) -> Message:
    """The SecAgg+ reply: one vector, masked by the mod, and the public figures."""
    codec = UploadCodec(layout.size, run.model.labels, run.secagg.clipping_range,
                        run.secagg.max_weight)  # fmt: skip
    if result.num_examples > run.secagg.max_weight:  # N̂, public: saying so leaks nothing
        raise UploadError(
            f"this hospital's released record count {result.num_examples} exceeds "
            f"secagg.max-weight {run.secagg.max_weight:g}; raise secagg.max-weight on the server"
        )
    if result.trained:
        update = layout.pack(result.weights).astype(np.float64) - layout.pack(received)
        weight = result.num_examples / run.secagg.max_weight
    else:  # a decline takes part with a zero update and no weight
        update, weight = np.zeros(layout.size), 0.0
    upload = codec.encode(update, weight, result.train_loss, evaluation)
    status = {
        Status.HOSPITAL_ID: site.name,
        Status.REASON: result.reason,
        Status.STATUS: Status.TRAINED if result.trained else Status.DECLINED,
    }
    return legacy_fit_reply(msg, upload, codec, {**_public_figures(result, site), **status})


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's held-out split.

    The statistics leave only if this hospital shares its evaluation; otherwise the
    reply says it withheld them. SecAgg+ runs evaluate inside the masked upload instead.
    """
    run = RunConfig.from_run_config(context.run_config)
    hospital = HospitalConfig.from_node_config(context.node_config)
    weights, config, legacy = _request(msg, context, run, hospital)
    if legacy:
        raise ValueError(
            "a separate evaluation inside SecAgg+ is not part of this fedfusion version: "
            "hospitals evaluate inside the masked upload; run the same version on both sides"
        )
    site = open_site(hospital, run)
    server_round = config.get(Request.SERVER_ROUND)
    result = run_local_evaluation(
        weights, site, run, int(server_round) if server_round is not None else None
    )
    status = {Status.HOSPITAL_ID: site.name}
    if not site.policy.share_evaluation:
        status[Status.STATUS] = Status.WITHHELD
        status[Status.REASON] = (
            "withheld: this hospital's share-evaluation = false keeps its held-out metrics "
            "here; without secure aggregation the server cannot learn them only as a sum"
        )
        content = RecordDict(
            {METRICS: MetricRecord({Reply.NUM_EXAMPLES: 0}), HOSPITAL: ConfigRecord(status)}
        )
        return Message(content, reply_to=msg)
    status[Status.STATUS] = Status.EVALUATED
    vector = Array(result.stats.to_vector())
    content = RecordDict(
        {
            EVALUATION: ArrayRecord({EVALUATION_STATISTICS: vector}),
            METRICS: MetricRecord({Reply.NUM_EXAMPLES: int(result.stats.examples)}),
            HOSPITAL: ConfigRecord(status),
        }
    )
    return Message(content, reply_to=msg)
