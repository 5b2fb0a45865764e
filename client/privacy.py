"""Record-level differential privacy at one hospital: Opacus DP-SGD and its ledger.

This module (with the two ``secagg.py`` files) is the only place that touches Opacus.

- The hospital's policy caps what the server asks: epsilon target = min(server's target,
  hospital's max-epsilon); delta = min(server's, hospital's).
- The noise multiplier is planned once, for the whole budget: the target epsilon over
  all planned rounds x local epochs, with Poisson sampling at rate q = 1/ceil(N/B).
- Every round is written to the privacy ledger *before* its first step touches data,
  so a crash mid-round still counts the round in full (the conservative choice).
  epsilon is always recomputed from the whole ledger history, so it composes over every
  step of every round this hospital has joined, across process restarts.
- A round whose epsilon after training would exceed max-epsilon is declined, with the
  numbers in the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.bookkeeping import BookKeeping, BookKeepingLoss, bookkeeping_unsupported
from client.secure_noise import secure_torch_generator, use_secure_noise
from shared_model.config import HospitalConfig, PrivacyConfig

__all__ = [
    "LEDGER_EXPORT_FORMAT",
    "LEDGER_FORMAT",
    "RDP_ORDERS",
    "LedgerEntry",
    "LedgerError",
    "PrivacyLedger",
    "PrivacyPolicy",
    "PrivateTraining",
    "RoundPlan",
    "compute_epsilon",
    "dump_history",
    "effective_policy",
    "known_rdp",
    "load_history",
    "make_private",
    "plan_noise_multiplier",
    "plan_round",
    "read_ledger",
    "remember_rdp",
    "resolve_grad_sample_mode",
]

log = logging.getLogger("fedfusion.hospital")
LEDGER_FORMAT = "fedfusion-privacy-ledger/1"
LEDGER_FILENAME = "privacy_ledger.json"
# `fedfusion ledger show --json`: the stable, documented form anyone can recompute from.
LEDGER_EXPORT_FORMAT = "fedfusion-ledger-export/1"


class LedgerError(RuntimeError):
    """The privacy ledger cannot be trusted; the hospital refuses to train."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """The privacy settings in force at one hospital, after its own caps."""

    enabled: bool
    target_epsilon: float  # to spend over the planned rounds
    max_epsilon: float  # hard cap, never exceeded
    delta: float
    max_grad_norm: float
    accountant: str
    grad_sample_mode: str
    secure_noise: bool = True  # noise and sampling from the OS CSPRNG (client/secure_noise.py)


def effective_policy(requested: PrivacyConfig, hospital: HospitalConfig) -> PrivacyPolicy:
    """The server's request, capped by the hospital's own policy (the hospital wins)."""
    return PrivacyPolicy(
        enabled=requested.enabled,
        target_epsilon=min(requested.target_epsilon, hospital.max_epsilon),
        max_epsilon=hospital.max_epsilon,
        delta=min(requested.delta, hospital.delta),
        max_grad_norm=requested.max_grad_norm,
        accountant=requested.accountant,
        grad_sample_mode=requested.grad_sample_mode,
        # Secure noise is the hospital's to give up, not the server's: a hospital with
        # its own data keeps it unless its own file also says secure-noise = false.
        secure_noise=requested.secure_noise or (hospital.secure_noise and not hospital.simulated),
    )


# ------------------------------------------------------------------ the privacy math

# RDP orders searched for the tightest conversion to (epsilon, delta). Opacus's default
# stops at 63, which is too low for the small sample rates and few steps of a hospital
# round (Opacus then warns "optimal order is the largest alpha"): extending the grid
# gives a tighter, still valid, bound. Used for planning and reporting alike.
RDP_ORDERS = (
    [1 + x / 10.0 for x in range(1, 100)]
    + list(range(12, 64))
    + [
        64,
        80,
        96,
        128,
        160,
        192,
        256,
        384,
        512,
        768,
        1024,
    ]
)


def _epsilon_kwargs(accountant: str) -> dict[str, Any]:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


# Per-step RDP of each (noise multiplier, sample rate) this process has computed: Opacus
# takes ~0.1-0.2 s per pair (the 99 fractional orders). A deployed hospital starts a
# process for every message, so the handlers carry these between messages in Flower's
# per-node state (``known_rdp`` / ``remember_rdp``), as a long-lived process keeps them.
_RDP: dict[tuple[float, float], tuple[float, ...]] = {}


def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    key = (float(noise_multiplier), float(sample_rate))
    if key not in _RDP:
        from opacus.accountants.analysis.rdp import compute_rdp

        rdp = compute_rdp(q=key[1], noise_multiplier=key[0], steps=1, orders=RDP_ORDERS)
        _RDP[key] = tuple(float(x) for x in rdp)
    return _RDP[key]


def known_rdp(pairs: Iterable[tuple[float, float]]) -> dict[str, list[float]]:
    """The per-step RDP computed so far for these (noise multiplier, sample rate) pairs.

    Keyed exactly (``sigma|q`` in float hex); a pair not computed yet is left out. A
    simulation worker serves many hospitals, so each keeps only its own pairs.
    """
    wanted = {(float(s), float(q)) for s, q in pairs}
    return {f"{s.hex()}|{q.hex()}": list(_RDP[s, q]) for s, q in wanted if (s, q) in _RDP}


def remember_rdp(known: Mapping[str, Any]) -> int:
    """Take back what :func:`known_rdp` gave; returns how many entries were usable.

    An entry is used only if its key parses and it holds one finite, non-negative value
    per order; anything else is left out and computed again when needed.
    """
    used = 0
    for key, values in known.items():
        try:
            sigma, q = (float.fromhex(part) for part in str(key).split("|"))
            rdp = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            continue
        if len(rdp) == len(RDP_ORDERS) and all(math.isfinite(v) and v >= 0 for v in rdp):
            _RDP.setdefault((sigma, q), rdp)
            used += 1
    return used


def compute_epsilon(
    history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon after a history of (noise_multiplier, sample_rate, steps); 0 if empty.

    RDP composes additively and is linear in the number of steps, so the per-step RDP of
    each (noise, rate) pair is computed once and cached: the result is what Opacus's
    RDPAccountant returns for the same history, at a fraction of the cost.
    """
    if not history:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import get_privacy_spent

        total = [0.0] * len(RDP_ORDERS)
        for sigma, q, steps in history:
            per_step = _rdp_per_step(float(sigma), float(q))
            total = [t + int(steps) * r for t, r in zip(total, per_step, strict=True)]
        eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=total, delta=delta)
        return float(eps)
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def plan_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier whose epsilon after ``steps`` steps is <= the target."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
            **_epsilon_kwargs(accountant),
        )
    )


