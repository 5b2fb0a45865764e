"""Planning a hospital's private round: its public size, sample rate, steps and noise.

Everything the server can observe about a round (the aggregation weight, the sample
rate, the number of steps, the noise) is derived from **public** values only: the run
config and the hospital's *released* record count N̂, never its true count N. N̂ is
released once, on the hospital's first private round, as N plus Gaussian noise, and
charged to the ledger like every other release (the add/remove-one neighbours the
epsilon refers to differ in N by exactly one). Poisson sampling at rate q protects each
record whatever the dataset's true size, so planning from N̂ costs no accuracy in the
accounting, only a little in the expected batch size.

The noise multiplier is planned once, for the whole budget: the smallest that keeps
epsilon, with every release so far and all planned rounds, at or below the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from client.dp.accounting import plan_noise_multiplier
from client.dp.ledger import DP_SGD, RECORD_COUNT, LedgerEntry, PrivacyLedger
from client.dp.policy import LOSS_SHARE, RECORD_COUNT_NOISE, PrivacyPolicy

__all__ = ["RoundPlan", "plan_round", "round_shape"]


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """Whether this hospital trains this round, and with what privacy parameters."""

    train: bool
    reason: str
    entry: LedgerEntry  # the DP-SGD release of this round, as the ledger records it
    epsilon_before: float
    epsilon_after: float  # if the round is trained
    public_records: int  # N̂: the record count the hospital released

    @property
    def expected_batch_size(self) -> float:
        """Q * N̂: what the summed, noised gradient is divided by (public)."""
        return self.entry.sample_rate * self.public_records

    @property
    def gradient_noise_multiplier(self) -> float:
        """The noise on the clipped gradient sum, in units of the clipping norm.

        The release also carries the clipped loss sum, so its sensitivity is
        C * sqrt(1 + LOSS_SHARE^2); the ledger records the multiplier relative to that.
        """
        return self.entry.noise_multiplier * math.sqrt(1.0 + LOSS_SHARE**2)


def round_shape(public_records: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(Poisson sample rate, steps) of a round, from public values only.

    q = B / N̂ (at most 1) and ceil(N̂ / B) steps per epoch: on average each record is
    seen once per epoch. The loader runs exactly these steps at exactly this rate.
    """
    rate = min(1.0, batch_size / public_records)
    return rate, local_epochs * math.ceil(public_records / batch_size)


def plan_round(
    ledger: PrivacyLedger,
    policy: PrivacyPolicy,
    *,
    server_round: int,
    planned_rounds: int,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    count_noise: Callable[[float], float] | None = None,
) -> RoundPlan:
    """Release the record count if not yet done, plan the noise once, decide to train.

    ``num_examples`` (the true N) is used only for the one noisy release of N̂.
    ``count_noise(std)`` draws that noise (default: the OS CSPRNG).
    """
    before = ledger.epsilon()
    if ledger.public_records is None:
        release = LedgerEntry(
            round=server_round,
            noise_multiplier=RECORD_COUNT_NOISE,
            sample_rate=1.0,
            steps=1,
            mechanism=RECORD_COUNT,
        )
        if ledger.epsilon(release) > policy.max_epsilon:
            return _decline(ledger, policy, release, before, server_round, 0)
        noise = (count_noise or _secure_normal)(RECORD_COUNT_NOISE)
        ledger.public_records = max(1, round(num_examples + noise))
        ledger.record_release(release)  # before N̂ leaves, like every release
        before = ledger.epsilon()
    public = ledger.public_records
    q, steps = round_shape(public, batch_size, local_epochs)
    if ledger.noise_multiplier is None:
        ledger.noise_multiplier = plan_noise_multiplier(
            policy.target_epsilon,
            policy.delta,
            q,
            planned_rounds * steps,
            policy.accountant,
            prior=ledger.accountant_history(),
        )
        ledger.planned_rounds = planned_rounds
        ledger.target_epsilon = policy.target_epsilon
    entry = LedgerEntry(
        round=server_round,
        noise_multiplier=ledger.noise_multiplier,
        sample_rate=q,
        steps=steps,
        mechanism=DP_SGD,
    )
    after = ledger.epsilon(entry)
    if after > policy.max_epsilon:
        return _decline(ledger, policy, entry, before, server_round, public)
    return RoundPlan(
        train=True,
        reason="trained",
        entry=entry,
        epsilon_before=before,
        epsilon_after=after,
        public_records=public,
    )


def _decline(
    ledger: PrivacyLedger,
    policy: PrivacyPolicy,
    entry: LedgerEntry,
    before: float,
    server_round: int,
    public: int,
) -> RoundPlan:
    after = ledger.epsilon(entry)
    what = (
        "releasing its record count"
        if entry.mechanism == RECORD_COUNT
        else (
            f"training round {server_round} ({entry.steps} steps, noise multiplier "
            f"{entry.noise_multiplier:.3f}, sample rate {entry.sample_rate:.4f})"
        )
    )
    reason = (
        f"declined: {what} would raise epsilon from {before:.3f} to {after:.3f}, above this "
        f"hospital's max-epsilon {policy.max_epsilon:g} (delta {policy.delta:g})"
    )
    return RoundPlan(
        train=False,
        reason=reason,
        entry=entry,
        epsilon_before=before,
        epsilon_after=after,
        public_records=public,
    )


def _secure_normal(std: float) -> float:
    from client.dp.secure_noise import secure_normal  # imports torch: only to draw noise

    return secure_normal(std)
