"""Training and evaluation loops, with no Flower and no Opacus in sight.

The loop is the same with and without DP: the DP optimizer Opacus returns is a drop-in
``torch.optim.Optimizer``, and its Poisson data loader yields the same batches.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

from shared_model.config import RunConfig, TrainConfig
from shared_model.datasets.iu_reports import PUBLIC_PREVALENCE
from shared_model.metrics import classification_metrics
from shared_model.model import TrainingOutputs

__all__ = [
    "EvalResult",
    "LossTally",
    "MultiLabelBCE",
    "Predictions",
    "TrainStats",
    "evaluate",
    "make_loss",
    "make_optimizer",
    "pos_weight_from_config",
    "predict",
    "reuse_freed_memory",
    "round_learning_rate",
    "train_one_epoch",
    "train_step",
]

_MAX_POS_WEIGHT = 10.0
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def reuse_freed_memory() -> bool:
    """Let this process reuse freed tensor memory instead of faulting fresh pages in.

    Torch allocates CPU tensors with ``malloc``. By default glibc gives every block over
    its (adaptive) mmap threshold back to the kernel when it is freed, and trims the
    heap's top, so a training step that allocates the same large temporaries every
    time pays a page fault per 4 KiB for each of them, every step. That cost is
    erratic: a 9 MB per-example gradient measured 0.9 ms or 7 ms depending on whether
    malloc had kept the previous step's block. Blocks up to 32 MiB (glibc's maximum)
    now come from the heap, and up to 1 GiB of free heap is kept: the process's
    resident memory stays at its peak instead of shrinking between steps.

    Applies to glibc on Linux only (elsewhere this is a no-op); returns whether it did.
    Called once per process, before training or evaluation.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


class LossTally(Protocol):
    """Something that sees each training step's outputs and the end of every step."""

    def add(self, outputs: Any, targets: torch.Tensor) -> None:
        """The model outputs and targets of a (chunk of a) batch."""

    def end_step(self) -> None:
        """The step is done (called for empty batches too)."""


@dataclass(frozen=True)
class TrainStats:
    """What one pass of local training did."""

    loss: float  # mean per-example loss over the pass
    examples: int  # examples seen (Poisson batches vary in size)
    steps: int  # optimizer steps taken


@dataclass(frozen=True)
class EvalResult:
    """Loss and metrics of a model on one split."""

    loss: float
    examples: int
    metrics: dict[str, float]  # macro metrics and per-label "auroc.<label>"


def pos_weight_from_config(cfg: TrainConfig, labels: Sequence[str]) -> torch.Tensor | None:
    """Per-label positive weights for the BCE loss, from public information only.

    Weights computed from a hospital's own label counts would be a function of its data
    that the DP accountant does not see, so ``public-prior`` uses the public prevalence
    p of the Indiana University corpus: sqrt((1 - p) / p), clipped to [1, 10]. The square
    root (a softened inverse frequency) keeps rare findings weighted up without the
    loss variance that full (1 - p) / p weights of up to 23x add to already noisy DP
    steps; measured on the embedded data, the held-out loss then falls round on round.
    """
    spec = cfg.pos_weight.strip().lower()
    if spec == "none":
        return None
    if spec == "public-prior":
        unknown = [lab for lab in labels if lab not in PUBLIC_PREVALENCE]
        if unknown:
            raise ValueError(
                f"train.pos-weight 'public-prior' knows only the labels "
                f"{', '.join(PUBLIC_PREVALENCE)}; give weights for {unknown} explicitly"
            )
        weights = [
            math.sqrt((1 - PUBLIC_PREVALENCE[lab]) / PUBLIC_PREVALENCE[lab]) for lab in labels
        ]
    else:
        try:
            weights = [float(part) for part in spec.split(",")]
        except ValueError as err:
            raise ValueError(f"train.pos-weight: cannot read {cfg.pos_weight!r} ({err})") from err
        if len(weights) == 1:
            weights = weights * len(labels)
        if len(weights) != len(labels) or any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(
                f"train.pos-weight: need 1 or {len(labels)} positive numbers, "
                f"got {cfg.pos_weight!r}"
            )
    return torch.tensor(weights, dtype=torch.float32).clamp(1.0, _MAX_POS_WEIGHT)


def round_learning_rate(cfg: TrainConfig, server_round: int, planned_rounds: int) -> float:
    """The local learning rate of round ``server_round`` (1-based) of ``planned_rounds``.

    ``cosine``: rounds 1..W (W = warmup-rounds) train at r/(W+1) of the peak, then every
    round at 0.5 (1 + cos(pi (r-1)/R)) of it; a round past the plan keeps the last
    round's rate. ``constant``: the peak every round.
    """
    peak = cfg.learning_rate
    if cfg.lr_schedule == "constant":
        return peak
    planned = max(planned_rounds, 1)
    r = min(max(server_round, 1), planned)
    factor = 0.5 * (1.0 + math.cos(math.pi * (r - 1) / planned))
    if r <= cfg.warmup_rounds:
        factor *= r / (cfg.warmup_rounds + 1)
    return peak * factor


