"""What a hospital sends back: built once per reply, from the round's outcome.

- A plain train reply carries ``arrays`` (the raw model's trainable parameters, after
  DP-SGD), ``metrics`` (the released record count and train loss, epsilon, the public
  DP parameters) and ``hospital`` (its name, status and, when it declines, why). A
  hospital that declines replies without arrays; the server counts a decline, not a
  failure.
- Under SecAgg+ the reply is one vector (``shared_model/masked_upload.py``) that Flower's
  mod masks: the weighted update, the weight, the train loss, and the held-out
  statistics of the model received; beside it only public figures.
- A plain evaluate reply carries the held-out statistics only if the hospital's
  ``share-evaluation`` allows.

Every field is listed, with its protection, in ``client/app/outbound.py``, whose guard
sends nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.app.request import RoundRequest
from client.app.secagg import UploadError, legacy_fit_reply
from client.app.site import Site
from client.app.trainer import LocalEvaluation, LocalRound
from client.dp.held_out import held_out_epsilon
from client.dp.ledger import LedgerEntry
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import PACKED_KEY, WeightLayout
from shared_model.protocol import (
    ARRAYS,
    EVALUATION,
    EVALUATION_STATISTICS,
    HOSPITAL,
    METRICS,
    Reply,
    Status,
)
from shared_model.weights import hospital_layout

__all__ = ["evaluate_reply", "masked_upload_vector", "packed_record", "train_reply"]

StateDict = dict[str, torch.Tensor]


def packed_record(state: StateDict, layout: WeightLayout) -> ArrayRecord:
    """The trainable weights as they travel: one flat array (shared_model/packing.py)."""
    return ArrayRecord({PACKED_KEY: Array(layout.pack(state))})


def train_reply(
    msg: Message,
    request: RoundRequest,
    result: LocalRound,
    evaluation: EvalStats,
    site: Site,
    run: RunConfig,
) -> Message:
    """The reply to a training request: plain, or the upload SecAgg+ masks."""
    layout = hospital_layout(site.model, run.seed)
    if request.secure:
        return _masked_upload(msg, request, result, layout, evaluation, site, run)
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
            Status.ROUND: request.server_round,  # the server refuses a stale update
            Status.PRIVACY_UNIT: site.unit,
        }
    )
    content = RecordDict({METRICS: MetricRecord(metrics), HOSPITAL: status})
    if result.trained:
        content[ARRAYS] = packed_record(result.weights, layout)
    return Message(content, reply_to=msg)


def _public_figures(result: LocalRound, site: Site) -> dict[str, int | float]:
    """What a train reply says in the clear: functions of public values only."""
    return {
        Reply.EPSILON: result.epsilon,
        Reply.MAX_EPSILON: site.policy.max_epsilon,
        Reply.DELTA: site.policy.delta,
        Reply.NOISE_MULTIPLIER: result.noise_multiplier,
        Reply.SAMPLE_RATE: result.sample_rate,
        Reply.STEPS: result.steps,
        Reply.DECLINED: int(result.declined),
        **_held_out_figures(result.ledger_history, site),
    }


def _held_out_figures(history: Sequence[LedgerEntry], site: Site) -> dict[str, float]:
    """The held-out part's epsilon and cap, public; none if its statistics leave exact."""
    epsilon = held_out_epsilon(history, site.policy)
    if epsilon is None:
        return {}
    return {Reply.HELD_OUT_EPSILON: epsilon, Reply.MAX_HELD_OUT_EPSILON: site.policy.held_out_cap}


def masked_upload_vector(
    result: LocalRound,
    sent: StateDict,
    layout: WeightLayout,
    evaluation: EvalStats,
    run: RunConfig,
) -> tuple[UploadCodec, np.ndarray]:
    """What one SecAgg+ upload holds (shared_model/masked_upload.py), and its codec.

    ``sent``: the global weights the round started from. A declined round takes part with
    a zero update and no weight.
    """
    codec = UploadCodec(layout.size, run.model.labels, run.secagg.clipping_range,
                        run.secagg.max_weight)  # fmt: skip
    if result.num_examples > run.secagg.max_weight:  # N̂, public: saying so leaks nothing
        raise UploadError(
            f"this hospital's released record count {result.num_examples} exceeds "
            f"secagg.max-weight {run.secagg.max_weight:g}; raise secagg.max-weight on the server"
        )
    if result.trained:
        update = layout.pack(result.weights).astype(np.float64) - layout.pack(sent)
        weight = result.num_examples / run.secagg.max_weight
    else:
        update, weight = np.zeros(layout.size), 0.0
    return codec, codec.encode(update, weight, result.train_loss, evaluation)


def _masked_upload(
    msg: Message,
    request: RoundRequest,
    result: LocalRound,
    layout: WeightLayout,
    evaluation: EvalStats,
    site: Site,
    run: RunConfig,
) -> Message:
    """The SecAgg+ reply: one vector, masked by the mod, and the public figures."""
    codec, upload = masked_upload_vector(result, request.weights, layout, evaluation, run)
    status = {
        Status.HOSPITAL_ID: site.name,
        Status.REASON: result.reason,
        Status.STATUS: Status.TRAINED if result.trained else Status.DECLINED,
        Status.PRIVACY_UNIT: site.unit,
    }
    return legacy_fit_reply(msg, upload, codec, {**_public_figures(result, site), **status})


def evaluate_reply(
    msg: Message,
    evaluation: LocalEvaluation,
    site: Site,
    history: Sequence[LedgerEntry] = (),
) -> Message:
    """The statistics, if this hospital shares its evaluation; otherwise that it withheld.

    ``history``: the ledger after the release, for the held-out epsilon it states.
    """
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
    vector = Array(evaluation.stats.to_vector())
    content = RecordDict(
        {
            EVALUATION: ArrayRecord({EVALUATION_STATISTICS: vector}),
            METRICS: MetricRecord(
                {
                    Reply.NUM_EXAMPLES: max(0, round(evaluation.stats.examples)),
                    **_held_out_figures(history, site),
                }
            ),
            HOSPITAL: ConfigRecord(status),
        }
    )
    return Message(content, reply_to=msg)
