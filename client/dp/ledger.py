"""The privacy ledger: every release a hospital has made from its records, on disk.

Each entry is one Gaussian mechanism applied ``steps`` times: a round of DP-SGD (the
clipped gradient sum and the clipped training-loss sum, released together), or the
hospital's record count (once). Epsilon is always recomputed from the whole history, so
it composes over every round this hospital has joined, across process restarts.

The file is written atomically and carries a SHA-256 checksum of its content, so a
truncated or corrupted ledger is refused rather than read as a smaller epsilon. Its
entries are hash-chained from a random genesis (each commits to all before it), and
every save also writes the hospital's backup copy (``client/dp/ledger_custody.py``): an
edit, even with its checksum recomputed, or a ledger rolled back or replaced, disagrees
with the backup and is refused. A copy of the history in Flower's per-node state catches
a ledger rolled back within one run. A hospital with its own data never starts a ledger
by itself: a person runs ``fedfusion ledger init`` once.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from client.dp.accounting import compute_epsilon
from client.dp.ledger_file import checksum as _checksum
from client.dp.ledger_file import ledger_lock
from client.dp.policy import PrivacyPolicy
from shared_model.config.run import ACCOUNTANTS
from shared_model.errors import ExplainedError
from shared_model.files import write_text_atomic
from shared_model.split import SplitSpec

__all__ = [
    "DP_SGD",
    "HELD_OUT_PART",
    "HELD_OUT_STATS",
    "LEDGER_EXPORT_FORMAT",
    "LEDGER_FILENAME",
    "LEDGER_FORMAT",
    "PATIENT",
    "PRIVACY_UNITS",
    "RECORD",
    "RECORD_COUNT",
    "TRAIN_PART",
    "LedgerEntry",
    "LedgerError",
    "PrivacyLedger",
    "dump_history",
    "ledger_lock",
    "load_history",
    "part_epsilon",
    "read_ledger",
]

LEDGER_FORMAT = "fedfusion-privacy-ledger/3"
# Read, and written on as /3 (its entries chained from a genesis derived from its content).
_UNCHAINED_FORMATS = ("fedfusion-privacy-ledger/2",)
# Written by versions that sent each round's exact record count and mean training loss
# in the clear: releases no epsilon covers, so such a ledger cannot be continued.
_UNACCOUNTED_FORMATS = ("fedfusion-privacy-ledger/1",)
LEDGER_FILENAME = "privacy_ledger.json"
# `fedfusion ledger show --json`: the stable, documented form anyone can recompute from.
LEDGER_EXPORT_FORMAT = "fedfusion-ledger-export/2"
# The mechanisms an entry can record.
DP_SGD = "dp-sgd"  # one round: clipped gradient sum + clipped loss sum, Poisson-sampled
RECORD_COUNT = "record-count"  # the number of training records, once
HELD_OUT_STATS = "held-out-stats"  # one model's summed statistics on the held-out records
# Whom epsilon protects (client/dp/patients.py).
PATIENT = "patient"
RECORD = "record"
PRIVACY_UNITS = (PATIENT, RECORD)
# The disjoint parts of a hospital's records (its split), each with its own epsilon.
TRAIN_PART = "train"
HELD_OUT_PART = "held-out"
_MECHANISMS = {DP_SGD: TRAIN_PART, RECORD_COUNT: TRAIN_PART, HELD_OUT_STATS: HELD_OUT_PART}


class LedgerError(ExplainedError, RuntimeError):
    """The privacy ledger cannot be trusted; the hospital refuses to train."""


@dataclass(frozen=True)
class LedgerEntry:
    """One release: ``steps`` Gaussian mechanisms at this noise multiplier and rate."""

    round: int
    noise_multiplier: float  # noise std / sensitivity of the whole release
    sample_rate: float  # Poisson rate; 1.0 for a release computed on every record
    steps: int
    status: str = "started"  # "started" is written before training, "completed" after
    mechanism: str = DP_SGD
    chain: str = ""  # SHA-256 of the previous entry's chain and this entry's release

    @property
    def part(self) -> str:
        """The part of the hospital's records it was computed from (train or held-out)."""
        return _MECHANISMS.get(self.mechanism, "")

    def release(self) -> list[Any]:
        """What the entry released (everything but its status and chain)."""
        return [self.round, self.noise_multiplier, self.sample_rate, self.steps, self.mechanism]


