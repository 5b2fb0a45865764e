"""One hospital's local round and local evaluation, with no Flower in sight.

The Flower handlers in ``client_app.py`` only translate messages to and from these calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from client.privacy import LedgerEntry, LedgerError, compute_epsilon, make_private, plan_round
from client.site import Site
from shared_model.config import RunConfig
from shared_model.engine import (
    EvalResult,
    evaluate,
    make_loss,
    make_optimizer,
    pos_weight_from_config,
    reuse_freed_memory,
    train_one_epoch,
)
from shared_model.model import FusionModel, hospital_model, shared_state

__all__ = ["LocalRound", "run_local_evaluation", "run_local_round"]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalRound:
    """The outcome of one local round. ``weights`` are the incoming ones if declined."""

    trained: bool
    reason: str
    weights: StateDict
    num_examples: int
    train_loss: float
    steps: int
    epsilon: float  # cumulative, after this round; inf when DP is off
    noise_multiplier: float
    sample_rate: float
    ledger_history: tuple[LedgerEntry, ...] = ()  # the whole ledger history after the round


def _model_from(weights: StateDict, site: Site, run: RunConfig) -> FusionModel:
    """The hospital's own frozen parts with the server's trainable ``weights``."""
    return hospital_model(site.model, run.seed, weights).to(site.device)


def _on_cpu(state: StateDict) -> StateDict:
    """A state_dict as it travels: CPU tensors, detached."""
    return {k: v.detach().cpu() for k, v in state.items()}


def _train_epochs(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    run: RunConfig,
    proximal_mu: float,
    global_params: list[torch.Tensor],
    on_empty_batch: Callable[[], None] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[float, int]:
    """Run the round's local epochs; returns (mean per-example loss, optimizer steps)."""
    total_loss, examples, steps = 0.0, 0, 0
    for _ in range(run.train.local_epochs):
        stats = train_one_epoch(
            model,
            loader,
            optimizer,
            loss_fn,
            modality_dropout=run.train.modality_dropout,
            proximal_mu=proximal_mu,
            global_params=global_params,
            on_empty_batch=on_empty_batch,
            device=device,
            max_physical_batch=run.train.max_physical_batch_size,
        )
        total_loss += stats.loss * stats.examples
        examples += stats.examples
        steps += stats.steps
    return total_loss / max(examples, 1), steps


def run_local_round(
    weights: StateDict,
    site: Site,
    run: RunConfig,
    *,
    server_round: int,
    planned_rounds: int,
    proximal_mu: float = 0.0,
    noise_generator: torch.Generator | None = None,
    ledger_seen: Sequence[LedgerEntry] = (),
) -> LocalRound:
    """Train the global model on this hospital's data for one round, under its policy.

    ``ledger_seen`` is the ledger history this hospital process recorded before; the
    ledger on disk must still hold it.
    """
    reuse_freed_memory()
    train_set = site.data.train
    model = _model_from(weights, site, run)
    model.return_alignment = run.train.alignment_weight > 0
    global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss_fn = make_loss(
        pos_weight_from_config(run.train, run.model.labels), run.train.alignment_weight
    ).to(site.device)
    optimizer = make_optimizer(model, run)
    if not site.policy.enabled:
        generator = torch.Generator().manual_seed(run.seed * 1000 + server_round)
        loader = DataLoader(
            train_set, batch_size=run.train.batch_size, shuffle=True, generator=generator
        )
        loss, steps = _train_epochs(
            model, loader, optimizer, loss_fn, run, proximal_mu, global_params, device=site.device
        )
        return LocalRound(
            True,
            "trained without DP (privacy.enabled = false)",
            _on_cpu(shared_state(model)),
            len(train_set),
            loss,
            steps,
            math.inf,
            0.0,
            0.0,
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
    )
    if not plan.train:
        return LocalRound(
            False,
            plan.reason,
            weights,
            0,
            math.nan,
            0,
            plan.epsilon_before,
            plan.entry.noise_multiplier,
            plan.entry.sample_rate,
            tuple(ledger.history),
        )
    ledger.begin_round(plan.entry)  # written before any step touches the data
    private = make_private(
        model,
        optimizer,
        loss_fn,
        train_set,
        run.train.batch_size,
        site.policy,
        plan.entry.noise_multiplier,
        noise_generator=noise_generator,
    )
    private.engine.accountant.history = ledger.accountant_history()[:-1]
    loss, steps = _train_epochs(
        private.model,
        private.loader,
        private.optimizer,
        private.loss_fn,
        run,
        proximal_mu,
        global_params,
        on_empty_batch=private.empty_batch_step,
        device=site.device,
    )
    ledger.complete_round(server_round, steps)
    epsilon = ledger.epsilon()
    # Opacus's own accountant saw every step; it must agree with the ledger.
    opacus_epsilon = compute_epsilon(
        private.engine.accountant.history, site.policy.delta, site.policy.accountant
    )
    if not math.isclose(opacus_epsilon, epsilon, rel_tol=1e-6):
        raise LedgerError(
            f"{site.name}: Opacus counted epsilon {opacus_epsilon} but the ledger {epsilon}"
        )
    return LocalRound(
        True,
        "trained",
        _on_cpu(shared_state(private.raw_model)),
        len(train_set),
        loss,
        steps,
        epsilon,
        plan.entry.noise_multiplier,
        plan.entry.sample_rate,
        tuple(ledger.history),
    )


def run_local_evaluation(weights: StateDict, site: Site, run: RunConfig) -> EvalResult:
    """Metrics of the global model on this hospital's held-out split."""
    reuse_freed_memory()
    model = _model_from(weights, site, run)
    loss_fn = make_loss(pos_weight_from_config(run.train, run.model.labels)).to(site.device)
    loader = DataLoader(site.data.test, batch_size=256)
    return evaluate(model, loader, loss_fn, run.model.labels, device=site.device)
