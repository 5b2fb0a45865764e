"""The arithmetic of one round at the coordinator, whatever carried the updates.

A round moves the global model by the mean of the hospitals' updates, each weighed by
the hospital's released record count N̂, and then by the server optimizer's step. How
the updates arrive differs, and only that: plain rounds see each hospital's weights
(:func:`mean_of_updates`, or :func:`mean_of_model` for a robust aggregator's model);
SecAgg+ rounds see only the unmasked sum, which already holds the weighted updates and
the weights summed (:func:`mean_of_sum`); the in-process federation has either in hand.
All of them then call :func:`round_result`. Nothing here sends, receives or unmasks.
In shared_model, not server/, because the in-process federation of the hospital-side
privacy audit steps the global model with the same arithmetic, and a hospital's code
never imports the server's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared_model.masked_upload import UploadSum
from shared_model.packing import WeightLayout

__all__ = [
    "HospitalUpdate",
    "RoundMean",
    "RoundResult",
    "ServerStep",
    "finite_weighted_mean",
    "mean_of_model",
    "mean_of_sum",
    "mean_of_updates",
    "round_result",
]

StateDict = dict[str, torch.Tensor]
# the server optimizer's step: (the global model, the round's averaged model) -> the new one
ServerStep = Callable[[StateDict, StateDict], StateDict]

_TRAIN_LOSS = "train-loss"  # the key finite_weighted_mean reads the train loss under


@dataclass(frozen=True)
class HospitalUpdate:
    """One hospital's part in a round where the server sees each update."""

    weights: np.ndarray  # the packed trainable weights it returned
    num_examples: float  # its released record count N̂: the weight of its update
    train_loss: float | None = None  # released with DP noise; None or NaN: not reported


@dataclass(frozen=True)
class RoundMean:
    """What a round aggregated: the update the server optimizer steps along."""

    delta: np.ndarray  # float64, one value per packed weight: sum(N̂ * update) / sum(N̂)
    weight: float  # what the updates weighed together (under SecAgg+, sum(N̂) / max-weight)
    train_loss: float | None  # the weighted mean released train loss; None: none finite


@dataclass(frozen=True)
class RoundResult:
    """The global model after a round, and what its record says of the training."""

    state: StateDict  # the one sent, when the round averaged no update
    train_loss: float | None  # the weighted mean released train loss; None: none


def finite_weighted_mean(rows: Iterable[tuple[float, Mapping[str, object]]]) -> dict[str, float]:
    """Per key, the weighted mean over the rows where the value is a finite number.

    A hospital whose test split lacks a label has no AUROC for it; that hospital is left
    out of that label's mean instead of poisoning it with NaN or counting it as 0.5.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for weight, values in rows:
        for key, value in values.items():
            if isinstance(value, int | float) and math.isfinite(value) and weight > 0:
                sums[key] = sums.get(key, 0.0) + weight * float(value)
                weights[key] = weights.get(key, 0.0) + weight
    return {k: sums[k] / weights[k] for k in sums}


def _weighed(updates: Sequence[HospitalUpdate]) -> list[HospitalUpdate]:
    """The updates that count: a positive, finite N̂ (a hospital that declined has none)."""
    return [u for u in updates if math.isfinite(u.num_examples) and u.num_examples > 0]


def _train_loss(updates: Sequence[HospitalUpdate]) -> float | None:
    return finite_weighted_mean((u.num_examples, {_TRAIN_LOSS: u.train_loss}) for u in updates).get(
        _TRAIN_LOSS
    )


def mean_of_updates(sent: np.ndarray, updates: Sequence[HospitalUpdate]) -> RoundMean | None:
    """FedAvg: each update (its weights minus ``sent``) weighed by its N̂; None: nobody.

    An update without weight is skipped, never multiplied by zero: a declined
    hospital's weights (whatever they hold) cannot reach the mean.
    """
    counted = _weighed(updates)
    if not counted:
        return None
    before = np.asarray(sent, dtype=np.float64)
    total = np.zeros_like(before)
    weight = 0.0
    for u in counted:
        total += u.num_examples * (np.asarray(u.weights, dtype=np.float64) - before)
        weight += u.num_examples
    return RoundMean(delta=total / weight, weight=weight, train_loss=_train_loss(counted))


def mean_of_model(
    sent: np.ndarray,
    aggregated: np.ndarray,
    updates: Sequence[HospitalUpdate],
    train_loss: float | None = None,
) -> RoundMean | None:
    """A robust aggregator's model (median, trimmed mean, Krum) as the round's update.

    Its weight is FedAvg's over the same ``updates``; its train loss the aggregator's
    own (``train_loss``: Krum's comes from the updates it selected), else FedAvg's.
    """
    counted = _weighed(updates)
    if not counted:
        return None
    delta = np.asarray(aggregated, dtype=np.float64) - np.asarray(sent, dtype=np.float64)
    weight = float(sum(u.num_examples for u in counted))
    loss = _train_loss(counted) if train_loss is None else train_loss
    return RoundMean(delta=delta, weight=weight, train_loss=loss)


def mean_of_sum(total: UploadSum) -> RoundMean | None:
    """The unmasked SecAgg+ sum's update (it holds sum(w * update) and sum(w)); None: nobody.

    No single hospital's update or loss is ever seen: only these sums.
    """
    if not total.weight > 0:
        return None
    return RoundMean(delta=total.update, weight=total.weight, train_loss=total.train_loss)


def round_result(
    state: StateDict, mean: RoundMean | None, layout: WeightLayout, step: ServerStep
) -> RoundResult:
    """The new global model: ``state`` plus the mean update, then the server's step.

    A round that averaged nothing leaves the model as it was and does not step the
    server optimizer (its momentum would otherwise move the model on no update).
    """
    if mean is None:
        return RoundResult(state=state, train_loss=None)
    packed = layout.pack(state)
    averaged = (packed.astype(np.float64) + mean.delta).astype(packed.dtype)
    if not np.isfinite(averaged).all():  # never checkpointed, never sent to a hospital
        raise FloatingPointError(
            f"the round's mean update (weight {mean.weight:g}) leaves the model non-finite"
        )
    return RoundResult(state=step(state, layout.unpack(averaged)), train_loss=mean.train_loss)
