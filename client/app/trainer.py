"""One hospital's local round and local evaluation, with no Flower in sight.

The Flower handlers in ``handlers.py`` only translate messages to and from these calls.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader

from client.app.local_training import (
    model_from,
    prepare_training,
    train_privately,
    train_without_dp,
)
from client.app.private_round import Trained, private_round
from client.app.site import Site
from client.dp.held_out import finite_predictions, release_held_out
from client.dp.ledger import HELD_OUT_PART, PATIENT, LedgerEntry, PrivacyLedger, ledger_lock
from client.dp.patients import patient_weights
from client.dp.secure_noise import secure_normal, secure_torch_generator
from shared_model.config import RunConfig
from shared_model.engine import make_loss, pos_weight_from_config, predict, reuse_freed_memory
from shared_model.evaluation import EvalStats
from shared_model.metrics import classification_metrics

__all__ = [
    "EVALUATED_ONLY",
    "LocalEvaluation",
    "LocalRound",
    "evaluated_only",
    "release_evaluation",
    "run_local_evaluation",
    "run_local_round",
]

log = logging.getLogger("fedfusion.hospital")
StateDict = dict[str, torch.Tensor]
EVALUATION_LOG = "evaluation.jsonl"  # the hospital's own held-out metrics, round by round


@dataclass(frozen=True, kw_only=True)
class LocalRound:
    """The outcome of one local round. ``weights`` are the incoming ones if declined."""

    trained: bool
    reason: str
    weights: StateDict
    num_examples: int  # the released record count N̂ (the exact N only without DP)
    train_loss: float  # released with DP noise (exact only without DP); NaN if declined
    steps: int
    epsilon: float  # cumulative, after this round; inf when DP is off
    noise_multiplier: float  # as the ledger accounts it
    sample_rate: float
    ledger_history: tuple[LedgerEntry, ...] = ()  # the whole ledger history after the round
    declined: bool = False  # the hospital declined to train (its budget or its policy)


@dataclass(frozen=True)
class LocalEvaluation:
    """The global model on this hospital's held-out split."""

    stats: EvalStats  # summable: what may leave the hospital (inside SecAgg+, or if shared)
    metrics: dict[str, float]  # exact, for the hospital's own log; never sent


def _local_round(
    reason: str,
    weights: StateDict,
    ledger: PrivacyLedger,
    epsilon: float,
    *,
    trained: Trained | None = None,
    num_examples: int = 0,
    noise_multiplier: float = 0.0,
    sample_rate: float = 0.0,
    declined: bool = False,
) -> LocalRound:
    """The one place a round's outcome is built.

    ``trained`` None: nothing trained, and the weights are the ones received. The ledger
    history is the ledger's as it stands after the round.
    """
    return LocalRound(
        trained=trained is not None,
        reason=reason,
        weights=weights if trained is None else trained.weights,
        num_examples=num_examples if trained is not None else 0,
        train_loss=math.nan if trained is None else trained.train_loss,
        steps=0 if trained is None else trained.steps,
        epsilon=epsilon,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        ledger_history=tuple(ledger.history),
        declined=declined,
    )


def _declined(
    reason: str, weights: StateDict, site: Site, seen: Sequence[LedgerEntry]
) -> LocalRound:
    """A round this hospital does not train, with its epsilon so far."""
    ledger = site.open_ledger(seen)
    return _local_round(
        reason,
        weights,
        ledger,
        ledger.epsilon(),
        noise_multiplier=ledger.noise_multiplier or 0.0,
        declined=True,
    )


EVALUATED_ONLY = "evaluated the final model (the run's last exchange); no training"
WITHOUT_DP = "trained without DP (privacy.enabled = false; this hospital allows it)"


def evaluated_only(weights: StateDict, site: Site, seen: Sequence[LedgerEntry]) -> LocalRound:
    """The last SecAgg+ exchange: nothing trained, the ledger only read."""
    ledger = site.open_ledger(seen)
    no_dp = not site.policy.enabled and site.policy.allow_non_private
    epsilon = math.inf if no_dp else ledger.epsilon()
    return _local_round(
        EVALUATED_ONLY, weights, ledger, epsilon, noise_multiplier=ledger.noise_multiplier or 0.0
    )


def run_local_round(
    weights: StateDict,
    site: Site,
    run: RunConfig,
    *,
    server_round: int,
    planned_rounds: int,
    secure_aggregation: bool,
    proximal_mu: float = 0.0,
    noise_generator: torch.Generator | None = None,
    ledger_seen: Sequence[LedgerEntry] = (),
) -> LocalRound:
    """Train the global model on this hospital's data for one round, under its policy.

    ``secure_aggregation``: whether the update leaves inside SecAgg+. ``ledger_seen``
    is the ledger history this hospital process recorded before; the ledger on disk
    must still hold it.

    The stages: the hospital's policy may refuse the round; what trains is prepared
    (``local_training.py``), before the ledger is read; the private round
    (``private_round.py``) opens the ledger and plans, writes the round ahead, runs the
    DP-SGD training stage, then completes the round and checks it against Opacus;
    :func:`_local_round` builds the outcome.
    """
    refusal = site.policy.refusal(secure_aggregation=secure_aggregation)
    if refusal:
        return _declined(refusal, weights, site, ledger_seen)
    local = prepare_training(
        weights, site, run, proximal_mu, server_round=server_round, planned_rounds=planned_rounds
    )
    if not site.policy.enabled:  # the hospital's own config allows it (refusal() above)
        trained = train_without_dp(local, site, run, server_round)
        # untouched by this round; read for the held-out epsilon its reply states
        ledger = site.open_ledger(ledger_seen)
        return _local_round(
            WITHOUT_DP,
            weights,
            ledger,
            math.inf,
            trained=trained,
            num_examples=len(local.train_set),
        )
    done = private_round(
        site,
        run,
        server_round=server_round,
        planned_rounds=planned_rounds,
        num_examples=len(local.train_set),
        ledger_seen=ledger_seen,
        count_noise=_normal(site.policy.secure_noise, noise_generator),
        train=partial(
            train_privately,
            local,
            site,
            run,
            noise_generator,
            _normal(site.policy.secure_noise, noise_generator),  # the released loss's noise
        ),
    )
    return _local_round(
        done.plan.reason,
        weights,
        done.ledger,
        done.epsilon,
        trained=done.trained,
        num_examples=done.plan.public_records,
        noise_multiplier=done.plan.entry.noise_multiplier,
        sample_rate=done.plan.entry.sample_rate,
        declined=done.trained is None,
    )


