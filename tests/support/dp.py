"""Small models, batches, policies and accountants the DP tests share."""

from __future__ import annotations

import dp_accounting
import torch
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus import GradSampleModule

from client.dp.accounting import RDP_ORDERS
from client.dp.ledger import PrivacyLedger
from client.dp.planning import plan_round
from client.dp.policy import PrivacyPolicy
from shared_model.config import ModelConfig

__all__ = [
    "CFG",
    "POLICY",
    "batch",
    "dp_accounting_epsilon",
    "independent_rdp_epsilon",
    "one_dp_epoch",
    "one_round",
    "own_grads",
    "per_sample_grads",
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


def one_round(
    state, policy, r, *, n=1000, planned=3, local_epochs=2, crash=False, hospital="h0", noise=None
):
    """A hospital round as trainer.py runs it, from a freshly opened (restarted) ledger.

    Returns the epsilon after the round, or None if the hospital declined it. A crashed
    round is begun but never completed (its entry stays "started", counted in full).
    """
    ledger = PrivacyLedger.open(state, hospital, policy)
    plan = plan_round(
        ledger,
        policy,
        server_round=r,
        planned_rounds=planned,
        num_examples=n,
        batch_size=64,
        local_epochs=local_epochs,
        count_noise=noise,
    )
    if not plan.train:
        return None
    ledger.begin_round(plan.entry)
    if not crash:
        ledger.complete_round(r, plan.entry.steps)
    return ledger.epsilon()


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