# ------------------------------------------------------------------------ the ledger


@dataclass(frozen=True)
class LedgerEntry:
    """One round's use of this hospital's data."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    status: str = "started"  # "started" is written before training, "completed" after


@dataclass
class PrivacyLedger:
    """Everything needed to recompute this hospital's epsilon, persisted as JSON.

    The file is written atomically and carries a SHA-256 checksum of its content, so a
    truncated or corrupted ledger is refused rather than read as a smaller epsilon.
    """

    path: Path
    hospital: str
    accountant: str
    delta: float
    max_epsilon: float
    noise_multiplier: float | None = None  # planned once, then fixed
    planned_rounds: int | None = None
    target_epsilon: float | None = None
    history: list[LedgerEntry] = field(default_factory=list)

    # ---------------------------------------------------------------- persistence
    @classmethod
    def open(
        cls,
        state_dir: Path,
        hospital: str,
        policy: PrivacyPolicy,
        seen: Sequence[LedgerEntry] = (),
    ) -> PrivacyLedger:
        """Load this hospital's ledger, or start an empty one if none exists yet.

        ``seen`` is the history this hospital's process already recorded (Flower keeps a
        copy in ``context.state``). A ledger file that no longer holds it was deleted,
        rolled back or replaced, and is refused rather than trusted.
        """
        path = Path(state_dir) / LEDGER_FILENAME
        if not path.exists():
            ledger = cls(
                path=path,
                hospital=hospital,
                accountant=policy.accountant,
                delta=policy.delta,
                max_epsilon=policy.max_epsilon,
            )
            ledger._check_holds(seen)
            return ledger
        ledger = cls.from_json(path.read_bytes(), path)
        ledger._check_holds(seen)
        if ledger.hospital != hospital:
            raise LedgerError(
                f"privacy ledger {path} belongs to '{ledger.hospital}', not '{hospital}'"
            )
        # The hospital's current policy governs; the history is what it is.
        ledger.accountant, ledger.delta = policy.accountant, policy.delta
        ledger.max_epsilon = policy.max_epsilon
        return ledger

    def _check_holds(self, seen: Sequence[LedgerEntry]) -> None:
        def key(e: LedgerEntry) -> tuple[int, float, float, int]:
            return (e.round, e.noise_multiplier, e.sample_rate, e.steps)

        if [key(e) for e in self.history[: len(seen)]] != [key(e) for e in seen]:
            raise LedgerError(
                f"privacy ledger {self.path} no longer holds the {len(seen)} round(s) this "
                f"hospital already recorded (it holds {len(self.history)}): it was deleted, "
                "rolled back or replaced. This hospital refuses to train; restore the ledger."
            )

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (documented in the README)."""
        body = {
            "format": LEDGER_FORMAT,
            "hospital": self.hospital,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "epsilon": self.epsilon(),
            "plan": {
                "noise_multiplier": self.noise_multiplier,
                "planned_rounds": self.planned_rounds,
                "target_epsilon": self.target_epsilon,
            },
            "history": [asdict(e) for e in self.history],
        }
        return {**body, "checksum": _checksum(body)}

    @classmethod
    def from_json(cls, text: str | bytes, path: Path) -> PrivacyLedger:
        """Parse and verify a ledger file; raises LedgerError if it cannot be trusted."""
        refuse = (
            f"privacy ledger {path} cannot be trusted, so this hospital refuses to train "
            "(deleting it would reset epsilon to zero; restore it from a backup instead)"
        )
        try:
            data = json.loads(text)
            checksum = data.pop("checksum")
            if checksum != _checksum(data):
                raise LedgerError(f"{refuse}: checksum mismatch (edited or corrupted)")
            if data.get("format") != LEDGER_FORMAT:
                raise LedgerError(f"{refuse}: unknown format {data.get('format')!r}")
            plan = data["plan"]
            ledger = cls(
                path=path,
                hospital=str(data["hospital"]),
                accountant=str(data["accountant"]),
                delta=float(data["delta"]),
                max_epsilon=float(data["max_epsilon"]),
                noise_multiplier=plan["noise_multiplier"],
                planned_rounds=plan["planned_rounds"],
                target_epsilon=plan["target_epsilon"],
                history=[LedgerEntry(**e) for e in data["history"]],
            )
        except LedgerError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # incl. bad UTF-8
            raise LedgerError(f"{refuse}: {type(err).__name__}: {err}") from err
        recorded = float(data["epsilon"])
        if not math.isclose(recorded, ledger.epsilon(), rel_tol=1e-6, abs_tol=1e-9):
            raise LedgerError(
                f"{refuse}: recorded epsilon {recorded} does not match its history "
                f"({ledger.epsilon()})"
            )
        return ledger

    def save(self) -> None:
        """Write atomically: a temporary file in the same directory, fsync, rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            Path(tmp).replace(self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def export(self) -> dict[str, Any]:
        """The public, stable form of this ledger (``fedfusion ledger show --json``).

        ``history`` holds everything epsilon depends on, round by round: the noise
        multiplier, the Poisson sample rate and the number of DP-SGD steps. A round whose
        status is ``started`` crashed after it began and counts in full. From this alone
        any accountant recomputes epsilon for any delta; ``epsilon`` is the value
        recorded with ``accountant`` at ``delta``, and ``epsilon_after`` the cumulative
        value after each round.
        """
        history = self.accountant_history()
        return {
            "format": LEDGER_EXPORT_FORMAT,
            "hospital": self.hospital,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "epsilon": self.epsilon(),
            "remaining_epsilon": max(self.max_epsilon - self.epsilon(), 0.0),
            "history": [
                {
                    "round": e.round,
                    "noise_multiplier": e.noise_multiplier,
                    "sample_rate": e.sample_rate,
                    "steps": e.steps,
                    "status": e.status,
                    "epsilon_after": compute_epsilon(history[: i + 1], self.delta, self.accountant),
                }
                for i, e in enumerate(self.history)
            ],
        }

    # ---------------------------------------------------------------- accounting
    def accountant_history(self) -> list[tuple[float, float, int]]:
        """The (noise_multiplier, sample_rate, steps) history Opacus accountants take."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.history]

    def epsilon(self, extra: LedgerEntry | None = None) -> float:
        """Cumulative epsilon of the whole history (plus ``extra``, if given)."""
        history = self.accountant_history()
        if extra is not None:
            history.append((extra.noise_multiplier, extra.sample_rate, extra.steps))
        return compute_epsilon(history, self.delta, self.accountant)

    def begin_round(self, entry: LedgerEntry) -> None:
        """Record a round before training touches data (write-ahead), and save."""
        self.history.append(replace(entry, status="started"))
        self.save()

    def complete_round(self, server_round: int, steps_taken: int) -> None:
        """Mark the round's entry completed. More steps than planned is a bug: refuse."""
        last = self.history[-1]
        if last.round != server_round or last.status != "started":
            raise LedgerError(f"no started entry for round {server_round} in {self.path}")
        if steps_taken > last.steps:
            raise LedgerError(
                f"round {server_round} took {steps_taken} steps but only {last.steps} were "
                "recorded before training"
            )
        self.history[-1] = replace(last, status="completed")
        self.save()


