"""The patient as the unit of privacy: one record per sampled patient per step.

A hospital's manifest may hold several studies of one patient. Record-level DP-SGD
protects each record at epsilon, so a patient with k records has up to k times that.
Here the training records are seen as patients (:class:`PatientSampled`): Poisson
sampling picks patients at rate q = B / patients, and each sampled patient brings one of
its records, drawn uniformly at random anew at every step. Adding or removing a patient
(all of their records) then adds or removes at most one clipped gradient in each step,
so the record-level machinery (clipping, noise, the accountant at rate q over N
patients) is patient-level DP-SGD exactly: the ``(epsilon, delta)`` it states holds per
patient, per hospital. A patient seen at two hospitals composes (the guarantees add up).

The released training-set size is the number of patients; held-out statistics weigh
each patient's records 1/k (shared_model/evaluation.py), so one patient moves them no
more than one record did.

Why one record per patient rather than clipping each patient's summed gradient: every
record-level path (Opacus hooks, ghost clipping, book-keeping, the loss release) stays
exact and unchanged, the cost of a step is that of a record-level step, and docs/privacy.md
gives the utility comparison.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from client.dp.ledger import PATIENT, RECORD, LedgerError, PrivacyLedger
from shared_model.config import ConfigError
from shared_model.manifest import RECORD_KEY  # the key of a record without a patient id

__all__ = [
    "PATIENT",
    "RECORD",
    "PatientSampled",
    "fixed_privacy_unit",
    "has_patient_ids",
    "patient_groups",
    "patient_weights",
    "records_per_patient",
    "wanted_privacy_unit",
]

log = logging.getLogger("fedfusion.hospital")


def has_patient_ids(patient_ids: Sequence[str] | None) -> bool:
    """Whether the records carry patient ids (not each its own record key)."""
    return bool(patient_ids) and not all(p.startswith(RECORD_KEY) for p in patient_ids or ())


def records_without_patient_id(patient_ids: Sequence[str] | None) -> int:
    """How many records have no patient id (a blank ``patient_id``, or no column)."""
    return sum(p.startswith(RECORD_KEY) for p in patient_ids or ())


def wanted_privacy_unit(requested: str, patient_ids: Sequence[str] | None, hospital: str) -> str:
    """The unit the hospital's file asks (``privacy-unit``), for the records it holds.

    ``auto``: patient where the records carry patient ids, record otherwise (said in the
    log). ConfigError for ``patient`` without patient ids.
    """
    ids = has_patient_ids(patient_ids)
    blank = records_without_patient_id(patient_ids)
    if ids and blank and requested != RECORD:  # each blank row would count as a patient
        # the counts stay in the hospital's log: the error's text reaches the server
        log.error("%s: patient_id is blank on %d of %d records", hospital, blank,
                  len(patient_ids or ()))  # fmt: skip
        raise ConfigError(
            f"{hospital}: patient_id is blank on some records (`fedfusion data check` says "
            "which), and each of those would count as a patient of its own, so a patient "
            "could be counted several times: give every record its patient's id, or set "
            "privacy-unit = 'record' to accept a guarantee per record"
        )
    if requested == PATIENT and not ids:
        raise ConfigError(
            f"{hospital}: privacy-unit = 'patient' needs a patient_id column in the "
            "manifest (one id per patient, the same on each of their records); add it, or "
            "set privacy-unit = 'record' to accept a guarantee per record"
        )
    if requested == RECORD or not ids:
        if not ids:
            log.warning(
                "%s: the manifest has no patient_id: epsilon is per record, and a patient "
                "with k records has up to k times it (add patient ids for a per-patient "
                "guarantee)",
                hospital,
            )
        return RECORD
    return PATIENT


def fixed_privacy_unit(ledger: PrivacyLedger, wanted: str) -> str:
    """The unit of ``ledger``'s epsilon: fixed at first use, never changed after a release.

    While the ledger holds no release the unit follows the hospital's file and data. A
    ledger with releases but no unit was written per record and stays so; a per-record
    ledger stays per record (said in the log). LedgerError where the hospital now asks per
    record of a per-patient ledger, or its records lost their patient ids.
    """
    if not ledger.history and ledger.unit not in (None, wanted):  # nothing released yet
        ledger.unit = None
    if ledger.unit is None:
        unit = RECORD if ledger.history else wanted
        if unit != wanted:
            log.warning(
                "%s: the privacy ledger holds %d release(s) accounted per record, before it "
                "kept a unit: it stays per record (start a new ledger for a per-patient "
                "guarantee)",
                ledger.hospital,
                len(ledger.history),
            )
        ledger.fix_unit(unit)
        return unit
    if ledger.unit == PATIENT and wanted == RECORD:
        raise LedgerError(
            f"privacy ledger {ledger.path} protects each patient since its first release, "
            "but this hospital now asks per record (privacy-unit, or a manifest without "
            "patient ids): its records would no longer be grouped by patient. Put the "
            "patient ids or privacy-unit back; this hospital refuses to go on until then"
        )
    if ledger.unit == RECORD and wanted == PATIENT:
        log.warning(
            "%s: the privacy ledger is per record since its first release: epsilon stays "
            "per record (start a new ledger for a per-patient guarantee)",
            ledger.hospital,
        )
    return ledger.unit


def patient_weights(patient_ids: Sequence[str]) -> np.ndarray:
    """Each record's weight 1/k, k its patient's record count: each patient weighs 1."""
    weights = np.zeros(len(patient_ids))
    for group in patient_groups(patient_ids):
        weights[group] = 1.0 / len(group)
    return weights


def patient_groups(patient_ids: Sequence[str]) -> list[list[int]]:
    """The record indices of each patient, patients in order of their first record."""
    groups: dict[str, list[int]] = {}
    for index, patient in enumerate(patient_ids):
        groups.setdefault(patient, []).append(index)
    return list(groups.values())


def records_per_patient(patient_ids: Sequence[str]) -> list[int]:
    """How many records each patient has (patients in order of their first record)."""
    return [len(g) for g in patient_groups(patient_ids)]


class PatientSampled(Dataset[Any]):
    """Training records seen as patients: item ``i`` is one record of patient ``i``.

    The record is drawn uniformly among the patient's records at each access, from
    ``rng`` (its choice depends on nothing but the patient's own record count).
    """

    def __init__(
        self, records: Dataset[Any], patient_ids: Sequence[str], rng: np.random.Generator
    ) -> None:
        if len(patient_ids) != len(records):  # type: ignore[arg-type]
            raise ValueError(
                f"{len(patient_ids)} patient ids for {len(records)} records"  # type: ignore[arg-type]
            )
        self.records = records
        self.groups = patient_groups(patient_ids)
        self.rng = rng

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Any:
        group = self.groups[index]
        pick = group[0] if len(group) == 1 else group[int(self.rng.integers(len(group)))]
        return self.records[pick]
