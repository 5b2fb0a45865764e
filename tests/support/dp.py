"""Small models, batches, policies and accountants the DP tests share."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus import GradSampleModule
from opacus.accountants import create_accountant

from client.app.private_round import History, Trained, private_round
from client.app.site import Site
from client.dp.accounting import RDP_ORDERS
from client.dp.planning import RoundPlan
from client.dp.policy import PrivacyPolicy
from shared_model.config import HospitalConfig, ModelConfig, RunConfig
from shared_model.data import FusionTensors
from shared_model.datasets import HospitalSplit

__all__ = [
    "CFG",
    "POLICY",
    "CrashError",
    "batch",
    "dp_accounting_epsilon",
    "independent_rdp_epsilon",
    "ledger_site",
    "one_dp_epoch",
    "one_round",
    "own_grads",
    "per_sample_grads",
    "planned_steps",
    "policy",
]


CFG = dict(max_report_tokens=16, text_vocab_buckets=256, embed_dim=32, image_size=32)


def batch(cfg: ModelConfig, n: int, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, cfg.image_size, cfg.image_size, generator=g) * scale
    ids = torch.randint(4, cfg.text_vocab_buckets, (n, cfg.max_report_tokens), generator=g)
    ids[:, 10:] = 0
    present = torch.ones(n, 2)
    present[0, 0] = 0.0  # one example without its radiograph
    labels = torch.randint(0, 2, (n, len(cfg.labels)), generator=g).float()
    return image, ids, present, labels


def one_dp_epoch(private):
    """One pass of DP training, empty Poisson batches included (as trainer.py runs it)."""
    from shared_model.engine import train_one_epoch

    return train_one_epoch(
        private.model,
        private.loader,
        private.optimizer,
        private.loss_fn,
        on_empty_batch=private.empty_batch_step,
    )


def policy(c: float, mode: str = "hooks", secure: bool = True) -> PrivacyPolicy:
    return PrivacyPolicy(
        enabled=True,
        target_epsilon=8,
        max_epsilon=8,
        delta=1e-5,
        max_grad_norm=c,
        accountant="rdp",
        grad_sample_mode=mode,
        secure_noise=secure,
    )


POLICY = PrivacyPolicy(
    enabled=True,
    target_epsilon=8.0,
    max_epsilon=10.0,
    delta=1e-5,
    max_grad_norm=1.0,
    accountant="rdp",
    grad_sample_mode="hooks",
)


def independent_rdp_epsilon(history, delta):
    """Google's dp-accounting: an implementation independent of Opacus."""
    acc = RdpAccountant(orders=RDP_ORDERS)
    for sigma, q, steps in history:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    return acc.get_epsilon(delta)


class CrashError(RuntimeError):
    """The hospital's process dies while training."""


def ledger_site(state: Path, policy: PrivacyPolicy, hospital: str = "h0") -> Site:
    """A simulated hospital whose ledger is in ``state``, opened as the trainer opens it.

    It holds no records: enough for a private round whose training stage is a test's.
    """
    no_records = torch.zeros(0, 1)
    empty = FusionTensors(no_records, no_records.long(), no_records, no_records)
    return Site(
        hospital=HospitalConfig(hospital_id=hospital, partition_id=0, num_partitions=1),
        policy=policy,
        state_dir=Path(state),
        data=HospitalSplit(train=empty, test=empty),
    )


def planned_steps(plan: RoundPlan, prior: History, *, policy: PrivacyPolicy) -> Trained:
    """A training stage that takes the planned steps and touches no record.

    Opacus's own accountant records each step, from ``prior``, as make_private's step
    hook records a real round's.
    """
    accountant = create_accountant(policy.accountant)
    accountant.history = list(prior)
    for _ in range(plan.entry.steps):
        accountant.step(
            noise_multiplier=plan.entry.noise_multiplier, sample_rate=plan.entry.sample_rate
        )
    return Trained(
        weights={}, train_loss=math.nan, steps=plan.entry.steps, opacus_history=accountant.history
    )


def one_round(
    state, policy, r, *, n=1000, planned=3, local_epochs=2, crash=False, hospital="h0", noise=None
):
    """A hospital round through the trainer's own ledger sequence, from a freshly opened
    (restarted) ledger: client/app/private_round.py, with :func:`planned_steps` training.

    Returns the epsilon after the round, or None if the hospital declined it or crashed.
    A crashed round is begun but never completed (its entry stays "started", counted in
    full).
    """

    def training(plan: RoundPlan, prior: History) -> Trained:
        if crash:
            raise CrashError(f"round {r}: the process dies mid-training")
        return planned_steps(plan, prior, policy=policy)

    run = RunConfig.from_run_config({"train.batch-size": 64, "train.local-epochs": local_epochs})
    try:
        done = private_round(
            ledger_site(state, policy, hospital),
            run,
            server_round=r,
            planned_rounds=planned,
            num_examples=n,
            ledger_seen=(),
            count_noise=noise,
            train=training,
        )
    except CrashError:
        return None
    return done.epsilon if done.trained is not None else None


def dp_accounting_epsilon(history, delta, accountant):
    acc = RdpAccountant(orders=RDP_ORDERS) if accountant == "rdp" else PLDAccountant()
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(event, int(steps))
    return acc.get_epsilon(delta)


def per_sample_grads(model, loss_of_batch, inputs):
    """Opacus's per-sample gradients (hooks) of a summed per-example loss."""
    gsm = GradSampleModule(model, loss_reduction="sum")
    gsm.zero_grad()
    loss_of_batch(gsm, inputs).backward()
    grads = {  # the wrapper holds the model's own parameter objects
        n: p.grad_sample.clone() for n, p in model.named_parameters() if p.grad_sample is not None
    }
    gsm._close()
    return grads


def own_grads(model, loss_of_batch, inputs, i):
    """The gradient of example i computed alone, as if the batch held only it."""
    model.zero_grad()
    loss_of_batch(model, tuple(t[i : i + 1] for t in inputs)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
