"""What a privacy audit may switch on inside a hospital's training, from its own process only.

The one-run audit (``client/audit/one_run.py``) measures the implementation, not the
arithmetic, so it needs three switches inside the production code path:

- **Gradient canaries.** At one hospital, a set of canaries that behave like more of its
  training records: at every DP step each is sampled with the records' own Poisson rate
  and, when sampled, adds a gradient of norm exactly the clip norm C along its own
  coordinate (a Dirac canary) to the clipped sum, *before* the production noise function
  adds the noise. Each is then protected exactly as one record is (same rate, same clip,
  same noise), so the accountant's epsilon covers each canary as it covers each record.
- **Broken DP.** A factor on the noise multiplier the production noise function reads, at
  every hospital: the audit's way of showing that it catches a bug.
- **Broken clipping.** A factor on the norm that book-keeping clipping (the default
  grad-sample mode, ``client/dp/bookkeeping.py``) clips each example's gradient to, at
  every hospital, while the noise keeps the accounted scale (noise multiplier times the
  policy's clip norm): a clipping bug the accountant cannot see.

All are module state set by context managers, in the process that trains. No config
key, environment variable or message field reaches them, and only the audit's own
module, ``client/audit/one_run.py``, sets them, for the federation it trains in its own
process (tests check all three). Only ``fedfusion audit`` reaches that module: nothing a
hospital's SuperNode or ClientApp runs imports it (``tests/test_imports.py``), and a
ClientApp runs only the hospital's installed code, never a module of the server's app
bundle (``client/node/flwr_compat.py``), so a real federation never has them set.
Nothing here changes the training when no audit is running.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "CanaryCoordinate",
    "attach_to_dp_optimizer",
    "attach_to_optimizer",
    "attached_hospitals",
    "gradient_canaries",
    "scaled_clipping",
    "scaled_noise",
]

# (index among the model's trainable parameters, in model.parameters() order; flat index)
CanaryCoordinate = tuple[int, int]


@dataclass
class _Canaries:
    hospital: str
    coordinates: Sequence[CanaryCoordinate]  # only the included canaries
    rng: np.random.Generator  # the audit's own: which canaries each step samples
    sampled: int = 0  # canary gradients added so far (for the audit's report)


@dataclass
class _AuditState:
    canaries: _Canaries | None = None
    noise_scale: float = 1.0
    clip_scale: float = 1.0
    attached: list[str] = field(default_factory=list)  # hospitals whose optimizer was hooked


_STATE = _AuditState()


@contextmanager
def gradient_canaries(
    hospital: str, coordinates: Sequence[CanaryCoordinate], seed: int
) -> Iterator[_Canaries]:
    """While open, ``hospital``'s training adds the included canaries' gradients.

    ``coordinates``: one per *included* canary (which are included is the audit's secret,
    drawn with probability 1/2 each); distinct coordinates, so canaries never overlap.
    """
    if _STATE.canaries is not None:
        raise RuntimeError("gradient canaries are already set for this process")
    if len(set(coordinates)) != len(coordinates):
        raise ValueError("each canary needs its own coordinate")
    _STATE.canaries = _Canaries(hospital, list(coordinates), np.random.default_rng(seed))
    try:
        yield _STATE.canaries
    finally:
        _STATE.canaries = None


@contextmanager
def scaled_noise(factor: float) -> Iterator[None]:
    """While open, every hospital's DP noise is ``factor`` times what it should be (broken DP)."""
    if factor < 0:
        raise ValueError(f"a noise scale must be >= 0, got {factor}")
    with _scaled("noise_scale", factor):
        yield


@contextmanager
def scaled_clipping(factor: float) -> Iterator[None]:
    """While open, every hospital clips each example to ``factor`` times its clip norm.

    The noise keeps its accounted scale. Only book-keeping clipping (the default mode)
    has this switch; attaching to another mode while it is open raises.
    """
    if factor <= 0:
        raise ValueError(f"a clipping scale must be > 0, got {factor}")
    with _scaled("clip_scale", factor):
        yield


