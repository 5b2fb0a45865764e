"""SecAgg+ at the hospital: the adapter between Flower's ``secaggplus_mod`` and our handlers.

Flower's SecAgg+ exists only in its legacy API: the server's ``SecAggPlusWorkflow`` sends
train messages in the legacy ``fitins.*`` format, wrapped in four protocol stages that
``secaggplus_mod`` answers (key setup, key-share exchange, masked upload, unmasking).
The mod calls our train handler once, in the masked-upload stage, and masks the
parameters of its reply before they leave the hospital.

What the hospital uploads is its **delta** (new weights minus the global ones), scaled by
its weight n / max-weight, clipped to +-clipping-range and quantized by the mod. Deltas
stay far inside the range; a delta that would clip is reported with the numbers. A
hospital that declines for its budget uploads a zero delta with weight 0: it takes part
in the protocol (so it is not a dropout) but changes nothing.

Metrics in the reply (num-examples, loss, epsilon, ...) travel in the clear; the README
lists them as public.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    MessageType,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from shared_model.config import SecAggConfig

__all__ = [
    "delta_ndarrays",
    "is_legacy",
    "legacy_evaluate_reply",
    "legacy_fit_reply",
    "legacy_request",
    "secagg_mod",
]

log = logging.getLogger("fedfusion.hospital")
StateDict = dict[str, torch.Tensor]
Scalar = bool | int | float | str


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's SecAgg+ mod on SecAgg+ messages, pass every other message through."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def is_legacy(content: RecordDict) -> bool:
    """True for the legacy fitins/evaluateins records the SecAgg+ workflow sends."""
    keys = set(content.array_records)
    return bool(keys & {"fitins.parameters", "evaluateins.parameters"})


def legacy_request(msg: Message, keys: Sequence[str]) -> tuple[StateDict, dict[str, Scalar]]:
    """The global weights (as a state_dict in ``keys`` order) and config of a legacy request."""
    if msg.metadata.message_type == MessageType.TRAIN:
        ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    else:
        ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(ins.parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"the server sent {len(arrays)} weight arrays, the model has {len(keys)}")
    weights = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}
    return weights, dict(ins.config)


def delta_ndarrays(new: StateDict, old: StateDict) -> list[np.ndarray]:
    """The update ``new - old``, array by array in ``old``'s key order."""
    return [(new[k].detach().float() - old[k].float()).numpy() for k in old]


def legacy_fit_reply(
    msg: Message,
    delta: list[np.ndarray],
    num_examples: int,
    metrics: dict[str, Scalar],
    cfg: SecAggConfig,
) -> Message:
    """The fitres reply the SecAgg+ mod masks; warns if the update would be clipped."""
    ratio = num_examples / cfg.max_weight
    if ratio > 1:
        raise ValueError(
            f"{num_examples} training records exceed secagg.max-weight {cfg.max_weight:g}; "
            "raise secagg.max-weight on the server"
        )
    peak = max((float(np.abs(d).max()) for d in delta if d.size), default=0.0) * ratio
    if peak > cfg.clipping_range:
        log.warning(
            "SecAgg+ will clip this update: its largest weighted value %.4g exceeds "
            "secagg.clipping-range %.4g (delta peak %.4g x weight %d/%g)",
            peak,
            cfg.clipping_range,
            peak / max(ratio, 1e-12),
            num_examples,
            cfg.max_weight,
        )
    fitres = FitRes(
        status=Status(code=Code.OK, message="OK"),
        parameters=ndarrays_to_parameters(delta),
        num_examples=num_examples,
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def legacy_evaluate_reply(
    msg: Message, loss: float, num_examples: int, metrics: dict[str, Scalar]
) -> Message:
    """The evaluateres reply of the legacy evaluation workflow."""
    res = EvaluateRes(
        status=Status(code=Code.OK, message="OK"),
        loss=loss,
        num_examples=num_examples,
        metrics=metrics,
    )
    return Message(compat.evaluateres_to_recorddict(res), reply_to=msg)
