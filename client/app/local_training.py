"""What trains in a hospital's local round: the model, its data, the epochs, plain or DP-SGD.

No ledger here: the private round (``private_round.py``) decides whether and with what
noise a round trains and records it; the stages below run when it says so. The
trainer (``trainer.py``) puts them together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from client.app.private_round import History, Trained
from client.app.site import Site
from client.dp import audit_hooks
from client.dp.engine import PrivateTraining, make_private
from client.dp.ledger import PATIENT
from client.dp.patients import PatientSampled
from client.dp.planning import RoundPlan
from client.dp.release import LossRelease
from shared_model.config import RunConfig
from shared_model.engine import (
    MultiLabelBCE,
    make_loss,
    make_optimizer,
    pos_weight_from_config,
    reuse_freed_memory,
    round_learning_rate,
    train_one_epoch,
)
from shared_model.model import FusionModel
from shared_model.weights import hospital_model, shared_state

__all__ = [
    "LocalTraining",
    "model_from",
    "prepare_training",
    "train_privately",
    "train_without_dp",
    "training_units",
]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class LocalTraining:
    """A round's model, loss, optimizer and data, before any step and any ledger read."""

    train_set: Dataset[Any]  # what DP-SGD samples (training_units)
    model: FusionModel
    loss_fn: MultiLabelBCE
    optimizer: torch.optim.Optimizer
    global_params: list[torch.Tensor]  # the trainable weights as received (FedProx's anchor)
    proximal_mu: float


def model_from(weights: StateDict, site: Site, run: RunConfig) -> FusionModel:
    """The hospital's own frozen parts with the server's trainable ``weights``."""
    return hospital_model(site.model, run.seed, weights).to(site.device)


def training_units(site: Site) -> Dataset[Any]:
    """What DP-SGD samples: the hospital's patients (one record each), or its records.

    Per patient (client/dp/patients.py), each sampled patient brings one of its records,
    drawn anew at every step: one patient then moves a step as one record does.
    """
    train = site.data.train
    if site.unit != PATIENT or train.patient_ids is None:
        return train
    return PatientSampled(train, train.patient_ids, np.random.default_rng())


def prepare_training(
    weights: StateDict,
    site: Site,
    run: RunConfig,
    proximal_mu: float,
    *,
    server_round: int,
    planned_rounds: int,
) -> LocalTraining:
    """The model with the received weights, its loss and optimizer, the units to sample.

    The optimizer runs at the round's learning rate (``train.lr-schedule``).
    """
    reuse_freed_memory()
    train_set = training_units(site)
    model = model_from(weights, site, run)
    model.return_alignment = run.train.alignment_weight > 0
    global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss_fn = make_loss(
        pos_weight_from_config(run.train, run.model.labels), run.train.alignment_weight
    ).to(site.device)
    return LocalTraining(
        train_set=train_set,
        model=model,
        loss_fn=loss_fn,
        optimizer=make_optimizer(
            model, run, round_learning_rate(run.train, server_round, planned_rounds)
        ),
        global_params=global_params,
        proximal_mu=proximal_mu,
    )


def train_without_dp(
    local: LocalTraining, site: Site, run: RunConfig, server_round: int
) -> Trained:
    """Plain local epochs over shuffled batches; the exact mean loss."""
    generator = torch.Generator().manual_seed(run.seed * 1000 + server_round)
    loader = DataLoader(
        local.train_set, batch_size=run.train.batch_size, shuffle=True, generator=generator
    )
    audit_hooks.attach_to_optimizer(  # a no-op unless a privacy audit runs in this process
        local.optimizer,
        site.name,
        min(1.0, run.train.batch_size / len(local.train_set)),  # type: ignore[arg-type]
        site.policy.max_grad_norm,
        run.train.batch_size,
    )
    loss, steps = _epochs(local, site, run, local.model, loader, local.optimizer, local.loss_fn)
    return Trained(weights=_on_cpu(shared_state(local.model)), train_loss=loss, steps=steps)


def train_privately(
    local: LocalTraining,
    site: Site,
    run: RunConfig,
    noise_generator: torch.Generator | None,
    loss_noise: Callable[[float], float],
    plan: RoundPlan,
    prior: History,
) -> Trained:
    """A private round's training stage: DP-SGD as ``plan`` says, the loss released with it.

    ``prior``: the ledger's history before this round, where Opacus's accountant starts.
    ``loss_noise(std)`` draws the noise of the released loss.
    """
    private = _privatize(local, site, run, plan, prior, noise_generator)
    release = LossRelease(
        local.loss_fn.per_example,
        plan.gradient_noise_multiplier,
        plan.expected_batch_size,
        loss_noise,
    )
    _, steps = _epochs(
        local,
        site,
        run,
        private.model,
        private.loader,
        private.optimizer,
        private.loss_fn,
        on_empty_batch=private.empty_batch_step,
        release=release,
    )
    return Trained(
        weights=_on_cpu(shared_state(private.raw_model)),
        train_loss=release.value(),
        steps=steps,
        opacus_history=private.engine.accountant.history,
    )


def _privatize(
    local: LocalTraining,
    site: Site,
    run: RunConfig,
    plan: RoundPlan,
    prior: History,
    noise_generator: torch.Generator | None,
) -> PrivateTraining:
    """Opacus wired for the planned round, its accountant starting from ``prior``.

    After the round, Opacus's accountant then holds what the ledger holds, and the
    private round checks one against the other.
    """
    private = make_private(
        local.model,
        local.optimizer,
        local.loss_fn,
        local.train_set,
        run.train.batch_size,
        site.policy,
        plan.gradient_noise_multiplier,
        noise_generator=noise_generator,
        sample_rate=plan.entry.sample_rate,
        steps_per_epoch=plan.entry.steps // run.train.local_epochs,
        expected_batch_size=plan.expected_batch_size,
        accounted_noise_multiplier=plan.entry.noise_multiplier,
    )
    private.engine.accountant.history = prior
    # a no-op unless a privacy audit runs in this process (client/dp/audit_hooks.py)
    audit_hooks.attach_to_dp_optimizer(
        private.optimizer, site.name, plan.entry.sample_rate, private.loss_fn
    )
    return private


def _epochs(
    local: LocalTraining,
    site: Site,
    run: RunConfig,
    model: torch.nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    loss: torch.nn.Module,
    *,
    on_empty_batch: Callable[[], None] | None = None,
    release: LossRelease | None = None,
) -> tuple[float, int]:
    """``train.local-epochs`` passes over ``loader``: the mean loss and the steps taken."""
    total, examples, steps = 0.0, 0, 0
    for _ in range(run.train.local_epochs):
        stats = train_one_epoch(
            model,
            loader,
            optimizer,
            loss,
            modality_dropout=run.train.modality_dropout,
            proximal_mu=local.proximal_mu,
            global_params=local.global_params,
            on_empty_batch=on_empty_batch,
            device=site.device,
            max_physical_batch=run.train.max_physical_batch_size,
            loss_release=release,
        )
        total += stats.loss * stats.examples
        examples += stats.examples
        steps += stats.steps
    return total / max(examples, 1), steps


def _on_cpu(state: StateDict) -> StateDict:
    """A state_dict as it travels: CPU tensors, detached."""
    return {k: v.detach().cpu() for k, v in state.items()}