@contextmanager
def _scaled(field_name: str, factor: float) -> Iterator[None]:
    """Set one of the audit state's factors while open, then restore it.

    One at a time: two such switches open together could close out of order and leave
    the factor set after both are closed.
    """
    if getattr(_STATE, field_name) != 1.0:
        raise RuntimeError(f"the audit's {field_name.replace('_', ' ')} is already set")
    setattr(_STATE, field_name, factor)
    try:
        yield
    finally:
        setattr(_STATE, field_name, 1.0)


def _canary_steps(hospital: str, sample_rate: float) -> tuple[_Canaries, np.ndarray] | None:
    """The canaries sampled for one step at ``hospital``, each drawn at ``sample_rate``."""
    canaries = _STATE.canaries
    if canaries is None or canaries.hospital != hospital or not canaries.coordinates:
        return None
    sampled = canaries.rng.random(len(canaries.coordinates)) < sample_rate
    canaries.sampled += int(sampled.sum())
    return canaries, np.flatnonzero(sampled)


def _add_canaries(
    tensors: Sequence[torch.Tensor], hospital: str, sample_rate: float, value: float
) -> None:
    """Add ``value`` at each sampled canary's coordinate of ``tensors`` (in place)."""
    step = _canary_steps(hospital, sample_rate)
    if step is None:
        return
    canaries, which = step
    for i in which:
        param, flat = canaries.coordinates[int(i)]
        tensors[param].view(-1)[flat] += value


def attach_to_dp_optimizer(
    optimizer: Any, hospital: str, sample_rate: float, loss_fn: Any = None
) -> None:
    """Hook an Opacus DP optimizer's noise step, if (and only if) an audit is running.

    The canaries' gradients (norm C = the optimizer's clip norm) join the clipped sum
    before the production noise function runs; the noise multiplier that function reads
    is scaled while it runs. Under broken clipping, ``loss_fn`` (book-keeping's loss,
    which clips) clips to the scaled norm; the optimizer's C, which scales the noise,
    stays.
    """
    if _STATE.canaries is None and _STATE.noise_scale == 1.0 and _STATE.clip_scale == 1.0:
        return
    if _STATE.clip_scale != 1.0:
        bookkeeping = getattr(loss_fn, "bookkeeping", None)
        if bookkeeping is None:
            raise RuntimeError("broken clipping is a switch of book-keeping clipping only")
        bookkeeping.max_grad_norm *= _STATE.clip_scale  # a new BookKeeping every round
    production_add_noise = optimizer.add_noise
    _STATE.attached.append(hospital)

    def add_noise(self: Any) -> None:
        sums = [p.summed_grad for p in self.params]
        _add_canaries(sums, hospital, sample_rate, float(self.max_grad_norm))
        names = [n for n in ("noise_multiplier", "_adjusted_noise_multiplier") if hasattr(self, n)]
        saved = {n: getattr(self, n) for n in names}
        for n in names:
            setattr(self, n, saved[n] * _STATE.noise_scale)
        try:
            production_add_noise()
        finally:
            for n in names:
                setattr(self, n, saved[n])

    optimizer.add_noise = types.MethodType(add_noise, optimizer)


def attach_to_optimizer(
    optimizer: torch.optim.Optimizer,
    hospital: str,
    sample_rate: float,
    clip_norm: float,
    batch_size: int,
) -> None:
    """Non-private training: the canaries' gradients (norm C) join each mean-loss step.

    A canary counts as one more record of the batch: C / ``batch_size`` at its coordinate.
    """
    if _STATE.canaries is None or _STATE.canaries.hospital != hospital:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    _STATE.attached.append(hospital)

    def add(_optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _add_canaries([p.grad for p in params], hospital, sample_rate, clip_norm / batch_size)

    optimizer.register_step_pre_hook(add)


def attached_hospitals() -> list[str]:
    """The hospitals whose optimizers an audit hooked in this process, in order (tests)."""
    return list(_STATE.attached)
