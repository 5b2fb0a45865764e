"""A training or evaluation request, read and checked before any data is touched.

Only trainable parameters travel, packed into one array in the layout both sides derive
from the model (``weights-layout``: its digest); the frozen rest is the hospital's own,
and must hash to what the server built (``base-hash``). A request inside SecAgg+ comes
in Flower's legacy records, and only from SecAgg+'s masked-upload stage. Any mismatch
refuses the request with the reason, before the hospital reads a record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, Message

from client.app.secagg import inside_masked_upload, is_legacy, legacy_request
from shared_model.config import HospitalConfig, RunConfig
from shared_model.errors import ExplainedError
from shared_model.packing import LayoutError
from shared_model.protocol import ARRAYS, CONFIG, Request
from shared_model.weights import hospital_fingerprint, hospital_layout

__all__ = ["BaseMismatchError", "MalformedRequestError", "RoundRequest", "read_request"]

StateDict = dict[str, torch.Tensor]


class BaseMismatchError(ExplainedError, RuntimeError):
    """The hospital's frozen weights differ from the server's: it must not train."""


class MalformedRequestError(ExplainedError, ValueError):
    """A request that makes no sense, or came the wrong way: refused before any data is read."""


@dataclass(frozen=True)
class RoundRequest:
    """What the server asks of this hospital in one message."""

    weights: StateDict  # the global model's trainable part
    config: Any  # the server's settings for this request (a ConfigRecord or a dict)
    secure: bool  # inside SecAgg+: the reply is masked

    @property
    def server_round(self) -> int:
        """The round this request belongs to (0: the baseline evaluation)."""
        return int(self.config.get(Request.SERVER_ROUND, 0))

    @property
    def evaluate_first(self) -> bool:
        """SecAgg+: evaluate the received model inside this upload."""
        return self.secure and bool(self.config.get(Request.EVALUATE, False))

    @property
    def evaluate_only(self) -> bool:
        """SecAgg+: the run's last exchange, which evaluates and trains nothing."""
        return self.secure and bool(self.config.get(Request.EVALUATE_ONLY, False))

    @property
    def proximal_mu(self) -> float:
        """FedProx's proximal weight (0: plain FedAvg)."""
        return float(self.config.get(Request.PROXIMAL_MU, 0.0))

    def planned_rounds(self, run: RunConfig, *, evaluation: bool = False) -> int:
        """The rounds the server plans; a training request needs at least one (and round 1+).

        The noise is planned once, from the first request's planned rounds: fewer than
        one would fix a plan that declines every round after it. ``evaluation``: an
        evaluation request, which may be of round 0 (the untrained model).
        """
        try:
            server_round = int(self.config[Request.SERVER_ROUND])
            planned = int(self.config.get(Request.PLANNED_ROUNDS, run.num_rounds))
        except (KeyError, TypeError, ValueError) as err:
            raise MalformedRequestError(
                f"the request's round numbers cannot be read ({err})"
            ) from err
        if server_round < (0 if evaluation else 1) or planned < 1:
            raise MalformedRequestError(
                f"refused a training request for round {server_round} of {planned} planned: "
                "both must be at least 1"
            )
        return planned


def read_request(
    msg: Message, context: Context, run: RunConfig, hospital: HospitalConfig
) -> RoundRequest:
    """The global weights and settings of a request, in either record format, checked."""
    model = hospital.local_model(run.model)
    layout = hospital_layout(model, run.seed)
    if is_legacy(msg.content):  # SecAgg+ runs in Flower's legacy records
        if not inside_masked_upload(context):
            raise MalformedRequestError(
                "refused a request in SecAgg+'s record format that did not come through "
                "SecAgg+'s masked-upload stage: its reply would leave unmasked"
            )
        weights, config = legacy_request(msg, layout)
        secure = True
    else:
        weights, config = layout.unpack_record(msg.content[ARRAYS]), msg.content[CONFIG]
        secure = False
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
    return RoundRequest(weights=weights, config=config, secure=secure)
