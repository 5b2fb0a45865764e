"""A hospital's split of its records into training, validation and test parts.

Each patient (each record, where the hospital has no patient ids) is placed by a keyed
hash of its id alone: HMAC-SHA256 under the hospital's secret key, read as a number in
[0, 1) and compared with the fractions. So a patient's part never depends on any other
record, on the order of the manifest or on anything the server sends: records added
later do not move earlier ones, and a server that asks for another seed or fraction
cannot move a trained patient into a held-out part. A hospital with its own data draws
the key once and keeps it, with the fractions, in its privacy ledger
(``client/dp/hospital_split.py``); a simulated hospital, holding public data, derives it
from the run's seed, so a simulation is reproducible.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the ledger reads splits without importing torch
    from shared_model.data import FusionTensors

__all__ = ["SPLIT_METHOD", "HeldOutParts", "SplitSpec", "embedded_split_spec", "split_records"]

SPLIT_METHOD = "hmac-sha256-by-patient/1"
TRAIN, VALIDATION, TEST = "train", "validation", "test"


@dataclass(frozen=True)
class SplitSpec:
    """The key and fractions that place every patient in one part, for good."""

    key: bytes
    test_fraction: float
    validation_fraction: float = 0.0

    @classmethod
    def drawn(cls, test_fraction: float, validation_fraction: float = 0.0) -> SplitSpec:
        """A new split with a fresh secret key (from the OS CSPRNG)."""
        return cls(secrets.token_bytes(32), test_fraction, validation_fraction)

    def part(self, unit: str) -> str:
        """The part (train, validation or test) of one patient or record id."""
        digest = hmac.new(self.key, unit.encode("utf-8", "surrogateescape"), hashlib.sha256)
        u = int.from_bytes(digest.digest()[:8], "big") / 2.0**64
        if u < self.test_fraction:
            return TEST
        if u < self.test_fraction + self.validation_fraction:
            return VALIDATION
        return TRAIN

    def fractions(self) -> tuple[float, float]:
        """(test, validation) fractions."""
        return (self.test_fraction, self.validation_fraction)

    def key_id(self) -> str:
        """A short public name of the key (a hash of it), for logs and ``ledger show``."""
        return hashlib.sha256(b"fedfusion split key id\0" + self.key).hexdigest()[:16]

    def to_record(self) -> dict[str, Any]:
        """The form kept in the privacy ledger (which holds the key: it never leaves)."""
        return {
            "method": SPLIT_METHOD,
            "key": self.key.hex(),
            "test_fraction": self.test_fraction,
            "validation_fraction": self.validation_fraction,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SplitSpec:
        """Inverse of :meth:`to_record`; ValueError if it is not one."""
        if record.get("method") != SPLIT_METHOD:
            raise ValueError(f"unknown split method {record.get('method')!r}")
        key = bytes.fromhex(str(record["key"]))
        test, validation = float(record["test_fraction"]), float(record["validation_fraction"])
        if len(key) < 16 or not (0.0 < test < 1.0 and 0.0 <= validation < 1.0 - test):
            raise ValueError("split key or fractions out of range")
        return cls(key, test, validation)


@dataclass(frozen=True)
class HeldOutParts:
    """One hospital's records in their three parts (validation may be empty)."""

    train: FusionTensors
    validation: FusionTensors
    test: FusionTensors

    def held_out(self, holdout: str) -> FusionTensors:
        """The part a run evaluates on: ``test`` or ``validation``."""
        return self.validation if holdout == VALIDATION else self.test


def record_units(data: FusionTensors) -> list[str]:
    """Each record's unit of placement: its patient id (or record key)."""
    return data.patient_ids or [f"row-{i}" for i in range(len(data))]


def split_records(data: FusionTensors, spec: SplitSpec) -> HeldOutParts:
    """``data`` in its parts, each patient's records together; ValueError if none trains."""
    parts = [spec.part(unit) for unit in record_units(data)]
    if TRAIN not in parts:
        raise ValueError(
            f"none of {len(parts)} records falls in the training part (test fraction "
            f"{spec.test_fraction}, validation fraction {spec.validation_fraction})"
        )

    def where(name: str) -> FusionTensors:
        return data.subset(np.array([i for i, p in enumerate(parts) if p == name], dtype=int))

    return HeldOutParts(train=where(TRAIN), validation=where(VALIDATION), test=where(TEST))


def embedded_split_spec(
    seed: int, partition_id: int, test_fraction: float, holdout: str
) -> SplitSpec:
    """A simulated hospital's split: public data, keyed by the run's seed.

    ``holdout = validation`` carves a validation part the size of the test part, so a
    tuning run neither trains nor evaluates on the test part.
    """
    key = hashlib.sha256(f"fedfusion embedded split\0{seed}\0{partition_id}".encode()).digest()
    validation = test_fraction if holdout == VALIDATION else 0.0
    return SplitSpec(key, test_fraction, validation)
