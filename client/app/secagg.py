"""SecAgg+ at the hospital: the adapter between Flower's ``secaggplus_mod`` and our handlers.

Flower's SecAgg+ exists only in its legacy API: the server's ``SecAggPlusWorkflow`` sends
train messages in the legacy ``fitins.*`` format, wrapped in four protocol stages that
``secaggplus_mod`` answers (key setup, key-share exchange, masked upload, unmasking).
The mod calls our train handler once, in the masked-upload stage, and masks the
parameters of its reply before they leave the hospital.

What the hospital uploads is one vector (``shared_model/masked_upload.py``): its
**delta** (new weights minus the global ones) scaled by its public weight N̂ / max-weight,
the weight itself, its DP-released train loss, and the held-out statistics of the model
it received; the mod clips it to +-clipping-range and quantizes it. Deltas stay far
inside the range; an upload that would clip is reported with the numbers. A hospital
that declines uploads a zero delta with weight 0 (and its evaluation): it takes part in
the protocol (so it is not a dropout) but changes nothing.

What travels in the clear beside the masked vector is listed, with its protection, in
``client/app/outbound.py``.

The mod uploads each masked value as an int64, although masking works modulo
``modulus_range`` (a power of two, at most 2**32). ``secagg_mod`` re-encodes them as
uint32, which halves the upload and changes no value: the server adds the vectors and
reduces them modulo the same power of two, which uint32 wrap-around already respects.

The mod's mask generator and secret sharing are replaced by fedfusion's
(``shared_model/secagg_primitives.py``: full-seed AES-CTR masks, fast Shamir), which the
server's workflow uses too; a training request must name the same scheme.

This module does not import torch: it serves the key-exchange stages, which start a
ClientApp process each in a deployment.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    MessageType,
    Status,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from client.app.flwr_compat import install_secagg_primitives
from client.app.secagg_guard import SecAggGuard
from shared_model import secagg_primitives
from shared_model.errors import ExplainedError
from shared_model.masked_upload import UploadCodec
from shared_model.protocol import SecAggSigned

if TYPE_CHECKING:
    import torch

    from shared_model.packing import WeightLayout

__all__ = [
    "SecAggSchemeError",
    "UploadError",
    "compact_masked_vector",
    "inside_masked_upload",
    "instruction_digest",
    "is_legacy",
    "legacy_fit_reply",
    "legacy_request",
    "secagg_mod",
]

log = logging.getLogger("fedfusion.hospital")
StateDict = dict[str, "torch.Tensor"]


class SecAggSchemeError(ExplainedError, ValueError):
    """The server's SecAgg+ masks and key shares are not made as this hospital's are."""


class UploadError(ExplainedError, ValueError):
    """An upload that would break the aggregate: the hospital does not send it."""


MASKS = secagg_primitives.MaskBinding()  # pairwise masks bound to the instruction received
install_secagg_primitives(MASKS.shared_key)
Scalar = bool | int | float | str
_UINT32_LIMIT = 2**32


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Run Flower's SecAgg+ mod behind the hospital's checks; pass other messages through.

    Every SecAgg+ message is first checked by :class:`SecAggGuard`
    (``client/app/secagg_guard.py``), which refuses by name what a lying server could
    use; the consistency stage, which Flower's mod does not have, is answered here.
    """
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, ctxt)
    guard = SecAggGuard(msg, ctxt)
    if guard.stage == SecAggSigned.CONSISTENCY:
        signed = ConfigRecord(guard.sign_survivors())
        return Message(RecordDict({RECORD_KEY_CONFIGS: signed}), reply_to=msg)
    guard.before()
    try:
        if guard.stage != Stage.COLLECT_MASKED_VECTORS:
            reply = secaggplus_mod(msg, ctxt, call_next)
        else:
            with MASKS.bound(instruction_digest(msg)), masked_upload(ctxt):
                reply = compact_masked_vector(secaggplus_mod(msg, ctxt, call_next))
    except Exception:
        guard.abort()
        raise
    return guard.after(reply)


def instruction_digest(msg: Message) -> bytes:
    """The digest of the training instruction a masked-upload message carries."""
    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    return secagg_primitives.round_binding(ins.config, ins.parameters.tensors)


