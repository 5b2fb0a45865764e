"""Every record and key that crosses the wire between the server and a hospital.

Both sides import these names; neither spells a key as a string literal. What each
field a hospital sends is protected by is listed in ``client/app/outbound.py``.
"""

from __future__ import annotations

__all__ = [
    "ARRAYS",
    "CONFIG",
    "EVALUATION",
    "EVALUATION_STATISTICS",
    "HOSPITAL",
    "METRICS",
    "Reply",
    "Request",
    "SecAggSigned",
    "Status",
]

# Records of a message (Message API).
ARRAYS = "arrays"  # ArrayRecord: the packed trainable weights (shared_model/packing.py)
CONFIG = "config"  # ConfigRecord: the server's settings for this request
METRICS = "metrics"  # MetricRecord: a hospital's public figures
HOSPITAL = "hospital"  # ConfigRecord: who replied, and what it did
EVALUATION = "evaluation"  # ArrayRecord: held-out statistics (shared_model/evaluation.py)
EVALUATION_STATISTICS = "statistics"  # its one array


class Request:
    """Keys of the server's config record (plain requests and SecAgg+ ``fitins.config``)."""

    SERVER_ROUND = "server-round"
    PLANNED_ROUNDS = "planned-rounds"
    PROXIMAL_MU = "proximal-mu"
    BASE_HASH = "base-hash"  # the frozen weights every hospital must hold
    WEIGHTS_LAYOUT = "weights-layout"  # the digest of the packed layout
    SECAGG_SCHEME = "secagg-scheme"
    EVALUATE = "evaluate"  # SecAgg+: evaluate the received model inside this upload
    EVALUATE_ONLY = "evaluate-only"  # SecAgg+: the run's last exchange: evaluate, no training


class Reply:
    """Keys of a hospital's metrics record."""

    NUM_EXAMPLES = "num-examples"
    TRAIN_LOSS = "train-loss"
    EPSILON = "epsilon"
    MAX_EPSILON = "max-epsilon"
    DELTA = "delta"  # the delta its epsilon is stated for
    HELD_OUT_EPSILON = "held-out-epsilon"  # its held-out records' cumulative epsilon
    MAX_HELD_OUT_EPSILON = "max-held-out-epsilon"
    NOISE_MULTIPLIER = "noise-multiplier"
    SAMPLE_RATE = "sample-rate"
    STEPS = "steps"
    DECLINED = "declined"


class Status:
    """Keys of a hospital's ``hospital`` record, and the statuses it reports."""

    HOSPITAL_ID = "hospital-id"
    STATUS = "status"
    REASON = "reason"
    ROUND = "round"
    PRIVACY_UNIT = "privacy-unit"  # whom its epsilon protects: patient or record
    TRAINED = "trained"
    DECLINED = "declined"
    EVALUATED = "evaluated"
    WITHHELD = "withheld"  # evaluated, but keeps its figures (share-evaluation = false)


class SecAggSigned:
    """What fedfusion adds to Flower's SecAgg+ messages: signed keys and survivor sets.

    Flower's four stage messages are unchanged; these travel in records of their own
    (``client/app/secagg_guard.py`` checks them, ``server/app/flwr_compat.py`` relays them).
    """

    CONSISTENCY = "fedfusion_consistency"  # the stage between masked upload and unmasking
    ADVERTS = "fedfusion-secagg-adverts"  # record: the neighbours' signed key advertisements
    SIGNATURES = "fedfusion-secagg-signatures"  # record: the survivor set and its signatures
    MEMBER = "fedfusion-member"  # key setup reply: the member name in the members file
    SIGNATURE = "fedfusion-signature"  # key setup / consistency reply: the signature
    COMPLETED = "completed"  # node ids that completed the key exchange
    SURVIVORS = "survivors"  # node ids whose masked uploads are in the sum
    NODES, MEMBERS, SIGS = "node-ids", "members", "signatures"  # parallel lists
