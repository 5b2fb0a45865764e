"""Held-out statistics leave a hospital only through the Gaussian mechanism, charged.

The server learns a model's quality from each hospital's summed held-out statistics
(shared_model/evaluation.py). Exact counts would turn a crafted model into a label query
on one held-out patient, and secure aggregation alone does not stop a server that
breaks it. So a hospital with its own data releases them like a training round:

- **Coarse, public bins.** Scores are counted in 16 bins of the logit (edges fixed here,
  0 among them, so the 0.5 threshold metrics stay exact), laid into the 200-bin vector
  the server reads: only 16 cells per label and class can be non-zero, whatever the data.
- **Bounded sensitivity.** Adding or removing one record changes the example count and
  the exact-match count by at most 1, the loss sum by at most ``EVAL_LOSS_CLIP`` and one
  cell per label: with the loss scaled by its clip, the vector's L2 sensitivity is
  sqrt(3 + labels).
- **Gaussian noise and a ledger entry.** Every component gets noise of standard deviation
  ``z`` times that sensitivity (the loss ``z`` times it times the clip), from the OS
  CSPRNG, and the release is recorded in the held-out part of the ledger (mechanism
  ``held-out-stats``, sample rate 1, one step) before it leaves.
- **A budget of its own.** Training and held-out patients are disjoint parts of the
  hospital's split, so each patient's epsilon is that of its part. ``held-out-releases``
  evaluations fit the held-out cap: the final model's gets half of it (the model card
  reports it), evenly spaced rounds before it share the rest; any other request, or any
  past the cap, is declined (nothing leaves then).
- **Read as a noised sum.** The statistics say how many hospitals noised theirs, and
  the server then estimates AUROC by a binormal fit (shared_model/evaluation.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from client.dp.accounting import compute_epsilon, plan_noise_multiplier
from client.dp.ledger import (
    HELD_OUT_PART,
    HELD_OUT_STATS,
    LedgerEntry,
    PrivacyLedger,
    part_epsilon,
)
from client.dp.policy import PrivacyPolicy
from shared_model.evaluation import (
    COARSE_EDGES,
    COARSE_OF_FINE,
    EVAL_LOSS_CLIP,
    SCORE_BINS,
    SCORE_EDGES,
    EvalStats,
)

__all__ = [
    "COARSE_EDGES",
    "HeldOutRelease",
    "coarse_layout",
    "finite_predictions",
    "held_out_epsilon",
    "held_out_noise_multipliers",
    "release_held_out",
    "released_rounds",
    "sensitivity",
]


@dataclass(frozen=True)
class HeldOutRelease:
    """What a hospital lets out of one held-out evaluation, and why."""

    stats: EvalStats  # noised, or zeros when declined
    released: bool
    reason: str = ""
    entry: LedgerEntry | None = None


_LOGIT_BOUND = 1e4  # a crafted model's logits are clipped to this before anything is summed


def finite_predictions(logits: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and per-record losses with every NaN and infinity replaced.

    A crafted model can make one record's logit infinite, and then its loss NaN or
    infinite depending on its label (or a logit NaN for records past a threshold):
    nothing that follows (the bins, the sums, an exception) may depend on which. A NaN
    logit becomes 0, others are clipped to +-1e4; a non-finite loss becomes the clip.
    """
    logits = np.nan_to_num(logits, nan=0.0, posinf=_LOGIT_BOUND, neginf=-_LOGIT_BOUND)
    logits = np.clip(logits, -_LOGIT_BOUND, _LOGIT_BOUND)
    return logits, np.where(np.isfinite(losses), losses, EVAL_LOSS_CLIP)


def coarse_layout() -> np.ndarray:
    """For each of the SCORE_BINS fine bins, the fine bin its count is moved to.

    Every coarse bin's counts go to one representative fine bin in it (its middle;
    for the open end bins, one unit beyond the last edge), so the server reads the
    coarse histogram in the usual layout.
    """
    edges = (COARSE_EDGES[0] - 1.0, *COARSE_EDGES, COARSE_EDGES[-1] + 1.0)
    middles = [(lo + hi) / 2 for lo, hi in itertools.pairwise(edges)]
    target = np.searchsorted(SCORE_EDGES, np.array(middles), side="right") - 1
    return np.asarray(target[COARSE_OF_FINE], dtype=np.int64)


# The final model's evaluation gets this share of the held-out budget.
FINAL_SHARE = 0.5

_LAYOUT = coarse_layout()
_CELLS = np.unique(_LAYOUT)  # the fine bins that may hold a released count


def _coarse(counts: np.ndarray) -> np.ndarray:
    """(labels, SCORE_BINS) counts summed into the representative bins."""
    out = np.zeros_like(counts)
    for j in range(counts.shape[0]):
        np.add.at(out[j], _LAYOUT, counts[j])
    return out


def _csprng_normal(shape: tuple[int, ...]) -> np.ndarray:
    from client.dp.secure_noise import secure_normals  # imports torch: only to draw noise

    return secure_normals(math.prod(shape)).reshape(shape)