def read_ledger(path: Path) -> PrivacyLedger:
    """Read and verify a hospital's ledger (its state directory or the file itself).

    Read-only: nothing is written. LedgerError if it is missing or cannot be trusted.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / LEDGER_FILENAME
    if not path.is_file():
        raise LedgerError(
            f"no privacy ledger at {path}: give the hospital's state-dir (hospital.state-dir)"
        )
    return PrivacyLedger.from_json(path.read_bytes(), path)


def dump_history(entries: Sequence[LedgerEntry]) -> str:
    """A ledger history as JSON (the copy kept in Flower's ``context.state``)."""
    return json.dumps([asdict(e) for e in entries])


def load_history(text: str) -> list[LedgerEntry]:
    """Inverse of :func:`dump_history`."""
    return [LedgerEntry(**e) for e in json.loads(text)]


def _checksum(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------- planning a round


@dataclass(frozen=True)
class RoundPlan:
    """Whether this hospital trains this round, and with what privacy parameters."""

    train: bool
    reason: str
    entry: LedgerEntry
    epsilon_before: float
    epsilon_after: float  # if the round is trained


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate; matches Opacus's DPDataLoader, 1 / ceil(N / B)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def plan_round(
    ledger: PrivacyLedger,
    policy: PrivacyPolicy,
    *,
    server_round: int,
    planned_rounds: int,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
) -> RoundPlan:
    """Plan the noise (once, for the whole budget) and decide whether to train."""
    q = sample_rate_for(num_examples, batch_size)
    steps = local_epochs * math.ceil(num_examples / batch_size)
    if ledger.noise_multiplier is None:
        ledger.noise_multiplier = plan_noise_multiplier(
            policy.target_epsilon, policy.delta, q, planned_rounds * steps, policy.accountant
        )
        ledger.planned_rounds = planned_rounds
        ledger.target_epsilon = policy.target_epsilon
    entry = LedgerEntry(
        round=server_round, noise_multiplier=ledger.noise_multiplier, sample_rate=q, steps=steps
    )
    before, after = ledger.epsilon(), ledger.epsilon(entry)
    if after > policy.max_epsilon:
        reason = (
            f"declined: training round {server_round} ({steps} steps, noise multiplier "
            f"{entry.noise_multiplier:.3f}, sample rate {q:.4f}) would raise epsilon from "
            f"{before:.3f} to {after:.3f}, above this hospital's max-epsilon "
            f"{policy.max_epsilon:g} (delta {policy.delta:g})"
        )
        return RoundPlan(False, reason, entry, before, after)
    return RoundPlan(True, "trained", entry, before, after)


# ---------------------------------------------------------------- Opacus wrapping


@dataclass
class PrivateTraining:
    """What :func:`make_private` returns, the same shape in every grad-sample mode."""

    model: nn.Module  # Opacus's wrapper; exchange raw_model's weights, not this one's
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module  # wrapped for ghost clipping, unchanged otherwise
    loader: DataLoader[Any]  # Poisson sampling
    engine: Any  # opacus.PrivacyEngine
    grad_sample_mode: str = "hooks"  # the one in use ("auto" resolved)

    def empty_batch_step(self) -> None:
        """The DP step of an empty Poisson batch: no gradient, only noise.

        An empty batch is part of Poisson sampling and is counted by the accountant, so
        it must still take its noised step. Only the hooks mode can run a forward pass
        on zero examples; this works for every grad-sample mode.
        """
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
) -> PrivateTraining:
    """Wrap model, optimizer, loss and data for DP-SGD with Poisson sampling."""
    from opacus import PrivacyEngine

    loader = DataLoader(dataset, batch_size=batch_size)
    with warnings.catch_warnings():
        # Opacus's secure_mode needs torchcsprng, which has no build for this torch;
        # client/secure_noise.py draws from the OS CSPRNG instead (below).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=policy.accountant, secure_mode=False)
    device = next(model.parameters()).device  # the noise is drawn where the gradients are
    if policy.secure_noise:
        if noise_generator is not None:
            raise ValueError(
                "a seeded noise generator contradicts privacy.secure-noise = true "
                "(seeded noise is for tests: set privacy.secure-noise = false there)"
            )
        # Poisson sampling: Opacus takes its sampler's generator from `secure_rng`; the
        # noise comes from use_secure_noise below, so Opacus gets no noise generator.
        engine.secure_rng = secure_torch_generator()
    else:
        log.warning(
            "privacy.secure-noise = false: DP noise comes from torch's pseudo-random "
            "generator. Use this for tests and experiments only, never with patient data."
        )
        noise_generator = noise_generator or secure_torch_generator(device)
    mode = resolve_grad_sample_mode(policy.grad_sample_mode, model)
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=loss_fn,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=policy.max_grad_norm,
        poisson_sampling=True,
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
    if policy.secure_noise:
        use_secure_noise(dp_optimizer)
    return PrivateTraining(dp_model, model, dp_optimizer, dp_loss, dp_loader, engine, mode)


def resolve_grad_sample_mode(requested: str, model: nn.Module) -> str:
    """The per-example gradient method for ``model``: ``requested``, or the best for it.

    ``auto`` is the fastest method that handles every trainable layer.

    Measured by ``fedfusion bench --suite dp`` (README, "Performance"): book-keeping is
    the fastest on the default model by far, and on the LoRA model within noise of
    Opacus's ``ew`` (which is not checked per example there). A model with a layer
    book-keeping cannot clip falls back to Opacus's hooks, which handle any layer
    Opacus supports.
    """
    if requested != "auto":
        return requested
    return "bk" if not bookkeeping_unsupported(model) else "hooks"
