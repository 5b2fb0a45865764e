"""Opacus wiring: a model, optimizer, loss and dataset made ready for DP-SGD.

fedfusion builds the Poisson loader itself instead of letting Opacus derive one from a
batch size: Opacus's ``DPDataLoader`` runs ``int(1 / q)`` batches per epoch and its
accountant records ``1 / len(loader)`` as the rate, which for q = 1/k is k - 1 batches at
another rate for thousands of k (float rounding). Here the rate, the steps per epoch
and the expected batch size the noised sum is divided by all come from the round's
plan (public values), and the accountant records exactly the planned release.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from client.dp.bookkeeping import BookKeeping, BookKeepingLoss, bookkeeping_unsupported
from client.dp.policy import PrivacyPolicy
from client.dp.secure_noise import secure_torch_generator, use_secure_noise

__all__ = [
    "PoissonSampler",
    "PrivateTraining",
    "make_private",
    "poisson_loader",
    "resolve_grad_sample_mode",
]

log = logging.getLogger("fedfusion.hospital")


@dataclass(kw_only=True)
class PrivateTraining:
    """What :func:`make_private` returns, the same shape in every grad-sample mode."""

    model: nn.Module  # Opacus's wrapper; exchange raw_model's weights, not this one's
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module  # wrapped for ghost clipping, unchanged otherwise
    loader: DataLoader[Any]  # Poisson sampling at the planned rate, the planned steps
    engine: Any  # opacus.PrivacyEngine
    grad_sample_mode: str = "hooks"  # the one in use ("auto" resolved)

    def empty_batch_step(self) -> None:
        """The DP step of an empty Poisson batch: no gradient, only noise.

        An empty batch is part of Poisson sampling and is counted by the accountant, so
        it must still take its noised step. Only the hooks mode can run a forward pass
        on zero examples; this works for every grad-sample mode.
        """
        # Opacus loads with the first DP step: an evaluate message never takes one
        from opacus.optimizers.optimizer_fast_gradient_clipping import (
            DPOptimizerFastGradientClipping,
        )

        ghost = isinstance(self.optimizer, DPOptimizerFastGradientClipping)
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:  # type: ignore[attr-defined]
            if ghost:  # ghost clipping accumulates already-clipped sums from p.grad
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class PoissonSampler:
    """Exactly ``steps`` batches; each record is in each batch with probability ``sample_rate``.

    Opacus's sampler compares float32 uniforms, whose 2^-24 granularity makes the rate
    that runs slightly higher than the one charged (1.5e-4 relative at q = 3e-4); these
    draws are float64.
    """

    def __init__(
        self, num_samples: int, sample_rate: float, steps: int, generator: torch.Generator | None
    ) -> None:
        self.num_samples, self.sample_rate = num_samples, sample_rate
        self.steps, self.generator = steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Any:
        for _ in range(self.steps):
            draws = torch.rand(self.num_samples, generator=self.generator, dtype=torch.float64)
            yield (draws < self.sample_rate).nonzero(as_tuple=False).reshape(-1).tolist()


def poisson_loader(
    dataset: Dataset[Any], sample_rate: float, steps: int, generator: torch.Generator | None
) -> DataLoader[Any]:
    """Exactly ``steps`` Poisson batches (:class:`PoissonSampler`) of ``dataset``.

    Empty batches come out with the right shapes (Opacus's collate wrapper).
    """
    # Opacus loads with the first DP step: an evaluate message never takes one
    from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty

    first = dataset[0]
    sampler = PoissonSampler(len(dataset), sample_rate, steps, generator)  # type: ignore[arg-type]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first],
    )
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    dataset: Dataset[Any],
    batch_size: int,
    policy: PrivacyPolicy,
    noise_multiplier: float,
    *,
    noise_generator: torch.Generator | None = None,
    sample_rate: float | None = None,
    steps_per_epoch: int | None = None,
    expected_batch_size: float | None = None,
    accounted_noise_multiplier: float | None = None,
) -> PrivateTraining:
    """Wrap model, optimizer, loss and data for DP-SGD with Poisson sampling.

    ``noise_multiplier`` scales the noise on the clipped gradient sum. The round's plan
    gives the rest from public values; each defaults to what the dataset's own size
    implies (for tests and benchmarks): ``sample_rate`` B/N, ``steps_per_epoch``
    ceil(N/B), ``expected_batch_size`` q * N. ``accounted_noise_multiplier`` is what
    the accountant records per step (lower when the release carries more than the
    gradient; default ``noise_multiplier``).
    """
    from opacus import PrivacyEngine  # with the first DP step, as above

    n = len(dataset)  # type: ignore[arg-type]
    rate = min(1.0, batch_size / n) if sample_rate is None else sample_rate
    steps = math.ceil(n / batch_size) if steps_per_epoch is None else steps_per_epoch
    expected = rate * n if expected_batch_size is None else expected_batch_size
    accounted = (
        noise_multiplier if accounted_noise_multiplier is None else accounted_noise_multiplier
    )
    with warnings.catch_warnings():
        # Opacus's secure_mode needs torchcsprng, which has no build for this torch;
        # secure_noise.py draws from the OS CSPRNG instead (below).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=policy.accountant, secure_mode=False)
    device = next(model.parameters()).device  # the noise is drawn where the gradients are
    if policy.secure_noise:
        if noise_generator is not None:
            raise ValueError(
                "a seeded noise generator contradicts privacy.secure-noise = true "
                "(seeded noise is for tests: set privacy.secure-noise = false there)"
            )
        sampler_rng = secure_torch_generator()
    else:
        log.warning(
            "privacy.secure-noise = false: DP noise comes from torch's pseudo-random "
            "generator. Use this for tests and experiments only, never with patient data."
        )
        sampler_rng = None if noise_generator is not None else secure_torch_generator()
        noise_generator = noise_generator or secure_torch_generator(device)
    # Batches are drawn with a generator seeded from the OS; only a test that passes its
    # own noise generator (secure noise off) samples from torch's global one, seeded there.
    loader = poisson_loader(dataset, rate, steps, sampler_rng)
    mode = resolve_grad_sample_mode(policy.grad_sample_mode, model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Poisson sampling.*")
        wrapped = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=loss_fn,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=policy.max_grad_norm,
            poisson_sampling=False,  # the loader above already samples, at the planned rate
            # Book-keeping noises an already clipped sum, as ghost clipping does: Opacus's
            # ghost-clipping optimizer, with Opacus's own per-example hooks removed.
            grad_sample_mode="ghost" if mode == "bk" else mode,
            noise_generator=noise_generator,
        )
    if mode == "bk":
        dp_model, dp_optimizer, _, dp_loader = wrapped
        dp_model.remove_hooks()
        dp_loss = BookKeepingLoss(loss_fn, BookKeeping(model, policy.max_grad_norm))
    elif mode == "ghost":  # ghost clipping also wraps the criterion
        dp_model, dp_optimizer, dp_loss, dp_loader = wrapped
    else:
        (dp_model, dp_optimizer, dp_loader), dp_loss = wrapped, loss_fn
    dp_model.forbid_grad_accumulation()  # one step per sampled batch, as Poisson needs
    # Opacus derived these from len(loader); the plan's public values replace them.
    dp_optimizer.expected_batch_size = expected
    accountant = engine.accountant
    dp_optimizer.attach_step_hook(
        lambda _optimizer: accountant.step(noise_multiplier=accounted, sample_rate=rate)
    )
    if policy.secure_noise:
        use_secure_noise(dp_optimizer)
    return PrivateTraining(
        model=dp_model,
        raw_model=model,
        optimizer=dp_optimizer,
        loss_fn=dp_loss,
        loader=dp_loader,
        engine=engine,
        grad_sample_mode=mode,
    )


def resolve_grad_sample_mode(requested: str, model: nn.Module) -> str:
    """The per-example gradient method for ``model``: ``requested``, or the best for it.

    ``auto`` is the fastest method that handles every trainable layer.

    Measured by the DP suite of ``make bench``: book-keeping is the fastest on the
    default model by far, and on the LoRA model within noise of Opacus's ``ew`` (which
    is not checked per example there). A model with a layer book-keeping cannot clip
    falls back to Opacus's hooks, which handle any layer Opacus supports.
    """
    if requested != "auto":
        return requested
    return "bk" if not bookkeeping_unsupported(model) else "hooks"