def _snapped(values: np.ndarray | float, std: float) -> np.ndarray:
    """Released values on a grid of std / 1024: the noise's low bits say nothing more.

    A float's last bits can betray which count it was added to (a float32 noise added
    in float64 does); rounding to a grid much finer than the noise is post-processing.
    """
    grid = std / 1024.0
    return np.round(np.asarray(values, dtype=np.float64) / grid) * grid


def held_out_epsilon(history: Sequence[LedgerEntry], policy: PrivacyPolicy) -> float | None:
    """The held-out part's cumulative epsilon in ``history``; None if released exact.

    Public, like the training epsilon: a function of the releases' settings only.
    """
    if not policy.held_out_noise:
        return None
    return part_epsilon(history, HELD_OUT_PART, policy.delta, policy.accountant)


def sensitivity(num_labels: int) -> float:
    """L2 sensitivity of the released vector (loss scaled by its clip) to one record."""
    return math.sqrt(3 + num_labels)


@lru_cache(maxsize=64)
def held_out_noise_multipliers(policy: PrivacyPolicy) -> tuple[float, float]:
    """Noise (std / sensitivity) of the final model's release and of each other one.

    The final model's evaluation, which the model card reports, gets FINAL_SHARE of the
    budget (in the Gaussian's 1/z^2, which composes additively); the other
    ``held_out_releases - 1``, used only to compare rounds, share the rest. Together they
    fit the held-out cap under the ledger's accountant.
    """
    releases = policy.held_out_releases
    one = plan_noise_multiplier(policy.held_out_cap, policy.delta, 1.0, 1, policy.accountant)
    if releases == 1:
        return one, one
    final = one / math.sqrt(FINAL_SHARE)
    other = one / math.sqrt((1.0 - FINAL_SHARE) / (releases - 1))
    while (
        compute_epsilon(
            [(final, 1.0, 1), (other, 1.0, releases - 1)], policy.delta, policy.accountant
        )
        > policy.held_out_cap
    ):  # exact under RDP; a tighter accountant may need a little more
        final, other = final * 1.001, other * 1.001
    return final, other


def released_rounds(planned_rounds: int, releases: int) -> set[int]:
    """Which models (by the round that produced them; 0 = untrained) a hospital evaluates.

    Every one when the run's evaluations fit the releases; otherwise the final model
    and evenly spaced rounds before it.
    """
    if planned_rounds + 1 <= releases:
        return set(range(planned_rounds + 1))
    return {math.ceil(planned_rounds * k / releases) for k in range(1, releases + 1)}


def release_held_out(
    stats: EvalStats,
    ledger: PrivacyLedger,
    policy: PrivacyPolicy,
    *,
    model_round: int,
    planned_rounds: int,
    normal: Callable[[tuple[int, ...]], np.ndarray] | None = None,
) -> HeldOutRelease:
    """Coarsen, noise and charge ``stats``; or decline, releasing nothing.

    ``model_round``: the round whose model was evaluated (0: the untrained one).
    ``normal(shape)`` draws standard normal noise (default: the OS CSPRNG).
    """
    normal = normal or _csprng_normal
    zeros = EvalStats.zeros(stats.labels)
    if model_round not in released_rounds(planned_rounds, policy.held_out_releases):
        return HeldOutRelease(
            zeros,
            released=False,
            reason=f"not among the {policy.held_out_releases} evaluations this hospital "
            f"releases over {planned_rounds} rounds (hospital held-out-releases)",
        )
    final, other = held_out_noise_multipliers(policy)
    z = final if model_round >= planned_rounds else other
    entry = LedgerEntry(
        round=model_round,
        noise_multiplier=z,
        sample_rate=1.0,
        steps=1,
        status="completed",
        mechanism=HELD_OUT_STATS,
    )
    before = ledger.epsilon(part=HELD_OUT_PART)
    after = ledger.epsilon(entry, part=HELD_OUT_PART)
    if after > policy.held_out_cap:
        return HeldOutRelease(
            zeros,
            released=False,
            reason=f"declined: evaluating round {model_round}'s model would raise the "
            f"held-out epsilon from {before:.3f} to {after:.3f}, above this hospital's cap "
            f"{policy.held_out_cap:g}",
        )
    ledger.record_release(entry)  # before anything leaves, like every release
    std = z * sensitivity(len(stats.labels))
    k = len(stats.labels)
    positives, negatives = _coarse(stats.positives), _coarse(stats.negatives)
    cells = np.zeros_like(positives, dtype=bool)
    cells[:, _CELLS] = True
    header = np.array([stats.examples, stats.loss_sum / EVAL_LOSS_CLIP, stats.exact_matches])
    header = _snapped(header + std * normal((3,)), std)
    noisy = replace(
        stats,
        examples=float(header[0]),
        loss_sum=float(header[1]) * EVAL_LOSS_CLIP,
        exact_matches=float(header[2]),
        positives=np.where(cells, _snapped(positives + std * normal((k, SCORE_BINS)), std), 0.0),
        negatives=np.where(cells, _snapped(negatives + std * normal((k, SCORE_BINS)), std), 0.0),
        hospitals=1.0,  # that it evaluated is public; how many records is not
        noised=1.0,
        noise_variance=std**2,  # public: from its settings, for the server's intervals
    )
    return HeldOutRelease(noisy, released=True, entry=entry)
