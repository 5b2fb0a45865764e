"""A private round's ledger sequence, around whatever trains in it.

The order is the guarantee. The hospital's ledger is opened and the round planned from
public values (``client/dp/planning.py``: a first round releases the record count N̂, a
round past max-epsilon is declined); the round is written to the ledger *before* any
step touches a record; the training stage runs; then the entry is completed and the
ledger's epsilon checked against Opacus's own accountant. A crash while training
leaves the entry "started", counted in full. The trainer (``trainer.py``) runs this
sequence with DP-SGD (``local_training.py``) as its training stage; the privacy property
tests run the same sequence with a training stage that reads no record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from client.app.site import Site
from client.dp.accounting import compute_epsilon
from client.dp.ledger import LedgerEntry, LedgerError, PrivacyLedger
from client.dp.planning import RoundPlan, plan_round
from shared_model.config import RunConfig

__all__ = ["History", "PrivateRound", "Trained", "TrainingStage", "private_round"]

StateDict = dict[str, torch.Tensor]
History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps) per release


@dataclass(frozen=True)
class Trained:
    """What a round's training stage hands back."""

    weights: StateDict
    train_loss: float  # released with DP noise (exact only without DP)
    steps: int
    # Opacus's own accountant after the round, started from the ledger's prior history
    opacus_history: History = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class PrivateRound:
    """A private round after its ledger sequence."""

    ledger: PrivacyLedger
    plan: RoundPlan
    trained: Trained | None  # None: the plan declined the round, nothing trained
    epsilon: float  # cumulative, after the round (before it, when declined)


# (the round's plan, the ledger's history before the round) -> what training did
TrainingStage = Callable[[RoundPlan, History], Trained]


def private_round(
    site: Site,
    run: RunConfig,
    *,
    server_round: int,
    planned_rounds: int,
    num_examples: int,
    ledger_seen: Sequence[LedgerEntry],
    count_noise: Callable[[float], float] | None,
    train: TrainingStage,
) -> PrivateRound:
    """Plan, write ahead, ``train``, account: one private round at ``site``.

    ``num_examples`` (the true N) is used only for the one noisy release of N̂;
    ``count_noise(std)`` draws that noise. ``ledger_seen``: the ledger history this
    hospital process recorded before (the ledger on disk must still hold it).
    LedgerError when the training stage took other steps than planned or Opacus's
    epsilon disagrees with the ledger's.
    """
    ledger = site.open_ledger(ledger_seen)
    plan = plan_round(  # from public values only (client/dp/planning.py)
        ledger,
        site.policy,
        server_round=server_round,
        planned_rounds=planned_rounds,
        num_examples=num_examples,
        batch_size=run.train.batch_size,
        local_epochs=run.train.local_epochs,
        count_noise=count_noise,
    )
    if not plan.train:
        return PrivateRound(ledger=ledger, plan=plan, trained=None, epsilon=plan.epsilon_before)
    ledger.begin_round(plan.entry)  # written before any step touches the data
    trained = train(plan, ledger.accountant_history()[:-1])
    epsilon = _account(ledger, plan, site, server_round, trained)
    return PrivateRound(ledger=ledger, plan=plan, trained=trained, epsilon=epsilon)


def _account(
    ledger: PrivacyLedger, plan: RoundPlan, site: Site, server_round: int, trained: Trained
) -> float:
    """Complete the round's entry; the epsilon after it, checked against Opacus's."""
    ledger.complete_round(server_round, trained.steps)
    epsilon = ledger.epsilon()
    # Opacus's own accountant saw every step; it must agree with the ledger.
    opacus_epsilon = compute_epsilon(
        trained.opacus_history, site.policy.delta, site.policy.accountant
    )
    if trained.steps != plan.entry.steps or not math.isclose(opacus_epsilon, epsilon, rel_tol=1e-6):
        raise LedgerError(
            f"{site.name}: round {server_round} took {trained.steps} of {plan.entry.steps} "
            f"planned steps; Opacus counted epsilon {opacus_epsilon}, the ledger {epsilon}"
        )
    return epsilon
