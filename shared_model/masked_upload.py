"""What a hospital's SecAgg+ upload holds, and how the server reads the unmasked sum.

Under SecAgg+ everything a round's result needs travels in the one masked vector, so
the server learns it only summed over the hospitals:

==================  =========================================================
slot                value (``w`` = N̂ / max-weight: the hospital's public weight)
==================  =========================================================
update              ``w * (new - global weights)``, one value per trainable weight
weight              ``w``
train loss          ``w * released train loss`` (DP-noised at the hospital)
evaluation          the held-out statistics (shared_model/evaluation.py) of the
                    model the hospital received, unweighted
==================  =========================================================

Flower's SecAgg+ mod clips every value to +-``clipping_range`` and quantizes it to 2^22
levels; each slot is scaled so that its honest values fit (a count of at most
``max_weight`` records maps to at most the clipping range). At the default max-weight of
10,000 a count is read back exactly (after rounding) and the held-out loss sum to within
0.1 per hospital. Every hospital reports the
same Flower weight, so Flower's weighted mean is the plain mean of the vectors, and the
server multiplies it by the number of uploads to get their sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared_model.evaluation import EVAL_LOSS_CLIP, EvalStats

__all__ = ["QUANTIZATION_RANGE", "UploadCodec", "UploadSum"]

_TRAIN_LOSS_RANGE = (-2.0, 4.0)  # a released (noisy) train loss is clipped to this
QUANTIZATION_RANGE = 1 << 22  # levels each value is quantized to (the server sets it)
# A hospital's held-out noise variance fits up to this times max-weight (std 1,000 at the
# default), read back to within 0.5.
_NOISE_VARIANCE_SCALE = 100.0


@dataclass(frozen=True)
class UploadSum:
    """The server's reading of the unmasked sum over one round's uploads."""

    update: np.ndarray  # the weighted mean update, sum(w * delta) / sum(w)
    weight: float  # sum(w): zero when no hospital trained
    train_loss: float  # the weighted mean released train loss (NaN when no hospital trained)
    evaluation: EvalStats  # summed over the hospitals that evaluated


@dataclass(frozen=True)
class UploadCodec:
    """The layout of one masked upload: ``params`` update values, then the rest."""

    params: int
    labels: tuple[str, ...]
    clipping_range: float
    max_weight: float

    @property
    def size(self) -> int:
        """Values in one upload."""
        return self.params + 2 + EvalStats.vector_size(len(self.labels))

    @property
    def flower_weight(self) -> int:
        """The ``num_examples`` every hospital hands Flower's mod: the same for all."""
        return max(1, math.floor(self.max_weight))

    def _units(self) -> np.ndarray:
        """Per slot after the update: what one unit of the value maps to."""
        c = self.clipping_range
        count = c / self.max_weight  # a count of max_weight records is the clipping range
        evaluation = np.full(EvalStats.vector_size(len(self.labels)), count)
        evaluation[1] = c / (self.max_weight * EVAL_LOSS_CLIP)  # the loss sum
        evaluation[5] = c / (self.max_weight * _NOISE_VARIANCE_SCALE)  # the noise variance
        lo, hi = _TRAIN_LOSS_RANGE
        return np.concatenate([[c, c / max(abs(lo), hi)], evaluation])

    def encode(
        self,
        update: np.ndarray,
        weight: float,
        train_loss: float,
        evaluation: EvalStats,
    ) -> np.ndarray:
        """One hospital's upload (float64). ``weight`` is N̂ / max-weight, in [0, 1]."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(
                f"weight {weight:g} outside [0, 1]: the training set exceeds secagg.max-weight"
            )
        update = np.asarray(update, dtype=np.float64).ravel()
        if update.size != self.params:
            raise ValueError(f"an update of {update.size} values, expected {self.params}")
        carried = self.max_weight * _NOISE_VARIANCE_SCALE
        if not evaluation.noise_variance <= carried:  # SecAgg+ would clip it, silently
            raise ValueError(
                f"held-out noise variance {evaluation.noise_variance:g} exceeds the "
                f"{carried:g} an upload carries (secagg.max-weight x {_NOISE_VARIANCE_SCALE:g}): "
                "the server's intervals would leave part of the noise out; raise "
                "secagg.max-weight or this hospital's held-out epsilon cap"
            )
        loss = float(np.clip(train_loss, *_TRAIN_LOSS_RANGE)) if math.isfinite(train_loss) else 0.0
        tail = np.concatenate([[weight, weight * loss], evaluation.to_vector()])
        return np.concatenate([weight * update, tail * self._units()])

    def decode_sum(self, mean_of_uploads: np.ndarray, uploads: int) -> UploadSum:
        """Read what Flower's SecAgg+ hands the strategy: the mean of ``uploads`` vectors."""
        vector = np.asarray(mean_of_uploads, dtype=np.float64).ravel() * uploads
        if vector.size != self.size:
            raise ValueError(f"an aggregate of {vector.size} values, expected {self.size}")
        tail = vector[self.params :] / self._units()
        weight, weighted_loss = float(tail[0]), float(tail[1])
        trained = weight > 0.5 / self.max_weight  # less than one record's weight: nobody
        update = vector[: self.params] / weight if trained else np.zeros(self.params)
        raw = tail[2:]
        noised = raw[4] > 0.5  # some hospital noised its statistics: negatives are noise
        evaluation = EvalStats.from_vector(self.labels, raw if noised else np.maximum(raw, 0.0))
        evaluation = evaluation.rounded()
        return UploadSum(
            update=update,
            weight=weight if trained else 0.0,
            train_loss=weighted_loss / weight if trained else math.nan,
            evaluation=evaluation,
        )