def _normal(secure: bool, generator: torch.Generator | None) -> Callable[[float], float]:
    """One Gaussian draw of a given std, from the OS CSPRNG.

    Without secure noise: torch's generator seeded from the OS (in tests, ``generator``).
    """
    if secure:
        return secure_normal
    rng = generator or secure_torch_generator()
    return lambda std: float(torch.randn((), generator=rng, dtype=torch.float64)) * std


def run_local_evaluation(
    weights: StateDict,
    site: Site,
    run: RunConfig,
    server_round: int | None = None,
    max_records: int | None = None,
) -> LocalEvaluation:
    """The global model on this hospital's held-out split.

    Returns summable statistics to send and exact metrics for the hospital itself
    (logged, and kept in its state directory). A split larger than ``max_records`` (what
    one SecAgg+ upload holds) is kept here whole, and nothing of it is sent: the
    split's size never shows in an error, and no setting makes the hospital send the
    statistics of a chosen few records.
    """
    test = site.data.test
    if len(test) == 0:
        log.warning("%s: no held-out records; nothing to evaluate", site.name)
        return LocalEvaluation(EvalStats.zeros(run.model.labels), {})
    reuse_freed_memory()
    model = model_from(weights, site, run)
    loss_fn = make_loss(pos_weight_from_config(run.train, run.model.labels)).to(site.device)
    loader = DataLoader(test, batch_size=256)
    out = predict(model, loader, loss_fn, device=site.device)
    logits, losses = finite_predictions(out.logits, out.losses)
    weights = None  # per patient, released statistics weigh each patient's records 1/k
    if site.unit == PATIENT and site.policy.held_out_noise and test.patient_ids is not None:
        weights = patient_weights(test.patient_ids)
    stats = EvalStats.from_predictions(run.model.labels, logits, out.targets, losses, weights)
    scores = 1.0 / (1.0 + torch.exp(-torch.from_numpy(logits).double())).numpy()
    metrics = {
        "loss": float(losses.mean()),
        **classification_metrics(out.targets, scores, run.model.labels),
    }
    _keep_own_metrics(site, server_round, len(out.targets), metrics)
    # (noised statistics need no bound: SecAgg+ clipping them is post-processing)
    if max_records is not None and len(test) > max_records and not site.policy.held_out_noise:
        log.warning(
            "%s: the held-out split exceeds secagg.max-weight %d: its evaluation stays here",
            site.name,
            max_records,
        )
        stats = EvalStats.zeros(run.model.labels)
    return LocalEvaluation(stats, metrics)


def release_evaluation(
    stats: EvalStats,
    site: Site,
    seen: Sequence[LedgerEntry],
    *,
    model_round: int,
    planned_rounds: int,
) -> tuple[EvalStats, tuple[LedgerEntry, ...]]:
    """What of ``stats`` may leave: noised and charged, or nothing (client/dp/held_out.py).

    A hospital whose policy keeps held-out noise off (a simulated one, by default)
    releases the exact statistics. Returns the statistics and the ledger's history after.
    """
    if not site.policy.held_out_noise:
        return stats, tuple(seen)
    with ledger_lock(site.state_dir):
        ledger = site.open_ledger(seen)
        out = release_held_out(
            stats, ledger, site.policy, model_round=model_round, planned_rounds=planned_rounds
        )
    if out.released:
        log.info(
            "%s: evaluation of round %d's model released with Gaussian noise (held-out "
            "epsilon now %.3f of %g)",
            site.name,
            model_round,
            ledger.epsilon(part=HELD_OUT_PART),
            site.policy.held_out_cap,
        )
    else:
        log.warning("%s: evaluation of round %d's model %s", site.name, model_round, out.reason)
    return out.stats, tuple(ledger.history)


def _keep_own_metrics(
    site: Site, server_round: int | None, examples: int, metrics: dict[str, float]
) -> None:
    """Log this hospital's own held-out metrics and append them to its state directory."""
    log.info(
        "%s: the global model%s on this hospital's %d held-out records: loss %.4f, macro "
        "AUROC %.4f (kept here; the server learns only sums over hospitals)",
        site.name,
        f" sent in round {server_round}" if server_round is not None else "",
        examples,
        metrics["loss"],
        metrics["auroc"],
    )
    row = {"time": time.time(), "round": server_round, "examples": examples, **metrics}
    site.state_dir.mkdir(parents=True, exist_ok=True)
    with (site.state_dir / EVALUATION_LOG).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({k: _json_number(v) for k, v in row.items()}) + "\n")


def _json_number(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