_UPLOAD_STATE = "fedfusion-secagg"  # this node's SecAgg+ facts, in Flower's node state


@contextlib.contextmanager
def masked_upload(ctxt: Context) -> Iterator[None]:
    """Mark the training call Flower's mod makes as one whose reply it masks."""
    ctxt.state.config_records.setdefault(_UPLOAD_STATE, ConfigRecord())["masking"] = True
    try:
        yield
    finally:
        ctxt.state.config_records[_UPLOAD_STATE]["masking"] = False


def inside_masked_upload(ctxt: Context) -> bool:
    """Whether a training call comes from SecAgg+'s masked-upload stage.

    A request in SecAgg+'s record format that arrives any other way would be answered
    in the clear; it is refused (``read_request`` in ``client/app/request.py``).
    """
    record = ctxt.state.config_records.get(_UPLOAD_STATE)
    return bool(record and record.get("masking", False))


def compact_masked_vector(reply: Message) -> Message:
    """Re-encode a masked upload's int64 arrays as uint32 when every value fits.

    They fit for any modulus_range up to 2**32. Other replies pass unchanged.
    """
    if reply.has_error() or RECORD_KEY_CONFIGS not in reply.content.config_records:
        return reply
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS not in configs:
        return reply
    arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
    if any(a.size and (a.min() < 0 or a.max() >= _UINT32_LIMIT) for a in arrays):
        return reply  # a modulus above 2**32: keep Flower's encoding
    configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a.astype(np.uint32)) for a in arrays]
    return reply


def is_legacy(content: RecordDict) -> bool:
    """True for the legacy fitins/evaluateins records the SecAgg+ workflow sends."""
    keys = set(content.array_records)
    return bool(keys & {"fitins.parameters", "evaluateins.parameters"})


def legacy_request(msg: Message, layout: WeightLayout) -> tuple[StateDict, dict[str, Scalar]]:
    """The global weights (a state_dict, unpacked by ``layout``) and config of a legacy request."""
    if msg.metadata.message_type == MessageType.TRAIN:
        ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    else:
        ins = compat.recorddict_to_evaluateins(msg.content, keep_input=True)
    from shared_model.packing import LayoutError  # imports torch: train and evaluate only

    arrays = parameters_to_ndarrays(ins.parameters)
    if len(arrays) != 1:
        raise LayoutError(f"the server sent {len(arrays)} weight arrays, not one packed array")
    config = dict(ins.config)
    if msg.metadata.message_type == MessageType.TRAIN:
        scheme = config.get("secagg-scheme", "Flower's own")
        if scheme != secagg_primitives.SCHEME:
            raise SecAggSchemeError(
                f"the server's SecAgg+ masks and key shares are made by {scheme!r}, this "
                f"hospital's by {secagg_primitives.SCHEME!r}: they would not cancel, so "
                "this hospital does not upload; run the same fedfusion version on both sides"
            )
    return layout.unpack(arrays[0]), config


def legacy_fit_reply(
    msg: Message,
    upload: np.ndarray,
    codec: UploadCodec,
    metrics: dict[str, Scalar],
) -> Message:
    """The fitres reply the SecAgg+ mod masks; warns if the update would be clipped.

    ``upload`` is the whole vector (``shared_model/masked_upload.py``). Flower's
    ``num_examples`` is the same for every hospital (the weight is inside the vector).
    """
    bad = int(upload.size - np.isfinite(upload).sum())
    if bad:  # the server cannot inspect a masked update: check it here
        raise UploadError(
            f"this hospital's update has {bad} NaN or infinite values; it is not uploaded "
            "(under SecAgg+ the server could not refuse it)"
        )
    peak = float(np.abs(upload).max()) if upload.size else 0.0
    if peak > codec.clipping_range:
        log.warning(
            "SecAgg+ will clip this upload: its largest value %.4g exceeds "
            "secagg.clipping-range %.4g (raise the clipping range or lower the learning rate)",
            peak,
            codec.clipping_range,
        )
    fitres = FitRes(
        status=Status(code=Code.OK, message="OK"),
        parameters=ndarrays_to_parameters([upload]),
        num_examples=codec.flower_weight,
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
