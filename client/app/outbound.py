"""Everything a hospital sends, with its protection, enforced at the message boundary.

:data:`FIELDS` lists every field of every message a hospital sends, and says how it is
protected: inside SecAgg+ (the server learns only the sum over hospitals), charged to
the hospital's epsilon (and by which release), or public by design (and why). The
docs/privacy.md's table is generated from it.

:func:`outbound_guard` is the ClientApp's outermost mod. It checks every reply against
:data:`FIELDS` and refuses to send one that holds anything else: a field added to a
reply without a row here never leaves the hospital (the reply becomes an error naming
the field, not its value). It also decides what an error says: the hospital's own
checks (configuration, ledger, layout, SecAgg+ scheme) explain themselves, while any
other exception (a data file that does not decode, a bug) reaches the server as its
type alone, with the details in the hospital's log, since its message could quote a
record, a count or a file name. A simulated hospital, which holds the public embedded
data, sends every message in full.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from shared_model.config import HospitalConfig
from shared_model.errors import ExplainedError
from shared_model.protocol import (
    ARRAYS,
    EVALUATION,
    EVALUATION_STATISTICS,
    HOSPITAL,
    METRICS,
    Reply,
    SecAggSigned,
    Status,
)

__all__ = [
    "FIELDS",
    "Field",
    "OutboundFieldError",
    "error_reason",
    "outbound_guard",
    "unlisted_fields",
]

log = logging.getLogger("fedfusion.hospital")

SECAGG = "inside SecAgg+"
PUBLIC = "public"


@dataclass(frozen=True)
class Field:
    """One field a hospital sends: where it is, and what protects it."""

    message: str  # which reply
    kind: str  # "array", "metric" or "config": the record type
    record: str
    key: str
    protection: str  # SECAGG, PUBLIC, or "epsilon: <release>"
    why: str


_TRAIN = "train reply (SecAgg+ off)"
_UPLOAD = "SecAgg+ masked upload"
_EVAL = "evaluate reply (SecAgg+ off)"
_DERIVED = "a function of the run config and the released record count N̂ only"
_HELD_OUT_DERIVED = (
    "the held-out records' cumulative epsilon: a function of the hospital's settings and "
    "how many evaluations it released (absent when it releases exact statistics)"
)
_HELD_OUT_CAP = "the hospital's own held-out cap (max-held-out-epsilon)"
_UNIT = (
    "whom its epsilon protects, patient or record: from its file and whether its manifest "
    "has patient ids, fixed in its ledger"
)

FIELDS: tuple[Field, ...] = (
    # ---- plain training (a hospital that requires SecAgg+ declines these)
    Field(_TRAIN, "array", ARRAYS, "weights", "epsilon: DP-SGD",
          "the model after local DP-SGD: clipped per-example gradients, Gaussian noise"),
    Field(_TRAIN, "metric", METRICS, Reply.NUM_EXAMPLES, "epsilon: record count",
          "the released record count N̂ (N plus Gaussian noise, once), the FedAvg weight"),
    Field(_TRAIN, "metric", METRICS, Reply.TRAIN_LOSS, "epsilon: DP-SGD",
          "clipped per-example losses, noised in the same release as the gradients"),
    Field(_TRAIN, "metric", METRICS, Reply.EPSILON, PUBLIC, _DERIVED),
    Field(_TRAIN, "metric", METRICS, Reply.MAX_EPSILON, PUBLIC, "the hospital's own cap"),
    Field(_TRAIN, "metric", METRICS, Reply.DELTA, PUBLIC, "its policy's delta, set in config"),
    Field(_TRAIN, "metric", METRICS, Reply.HELD_OUT_EPSILON, PUBLIC, _HELD_OUT_DERIVED),
    Field(_TRAIN, "metric", METRICS, Reply.MAX_HELD_OUT_EPSILON, PUBLIC, _HELD_OUT_CAP),
    Field(_TRAIN, "metric", METRICS, Reply.NOISE_MULTIPLIER, PUBLIC, _DERIVED),
    Field(_TRAIN, "metric", METRICS, Reply.SAMPLE_RATE, PUBLIC, _DERIVED),
    Field(_TRAIN, "metric", METRICS, Reply.STEPS, PUBLIC, _DERIVED),
    Field(_TRAIN, "metric", METRICS, Reply.DECLINED, PUBLIC,
          "whether it declined: decided from its budget and config, never from records"),
    Field(_TRAIN, "config", HOSPITAL, Status.HOSPITAL_ID, PUBLIC, "the hospital's name"),
    Field(_TRAIN, "config", HOSPITAL, Status.STATUS, PUBLIC, "trained or declined"),
    Field(_TRAIN, "config", HOSPITAL, Status.REASON, PUBLIC,
          "why it declined: its budget and config keys, no record"),
    Field(_TRAIN, "config", HOSPITAL, Status.ROUND, PUBLIC, "the round it answers"),
    Field(_TRAIN, "config", HOSPITAL, Status.PRIVACY_UNIT, PUBLIC, _UNIT),
    # ---- evaluation without SecAgg+
    Field(_EVAL, "array", EVALUATION, EVALUATION_STATISTICS, "epsilon: held-out",
          "held-out score histograms (16 bins), loss sum and counts, sent only if the "
          "hospital's share-evaluation = true (default for simulated hospitals only); with "
          "Gaussian noise, charged to the held-out cap (max-held-out-epsilon over "
          "held-out-releases evaluations), at a hospital with its own data; with the "
          "variance of that noise (public: from its settings)"),
    Field(_EVAL, "metric", METRICS, Reply.NUM_EXAMPLES, "epsilon: held-out",
          "held-out count: 0 when withheld, else the statistics' count, noised with them"),
    Field(_EVAL, "metric", METRICS, Reply.HELD_OUT_EPSILON, PUBLIC,
          _HELD_OUT_DERIVED + ", this evaluation included"),
    Field(_EVAL, "metric", METRICS, Reply.MAX_HELD_OUT_EPSILON, PUBLIC, _HELD_OUT_CAP),
    Field(_EVAL, "config", HOSPITAL, Status.HOSPITAL_ID, PUBLIC, "the hospital's name"),
    Field(_EVAL, "config", HOSPITAL, Status.STATUS, PUBLIC, "evaluated or withheld"),
    Field(_EVAL, "config", HOSPITAL, Status.REASON, PUBLIC, "why it withheld: its config"),
    # ---- SecAgg+ (Flower's secaggplus_mod; one stage a message)
    Field("SecAgg+ key setup", "config", RECORD_KEY_CONFIGS, Key.PUBLIC_KEY_1, PUBLIC,
          "a fresh X25519 public key for this round"),
    Field("SecAgg+ key setup", "config", RECORD_KEY_CONFIGS, Key.PUBLIC_KEY_2, PUBLIC,
          "a fresh X25519 public key for this round"),
    Field("SecAgg+ key setup", "config", RECORD_KEY_CONFIGS, SecAggSigned.MEMBER, PUBLIC,
          "the hospital's name in the federation's members file"),
    Field("SecAgg+ key setup", "config", RECORD_KEY_CONFIGS, SecAggSigned.SIGNATURE, PUBLIC,
          "its signature, with its registered key, over the run, round, its node id, the "
          "SecAgg+ parameters and the two public keys"),
    Field("SecAgg+ key sharing", "config", RECORD_KEY_CONFIGS, Key.DESTINATION_LIST, PUBLIC,
          "which neighbours the encrypted shares are for"),
    Field("SecAgg+ key sharing", "config", RECORD_KEY_CONFIGS, Key.CIPHERTEXT_LIST, PUBLIC,
          "key shares, encrypted for each neighbour (the server cannot read them)"),
    Field(_UPLOAD, "config", RECORD_KEY_CONFIGS, Key.MASKED_PARAMETERS, SECAGG,
          "weighted update, weight, train loss, held-out statistics, all masked; the "
          "update and loss are also charged to epsilon (DP-SGD), the weight to the record "
          "count, the held-out statistics (16 bins, Gaussian noise) to the held-out "
          "epsilon at a hospital with its own data, with the variance of that noise (public: "
          "from its settings)"),
    Field(_UPLOAD, "metric", "fitres.num_examples", "num_examples", PUBLIC,
          "the same constant at every hospital (the weight is inside the masked vector)"),
    Field(_UPLOAD, "config", "fitres.status", "code", PUBLIC, "Flower's status: OK"),
    Field(_UPLOAD, "config", "fitres.status", "message", PUBLIC, "Flower's status: OK"),
    *(
        Field(_UPLOAD, "config", "fitres.metrics", key, PUBLIC, why)
        for key, why in (
            (Reply.EPSILON, _DERIVED),
            (Reply.MAX_EPSILON, "the hospital's own cap"),
            (Reply.DELTA, "its policy's delta, set in config"),
            (Reply.HELD_OUT_EPSILON, _HELD_OUT_DERIVED + ", this upload's included"),
            (Reply.MAX_HELD_OUT_EPSILON, _HELD_OUT_CAP),
            (Reply.NOISE_MULTIPLIER, _DERIVED),
            (Reply.SAMPLE_RATE, _DERIVED),
            (Reply.STEPS, _DERIVED),
            (Reply.DECLINED, "whether it declined: from its budget and config"),
            (Status.HOSPITAL_ID, "the hospital's name"),
            (Status.STATUS, "trained or declined"),
            (Status.REASON, "why it declined: its budget and config keys"),
            (Status.PRIVACY_UNIT, _UNIT),
        )
    ),
    Field("SecAgg+ consistency", "config", RECORD_KEY_CONFIGS, SecAggSigned.SIGNATURE, PUBLIC,
          "its signature over the round's survivor set (node ids of the hospitals that "
          "completed the key exchange and of those whose uploads are in the sum)"),
    Field("SecAgg+ unmasking", "config", RECORD_KEY_CONFIGS, Key.NODE_ID_LIST, PUBLIC,
          "whose shares follow"),
    Field("SecAgg+ unmasking", "config", RECORD_KEY_CONFIGS, Key.SHARE_LIST, PUBLIC,
          "shares of surviving neighbours' mask seeds and dropped ones' keys, as the "
          "protocol needs to unmask the sum only"),
    # ---- any message
    Field("error reply", "error", "error", "reason", PUBLIC,
          "the error's type; its message only for the hospital's own configuration, "
          "ledger, layout and scheme checks, or from a simulated hospital (details of "
          "anything else stay in its log)"),
)  # fmt: skip

_KINDS = {"array": "array_records", "metric": "metric_records", "config": "config_records"}
_ALLOWED = {(f.kind, f.record, f.key) for f in FIELDS}


class OutboundFieldError(ExplainedError, RuntimeError):
    """A reply held a field that is not listed in client/app/outbound.py: it is not sent."""


def unlisted_fields(reply: Message) -> list[str]:
    """``kind:record/key`` of every field of ``reply`` that :data:`FIELDS` does not list."""
    if reply.has_error():
        return []
    out = []
    for kind, attribute in _KINDS.items():
        for record_name, record in getattr(reply.content, attribute).items():
            for key in record:
                if (kind, record_name, key) not in _ALLOWED:
                    out.append(f"{kind}:{record_name}/{key}")
    return out


def error_reason(err: BaseException, public_data: bool = False) -> str:
    """What the server learns of an error: the message only for the hospital's own checks.

    ``public_data``: a simulated hospital, holding the public embedded data, says all.
    """
    if public_data or isinstance(err, ExplainedError):
        return f"{type(err).__name__}: {err}"
    return f"{type(err).__name__} at the hospital (details in the hospital's log)"


def _holds_public_data(ctxt: Context) -> bool:
    try:
        return HospitalConfig.from_node_config(ctxt.node_config).simulated
    except Exception:  # an unreadable node config is no reason to say more
        return False


def outbound_guard(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Send a reply only if every field is listed; turn an exception into a terse error."""
    try:
        reply = call_next(msg, ctxt)
        unlisted = unlisted_fields(reply)
        if unlisted:
            raise OutboundFieldError(
                f"a {msg.metadata.message_type} reply held fields that client/app/outbound.py "
                f"does not list, so it was not sent: {', '.join(unlisted)}"
            )
        return reply
    except Exception as err:  # every failure becomes a reply: nothing else leaves
        reason = error_reason(err, _holds_public_data(ctxt))
        log.error(
            "the %s message failed; the server is told: %s\n%s",
            msg.metadata.message_type,
            reason,
            traceback.format_exc(),
        )
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
        return Message(error, reply_to=msg)