def part_epsilon(history: Sequence[LedgerEntry], part: str, delta: float, accountant: str) -> float:
    """Cumulative epsilon of one part's records over ``history``.

    Every entry counts in full, started or completed; the result is a function of the
    releases' public settings only.
    """
    steps = [(e.noise_multiplier, e.sample_rate, e.steps) for e in history if e.part == part]
    return compute_epsilon(steps, delta, accountant)


@dataclass
class PrivacyLedger:
    """Everything needed to recompute this hospital's epsilon, persisted as JSON."""

    path: Path
    hospital: str
    accountant: str
    delta: float
    max_epsilon: float  # the cap on the training part's epsilon
    max_held_out_epsilon: float | None = None  # the held-out part's (None: max_epsilon)
    noise_multiplier: float | None = None  # of a DP-SGD round, planned once, then fixed
    planned_rounds: int | None = None
    target_epsilon: float | None = None
    public_records: int | None = None  # the released (noisy) record count
    # The hospital's split (shared_model/split.py: its secret key and fractions), fixed at
    # first use, and how many releases the ledger held then (records trained before it
    # may lie in any part).
    split: dict[str, Any] | None = None
    # Whom epsilon protects: "patient" or "record", fixed at first use (client/dp/patients.py).
    # None: not fixed yet; a ledger with releases and no unit is per record, for good.
    unit: str | None = None
    history: list[LedgerEntry] = field(default_factory=list)
    genesis: str = field(default_factory=lambda: secrets.token_hex(32))  # the chain's start
    backup: Path | None = None  # where every save also goes (not part of the file)
    # The file as this process last read or wrote it: a save over anything else (another
    # message's release in between) is refused, never lost.
    on_disk: bytes | None = field(default=None, repr=False, compare=False)

    # ---------------------------------------------------------------- persistence
    @classmethod
    def empty(
        cls, path: Path, hospital: str, policy: PrivacyPolicy, backup: Path | None = None
    ) -> PrivacyLedger:
        """A new ledger with no release yet (not saved)."""
        return cls(
            path=path,
            hospital=hospital,
            accountant=policy.accountant,
            delta=policy.delta,
            max_epsilon=policy.max_epsilon,
            max_held_out_epsilon=policy.max_held_out_epsilon,
            backup=backup,
        )

    @classmethod
    def open(
        cls,
        state_dir: Path,
        hospital: str,
        policy: PrivacyPolicy,
        seen: Sequence[LedgerEntry] = (),
        *,
        backup: Path | None = None,
        allow_new: bool = True,
    ) -> PrivacyLedger:
        """Load this hospital's ledger, checked against its backup.

        ``seen`` is the history this hospital's process already recorded (Flower keeps a
        copy in ``context.state``). A ledger file that no longer holds it, or that its
        backup (``backup``, a file) contradicts, was deleted, rolled back, replaced or
        edited, and is refused rather than trusted. A missing ledger is started empty
        unless ``allow_new`` is false: the hospital's code opens it through ``open_ledger``
        in ``client/dp/ledger_custody.py``, which allows that only for a simulated
        hospital and otherwise says what a person should do.
        """
        path = Path(state_dir) / LEDGER_FILENAME
        if not path.exists():
            if not allow_new:  # client/dp/ledger_custody.py says why, and what to do
                raise LedgerError(f"no privacy ledger at {path}: this hospital refuses to train")
            ledger = cls.empty(path, hospital, policy, backup)
            ledger._check_holds(seen)
            if backup is not None:
                backup.parent.mkdir(parents=True, exist_ok=True)
            return ledger
        ledger = cls.from_json(path.read_bytes(), path)
        ledger.backup = backup
        ledger._check_holds(seen)
        if ledger.hospital != hospital:
            raise LedgerError(
                f"privacy ledger {path} belongs to '{ledger.hospital}', not '{hospital}'"
            )
        # The hospital's current policy governs; the history is what it is.
        ledger.accountant, ledger.delta = policy.accountant, policy.delta
        ledger.max_epsilon = policy.max_epsilon
        ledger.max_held_out_epsilon = policy.max_held_out_epsilon
        return ledger

    def _check_holds(self, seen: Sequence[LedgerEntry]) -> None:
        def key(e: LedgerEntry) -> list[Any]:
            return e.release()

        if [key(e) for e in self.history[: len(seen)]] != [key(e) for e in seen]:
            raise LedgerError(
                f"privacy ledger {self.path} no longer holds the {len(seen)} release(s) this "
                f"hospital already recorded (it holds {len(self.history)}): it was deleted, "
                "rolled back or replaced. This hospital refuses to train; restore the ledger."
            )

    def chained(self) -> None:
        """Set every entry's chain hash from the genesis."""
        previous = self.genesis
        for i, entry in enumerate(self.history):
            previous = _link(previous, entry)
            self.history[i] = replace(entry, chain=previous)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form (documented in docs/privacy.md)."""
        self.chained()
        body = {
            "format": LEDGER_FORMAT,
            "genesis": self.genesis,
            "hospital": self.hospital,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "epsilon": self.epsilon(),
            "max_held_out_epsilon": self.held_out_cap,
            "held_out_epsilon": self.epsilon(part=HELD_OUT_PART),
            "plan": {
                "noise_multiplier": self.noise_multiplier,
                "planned_rounds": self.planned_rounds,
                "target_epsilon": self.target_epsilon,
                "public_records": self.public_records,
            },
            "history": [asdict(e) for e in self.history],
        }
        if self.split is not None:
            body["split"] = self.split
        if self.unit is not None:
            body["unit"] = self.unit
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
            if data.get("format") in _UNACCOUNTED_FORMATS:
                raise LedgerError(
                    f"privacy ledger {path} was written by an earlier fedfusion, which sent "
                    "each round's exact record count and training loss outside the DP "
                    "accounting, so the epsilon it records does not bound what was released. "
                    "This hospital refuses to continue it: keep it as a record, and start a "
                    "new state directory only if your privacy officer accepts that those "
                    "earlier releases are not covered"
                )
            unchained = data.get("format") in _UNCHAINED_FORMATS
            if unchained and ("split" in data or "unit" in data):
                raise LedgerError(f"{refuse}: a split or unit in a ledger of the old format")
            if data.get("format") != LEDGER_FORMAT and not unchained:
                raise LedgerError(f"{refuse}: unknown format {data.get('format')!r}")
            plan = data["plan"]
            ledger = cls(
                path=path,
                hospital=str(data["hospital"]),
                accountant=str(data["accountant"]),
                delta=float(data["delta"]),
                max_epsilon=float(data["max_epsilon"]),
                max_held_out_epsilon=data.get("max_held_out_epsilon"),
                noise_multiplier=plan["noise_multiplier"],
                planned_rounds=plan["planned_rounds"],
                target_epsilon=plan["target_epsilon"],
                public_records=plan["public_records"],
                split=data.get("split"),
                unit=data.get("unit"),
                history=[LedgerEntry(**e) for e in data["history"]],
                genesis=_checksum(data) if unchained else str(data["genesis"]),
            )
            ledger.on_disk = text if isinstance(text, bytes) else text.encode("utf-8")
            if problem := ledger.invalid():
                raise LedgerError(f"{refuse}: {problem}")
            recorded_chain = [e.chain for e in ledger.history]
            ledger.chained()
            if not unchained and recorded_chain != [e.chain for e in ledger.history]:
                raise LedgerError(f"{refuse}: its hash chain is broken (an entry was edited)")
            recorded, computed = float(data["epsilon"]), ledger.epsilon()
            held_out = float(data.get("held_out_epsilon", 0.0))
            held_out_computed = ledger.epsilon(part=HELD_OUT_PART)
        except LedgerError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # incl. bad UTF-8
            raise LedgerError(f"{refuse}: {type(err).__name__}: {err}") from err
        for was, now in ((recorded, computed), (held_out, held_out_computed)):
            if not math.isclose(was, now, rel_tol=1e-6, abs_tol=1e-9):
                raise LedgerError(
                    f"{refuse}: recorded epsilon {was} does not match its history ({now})"
                )
        return ledger

    def invalid(self) -> str:
        """What makes this ledger's content impossible; "" if nothing.

        Values no release of fedfusion's could have, such as negative steps (which would
        lower epsilon), are refused, not computed with.
        """
        if self.accountant not in ACCOUNTANTS:
            return f"unknown accountant {self.accountant!r}"
        if not (0.0 < self.delta < 1.0 and self.max_epsilon > 0.0 and self.held_out_cap > 0.0):
            return f"delta {self.delta!r} or max_epsilon {self.max_epsilon!r} out of range"
        if self.unit not in (None, *PRIVACY_UNITS):
            return f"unknown privacy unit {self.unit!r}"
        if self.split is not None:
            try:
                SplitSpec.from_record(self.split)
                since = self.split["since_release"]
            except (ValueError, KeyError, TypeError) as err:
                return f"its split is not one fedfusion could have recorded ({err})"
            if type(since) is not int or not 0 <= since <= len(self.history):
                return f"its split's since_release {since!r} is out of range"
        for i, e in enumerate(self.history):
            fine = (
                type(e.round) is int
                and type(e.steps) is int
                and e.steps >= 1
                and isinstance(e.noise_multiplier, float | int)
                and math.isfinite(e.noise_multiplier)
                and e.noise_multiplier > 0.0
                and isinstance(e.sample_rate, float | int)
                and 0.0 < e.sample_rate <= 1.0
                and e.mechanism in _MECHANISMS
                and e.status in ("started", "completed")
            )
            if not fine:
                return f"release {i + 1} is not one fedfusion could have made ({e})"
        return ""

    def save(self) -> None:
        """Write the ledger, then its backup (each atomically, and synced to disk).

        Under the ledger lock, and only over the file this process last read or wrote:
        LedgerError if another process wrote it since (its release would be lost).
        """
        text = json.dumps(self.to_dict(), indent=2)
        with ledger_lock(self.path.parent):
            current = self.path.read_bytes() if self.path.exists() else None
            if current != self.on_disk:
                raise LedgerError(
                    f"privacy ledger {self.path} changed on disk since this process read it "
                    "(another of the hospital's messages wrote it): this one is not saved "
                    "over it, and its request fails"
                )
            write_text_atomic(self.path, text)
            self.on_disk = text.encode("utf-8")
            self._save_backup(text)

    def _save_backup(self, text: str) -> None:
        if self.backup is not None:
            try:  # its folder is made only at init: a missing one is storage not mounted
                write_text_atomic(self.backup, text, make_parents=False)
            except OSError as err:
                raise LedgerError(
                    f"cannot write the ledger's backup {self.backup} ({err.strerror}; is its "
                    "storage mounted?): this hospital does not go on without it"
                ) from err

    def export(self) -> dict[str, Any]:
        """The public, stable form of this ledger (``fedfusion ledger show --json``).

        ``history`` holds everything epsilon depends on, release by release: the
        mechanism, its noise multiplier, its Poisson sample rate (1.0: every record)
        and how many times it ran. A round whose status is ``started`` crashed after it
        began and counts in full. From this alone any accountant recomputes epsilon for
        any delta; ``epsilon`` is the value recorded with ``accountant`` at ``delta``,
        and ``epsilon_after`` the cumulative value after each release.
        """
        held_out = self.epsilon(part=HELD_OUT_PART)
        return {
            "format": LEDGER_EXPORT_FORMAT,
            "hospital": self.hospital,
            "accountant": self.accountant,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "epsilon": self.epsilon(),
            "remaining_epsilon": max(self.max_epsilon - self.epsilon(), 0.0),
            "max_held_out_epsilon": self.held_out_cap,
            "held_out_epsilon": held_out,
            "remaining_held_out_epsilon": max(self.held_out_cap - held_out, 0.0),
            # whom epsilon protects: None while not fixed (no release yet)
            "unit": self.unit or (RECORD if self.history else None),
            "public_records": self.public_records,
            "split": self.split_summary(),
            "history": [
                {
                    "round": e.round,
                    "part": e.part,
                    "mechanism": e.mechanism,
                    "noise_multiplier": e.noise_multiplier,
                    "sample_rate": e.sample_rate,
                    "steps": e.steps,
                    "status": e.status,
                    "epsilon_after": self._epsilon(self.history[: i + 1], e.part),
                }
                for i, e in enumerate(self.history)
            ],
        }

    def fix_unit(self, unit: str) -> None:
        """Fix whom epsilon protects and save; after a release it never changes.

        A ledger with releases and no unit can only be fixed per record.

        A ledger not yet on disk (a simulated hospital's first) saves it with its first
        release.
        """
        if self.history and unit != (self.unit or RECORD):
            raise LedgerError(f"privacy ledger {self.path} cannot change its privacy unit")
        self.unit = unit
        if self.on_disk is not None:  # a new ledger keeps it with its first release
            self.save()

    def record_split(self, spec: SplitSpec) -> None:
        """Fix the hospital's split in the ledger, once, and save."""
        if self.split is not None:
            raise LedgerError(f"privacy ledger {self.path} has its split already")
        self.split = {**spec.to_record(), "since_release": len(self.history)}
        self.save()

    def split_spec(self) -> SplitSpec | None:
        """The split fixed in this ledger, if any."""
        return None if self.split is None else SplitSpec.from_record(self.split)

    def split_summary(self) -> dict[str, Any] | None:
        """The split without its key: what ``ledger show`` prints."""
        spec = self.split_spec()
        if spec is None or self.split is None:
            return None
        return {
            "method": self.split["method"],
            "key_id": spec.key_id(),
            "test_fraction": spec.test_fraction,
            "validation_fraction": spec.validation_fraction,
            "since_release": self.split["since_release"],
        }

    # ---------------------------------------------------------------- accounting
    @property
    def held_out_cap(self) -> float:
        """The cap on the held-out part's epsilon."""
        return self.max_epsilon if self.max_held_out_epsilon is None else self.max_held_out_epsilon

    def accountant_history(self, part: str = TRAIN_PART) -> list[tuple[float, float, int]]:
        """The (noise_multiplier, sample_rate, steps) of every release from ``part``, in order."""
        return [
            (e.noise_multiplier, e.sample_rate, e.steps) for e in self.history if e.part == part
        ]

    def epsilon(self, extra: LedgerEntry | None = None, part: str = TRAIN_PART) -> float:
        """Cumulative epsilon of one part's records (plus ``extra``, if given).

        The parts are disjoint sets of records (the hospital's split), so a record's
        epsilon is that of its part: releases from the other part do not touch it.
        """
        history = self.history if extra is None else [*self.history, extra]
        return self._epsilon(history, part)

    def _epsilon(self, history: Sequence[LedgerEntry], part: str) -> float:
        return part_epsilon(history, part, self.delta, self.accountant)

    def record_release(self, entry: LedgerEntry) -> None:
        """Record a one-off release as completed, and save, before it leaves."""
        self.history.append(replace(entry, status="completed"))
        self.save()

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
    Its backup is checked by whoever knows where it is (``check_against_backup``).
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


def _link(previous: str, entry: LedgerEntry) -> str:
    """The chain hash of ``entry`` after the hash ``previous``."""
    canonical = json.dumps([previous, entry.release()], separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
