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
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from client.app.site import Site
from client.dp.accounting import compute_epsilon
from client.dp.engine import make_private
from client.dp.held_out import finite_predictions
from client.dp.ledger import HELD_OUT_PART, PATIENT, LedgerEntry, LedgerError, PrivacyLedger
from client.dp.patients import PatientSampled, patient_weights
from client.dp.planning import plan_round
from client.dp.release import LossRelease
from shared_model.config import RunConfig
from shared_model.engine import (
    classification_metrics,
    make_loss,
    make_optimizer,
    pos_weight_from_config,
    predict,
    reuse_freed_memory,
    train_one_epoch,
)
from shared_model.evaluation import EvalStats
from shared_model.model import FusionModel
from shared_model.weights import hospital_model, shared_state

__all__ = [
    "EVALUATED_ONLY",
    "LocalEvaluation",
    "LocalRound",
    "evaluated_only",
    "release_evaluation",
    "run_local_evaluation",
    "run_local_round",
    "training_units",
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


def _model_from(weights: StateDict, site: Site, run: RunConfig) -> FusionModel:
    """The hospital's own frozen parts with the server's trainable ``weights``."""
    return hospital_model(site.model, run.seed, weights).to(site.device)


def _on_cpu(state: StateDict) -> StateDict:
    """A state_dict as it travels: CPU tensors, detached."""
    return {k: v.detach().cpu() for k, v in state.items()}


def _untrained(
    reason: str, weights: StateDict, ledger: PrivacyLedger, epsilon: float, declined: bool
) -> LocalRound:
    """A round in which nothing trains: the weights as received, the ledger as it stands."""
    return LocalRound(
        trained=False,
        reason=reason,
        weights=weights,
        num_examples=0,
        train_loss=math.nan,
        steps=0,
        epsilon=epsilon,
        noise_multiplier=ledger.noise_multiplier or 0.0,
        sample_rate=0.0,
        ledger_history=tuple(ledger.history),
        declined=declined,
    )


def _declined(
    reason: str, weights: StateDict, site: Site, seen: Sequence[LedgerEntry]
) -> LocalRound:
    """A round this hospital does not train, with its epsilon so far."""
    ledger = site.open_ledger(seen)
    return _untrained(reason, weights, ledger, ledger.epsilon(), declined=True)


EVALUATED_ONLY = "evaluated the final model (the run's last exchange); no training"


def evaluated_only(weights: StateDict, site: Site, seen: Sequence[LedgerEntry]) -> LocalRound:
    """The last SecAgg+ exchange: nothing trained, the ledger only read."""
    ledger = site.open_ledger(seen)
    no_dp = not site.policy.enabled and site.policy.allow_non_private
    epsilon = math.inf if no_dp else ledger.epsilon()
    return _untrained(EVALUATED_ONLY, weights, ledger, epsilon, declined=False)


def training_units(site: Site) -> Dataset[Any]:
    """What DP-SGD samples: the hospital's patients (one record each), or its records.

    Per patient (client/dp/patients.py), each sampled patient brings one of its records,
    drawn anew at every step: one patient then moves a step as one record does.
    """
    train = site.data.train
    if site.unit != PATIENT or train.patient_ids is None:
        return train
    return PatientSampled(train, train.patient_ids, np.random.default_rng())


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
    """
    refusal = site.policy.refusal(secure_aggregation=secure_aggregation)
    if refusal:
        return _declined(refusal, weights, site, ledger_seen)
    reuse_freed_memory()
    train_set = training_units(site)
    model = _model_from(weights, site, run)
    model.return_alignment = run.train.alignment_weight > 0
    global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss_fn = make_loss(
        pos_weight_from_config(run.train, run.model.labels), run.train.alignment_weight
    ).to(site.device)
    optimizer = make_optimizer(model, run)

    def epochs(
        model: torch.nn.Module,
        loader: DataLoader,
        optimizer: torch.optim.Optimizer,
        loss: torch.nn.Module,
        on_empty_batch: Callable[[], None] | None = None,
        release: LossRelease | None = None,
    ) -> tuple[float, int]:
        total, examples, steps = 0.0, 0, 0
        for _ in range(run.train.local_epochs):
            stats = train_one_epoch(
                model,
                loader,
                optimizer,
                loss,
                modality_dropout=run.train.modality_dropout,
                proximal_mu=proximal_mu,
                global_params=global_params,
                on_empty_batch=on_empty_batch,
                device=site.device,
                max_physical_batch=run.train.max_physical_batch_size,
                loss_release=release,
            )
            total += stats.loss * stats.examples
            examples += stats.examples
            steps += stats.steps
        return total / max(examples, 1), steps

    if not site.policy.enabled:  # the hospital's own config allows it (refusal() above)
        generator = torch.Generator().manual_seed(run.seed * 1000 + server_round)
        loader = DataLoader(
            train_set, batch_size=run.train.batch_size, shuffle=True, generator=generator
        )
        loss, steps = epochs(model, loader, optimizer, loss_fn)
        return LocalRound(
            trained=True,
            reason="trained without DP (privacy.enabled = false; this hospital allows it)",
            weights=_on_cpu(shared_state(model)),
            num_examples=len(train_set),
            train_loss=loss,
            steps=steps,
            epsilon=math.inf,
            noise_multiplier=0.0,
            sample_rate=0.0,
            # untouched by this round; read for the held-out epsilon its reply states
            ledger_history=tuple(site.open_ledger(ledger_seen).history),
        )

    ledger = site.open_ledger(ledger_seen)
    plan = plan_round(
        ledger,
        site.policy,
        server_round=server_round,
        planned_rounds=planned_rounds,
        num_examples=len(train_set),
        batch_size=run.train.batch_size,
        local_epochs=run.train.local_epochs,
        count_noise=_normal(site.policy.secure_noise, noise_generator),
    )
    if not plan.train:
        return LocalRound(
            trained=False,
            reason=plan.reason,
            weights=weights,
            num_examples=0,
            train_loss=math.nan,
            steps=0,
            epsilon=plan.epsilon_before,
            noise_multiplier=plan.entry.noise_multiplier,
            sample_rate=plan.entry.sample_rate,
            ledger_history=tuple(ledger.history),
            declined=True,
        )
    ledger.begin_round(plan.entry)  # written before any step touches the data
    private = make_private(
        model,
        optimizer,
        loss_fn,
        train_set,
        run.train.batch_size,
        site.policy,
        plan.gradient_noise_multiplier,
        noise_generator=noise_generator,
        sample_rate=plan.entry.sample_rate,
        steps_per_epoch=plan.entry.steps // run.train.local_epochs,
        expected_batch_size=plan.expected_batch_size,
        accounted_noise_multiplier=plan.entry.noise_multiplier,
    )
    private.engine.accountant.history = ledger.accountant_history()[:-1]
    release = LossRelease(
        loss_fn.per_example,
        plan.gradient_noise_multiplier,
        plan.expected_batch_size,
        _normal(site.policy.secure_noise, noise_generator),
    )
    _, steps = epochs(
        private.model,
        private.loader,
        private.optimizer,
        private.loss_fn,
        on_empty_batch=private.empty_batch_step,
        release=release,
    )
    ledger.complete_round(server_round, steps)
    epsilon = ledger.epsilon()
    # Opacus's own accountant saw every step; it must agree with the ledger.
    opacus_epsilon = compute_epsilon(
        private.engine.accountant.history, site.policy.delta, site.policy.accountant
    )
    if steps != plan.entry.steps or not math.isclose(opacus_epsilon, epsilon, rel_tol=1e-6):
        raise LedgerError(
            f"{site.name}: round {server_round} took {steps} of {plan.entry.steps} planned "
            f"steps; Opacus counted epsilon {opacus_epsilon}, the ledger {epsilon}"
        )
    return LocalRound(
        trained=True,
        reason="trained",
        weights=_on_cpu(shared_state(private.raw_model)),
        num_examples=plan.public_records,
        train_loss=release.value(),
        steps=steps,
        epsilon=epsilon,
        noise_multiplier=plan.entry.noise_multiplier,
        sample_rate=plan.entry.sample_rate,
        ledger_history=tuple(ledger.history),
    )


def _normal(secure: bool, generator: torch.Generator | None) -> Callable[[float], float]:
    """One Gaussian draw of a given std, from the OS CSPRNG.

    Without secure noise: torch's generator seeded from the OS (in tests, ``generator``).
    """
    from client.dp.secure_noise import secure_normal, secure_torch_generator

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
    model = _model_from(weights, site, run)
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
    from client.dp.held_out import release_held_out
    from client.dp.ledger import ledger_lock

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