def make_optimizer(
    model: nn.Module, run: RunConfig, learning_rate: float | None = None
) -> torch.optim.Optimizer:
    """The configured local optimizer over the model's trainable parameters.

    ``learning_rate``: this round's rate (:func:`round_learning_rate`); default the peak.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = run.train
    lr = cfg.learning_rate if learning_rate is None else learning_rate
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class MultiLabelBCE(nn.Module):
    """Imbalance-aware multi-label BCE with one loss per example.

    Each example's loss is its BCE (with ``pos_weight`` on positives) averaged over the
    labels, so ``reduction="none"`` gives shape (B,): what per-example clipping, and
    Opacus's ghost clipping in particular, needs. ``mean`` equals the mean over all
    (example, label) terms. A training model's extra per-example terms (alignment, each
    late-fusion head's own BCE) add to its example's loss.
    """

    def __init__(
        self,
        pos_weight: torch.Tensor | None = None,
        reduction: str = "mean",
        alignment_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = reduction
        self.alignment_weight = alignment_weight

    def per_example(
        self, outputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor
    ) -> torch.Tensor:
        """Each example's loss, shape (B,), whatever this module's reduction.

        ``outputs``: logits (B, K), or a model's :class:`TrainingOutputs`. Their
        alignment term, weighted, and each present branch head's own BCE (late fusion)
        add to the example's loss.
        """
        out = (
            TrainingOutputs(outputs)
            if isinstance(outputs, torch.Tensor)
            else TrainingOutputs(*outputs)
        )
        per_example = self._bce(out.logits, targets)
        if out.alignment is not None:
            per_example = per_example + self.alignment_weight * out.alignment
        if out.branch_logits is not None and out.present is not None:
            for branch in range(out.branch_logits.shape[1]):
                own = self._bce(out.branch_logits[:, branch], targets)
                per_example = per_example + out.present[:, branch] * own
        return per_example

    def _bce(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B,): each example's BCE averaged over the labels."""
        return F.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=self.pos_weight, reduction="none"
        ).mean(dim=1)

    def forward(
        self, outputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor
    ) -> torch.Tensor:
        """Loss of logits (B, K) against multi-hot ``targets`` (B, K).

        ``outputs`` may be a training model's :class:`TrainingOutputs`: see
        :meth:`per_example`.
        """
        per_example = self.per_example(outputs, targets)
        if self.reduction == "none":
            return per_example
        if self.reduction == "sum":
            return per_example.sum()
        # An empty Poisson batch has loss 0 (a mean over no examples would be NaN).
        return per_example.sum() / max(per_example.shape[0], 1)


def make_loss(pos_weight: torch.Tensor | None, alignment_weight: float = 0.0) -> MultiLabelBCE:
    """The training loss: per-example, imbalance-aware multi-label BCE (+ alignment)."""
    return MultiLabelBCE(pos_weight, alignment_weight=alignment_weight)


def _drop_modalities(
    present: torch.Tensor, p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Hide one present modality per example with probability ``p``; never hide both."""
    if p <= 0:
        return present
    b = present.shape[0]
    drop = torch.rand(b, generator=generator) < p
    which = torch.randint(0, 2, (b,), generator=generator)
    both = present.sum(1) >= 2  # only drop when the other modality remains
    mask = torch.ones_like(present)
    rows = torch.nonzero(drop & both).flatten()
    mask[rows, which[rows]] = 0.0
    return present * mask


def _to_device(device: torch.device | str, *tensors: Any) -> tuple[Any, ...]:
    """The batch's tensors on ``device`` (no copy when they are there already; None stays)."""
    return tuple(t if t is None else t.to(device, non_blocking=True) for t in tensors)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, ...]],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    *,
    modality_dropout: float = 0.0,
    proximal_mu: float = 0.0,
    global_params: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    on_empty_batch: Callable[[], None] | None = None,
    device: torch.device | str = "cpu",
    max_physical_batch: int = 0,
    loss_release: LossTally | None = None,
) -> TrainStats:
    """One pass over ``loader``: one optimizer step per batch.

    With ``max_physical_batch`` > 0 a larger batch is run in chunks of at most that many
    examples and their gradients are added up before the one step, which bounds memory
    (per-example gradients scale with the chunk, not the batch). A DP optimizer is told
    to take its noised step only after the last chunk (Opacus's ``signal_skip_step``,
    the BatchMemoryManager protocol), so the privacy accounting is unchanged.

    FedProx: with ``proximal_mu > 0`` each step is followed by a pull towards the
    global weights, w <- w - lr * mu * (w - w_global). Under DP-SGD this must not be a
    loss term: per-example clipping only sees per-example gradients, so the proximal
    gradient would be silently dropped. As a step on public quantities after the noised
    update, it costs no privacy.

    An empty batch (Poisson sampling yields them) calls ``on_empty_batch``, which for DP
    training takes the noise-only step the accountant counts. Batches come from the
    loader on the CPU and move to ``device`` (where the model is) after modality dropout.

    ``loss_release`` sees every step's model outputs and its end (empty steps too): DP
    training releases the training loss through it (``client/dp/release.py``).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total_loss, examples, steps = 0.0, 0, 0
    for image, report_ids, present, labels in loader:
        if labels.shape[0] == 0 and on_empty_batch is not None:
            on_empty_batch()
            if loss_release is not None:
                loss_release.end_step()
            steps += 1
            continue
        present = _drop_modalities(present, modality_dropout, generator)
        batch = _to_device(device, image, report_ids, present, labels)
        total_loss += train_step(model, optimizer, loss_fn, batch, max_physical_batch, loss_release)
        if proximal_mu > 0 and global_params is not None:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    lr = group["lr"]
                    for p, g in zip(params, global_params, strict=True):
                        p.sub_(lr * proximal_mu * (p - g))
        examples += labels.shape[0]
        steps += 1
    return TrainStats(loss=total_loss / max(examples, 1), examples=examples, steps=steps)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batch: tuple[torch.Tensor, ...],
    max_physical_batch: int,
    loss_release: LossTally | None = None,
) -> float:
    """One optimizer step on ``batch``, in chunks if it is larger than allowed.

    Returns the batch's summed per-example loss (exact: for the non-private path).
    """
    size = batch[-1].shape[0]  # the labels
    chunk = max_physical_batch if 0 < max_physical_batch < size else size
    starts = range(0, size, chunk)
    dp = hasattr(optimizer, "signal_skip_step")  # an Opacus DP optimizer
    total = 0.0
    optimizer.zero_grad(set_to_none=True)
    for k, start in enumerate(starts):
        image, report_ids, present, labels = (
            t if t is None else t[start : start + chunk] for t in batch
        )
        outputs = model(image, report_ids, present)
        loss = loss_fn(outputs, labels)
        if loss_release is not None:
            loss_release.add(_detached(outputs), labels)
        total += float(loss.detach()) * labels.shape[0]
        last = k == len(starts) - 1
        if dp:  # clipping and summing per chunk; noise and the step after the last one
            loss.backward()
            optimizer.signal_skip_step(do_skip=not last)
            optimizer.step()
            if not last:
                optimizer.zero_grad(set_to_none=True)
        else:  # the mean over the batch, accumulated chunk by chunk
            (loss * (labels.shape[0] / size)).backward()
            if last:
                optimizer.step()
    if loss_release is not None:
        loss_release.end_step()
    return total


def _detached(outputs: Any) -> Any:
    """Model outputs (logits, or TrainingOutputs) cut from the autograd graph."""
    if not isinstance(outputs, tuple):
        return outputs.detach()
    parts = (None if o is None else o.detach() for o in outputs)
    return TrainingOutputs(*parts) if isinstance(outputs, TrainingOutputs) else tuple(parts)


@dataclass(frozen=True)
class Predictions:
    """A model's outputs over a split, on the CPU."""

    logits: np.ndarray  # (n, K)
    targets: np.ndarray  # (n, K) multi-hot
    losses: np.ndarray  # (n,) per-example loss


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, ...]],
    loss_fn: MultiLabelBCE,
    device: torch.device | str = "cpu",
) -> Predictions:
    """Logits, targets and per-example losses of ``model`` (on ``device``) over ``loader``."""
    model.eval()
    losses, logits, targets = [], [], []
    for batch in loader:
        image, report_ids, present, y = _to_device(device, *batch)
        out = model(image, report_ids, present)
        losses.append(loss_fn.per_example(out, y).cpu())
        logits.append(out.cpu())
        targets.append(y.cpu())
    if sum(t.shape[0] for t in targets) == 0:
        raise ValueError("evaluation split is empty")
    return Predictions(
        torch.cat(logits).numpy(), torch.cat(targets).numpy(), torch.cat(losses).numpy()
    )


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, ...]],
    loss_fn: MultiLabelBCE,
    labels: Sequence[str],
    device: torch.device | str = "cpu",
) -> EvalResult:
    """Loss and classification metrics of ``model`` (on ``device``) over ``loader``."""
    out = predict(model, loader, loss_fn, device)
    scores = 1.0 / (1.0 + np.exp(-out.logits.astype(np.float64)))
    return EvalResult(
        loss=float(out.losses.mean()),
        examples=len(out.targets),
        metrics=classification_metrics(out.targets, scores, labels),
    )
