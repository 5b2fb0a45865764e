"""Which of its records a hospital trains on and which it holds out: its own decision.

The server's run config names a seed, a test fraction and a held-out part, and once
chose the split with them: a server changing the seed between runs moved records
trained under DP into the held-out set. A hospital with its own data now keeps its
split in its privacy ledger (its secret key and its fractions, from its own file,
fixed at ``fedfusion ledger init`` or at first use) and ignores the run's: it trains on
its own training part whatever the run asks, and says so in its log. The held-out parts
never change, so a record is either trained on or held out, for good.
"""

from __future__ import annotations

import logging
from pathlib import Path

from client.dp.ledger import LedgerError, PrivacyLedger, ledger_lock
from client.dp.ledger_custody import open_ledger
from client.dp.policy import PrivacyPolicy
from shared_model.config import HospitalConfig, RunConfig
from shared_model.split import VALIDATION, SplitSpec, embedded_split_spec

__all__ = [
    "check_fractions",
    "fix_split_after_releases",
    "hospital_split_spec",
    "new_split",
]

log = logging.getLogger("fedfusion.hospital")

_SPLIT_AFTER_RELEASES = (
    "this hospital's privacy ledger holds {n} release(s) made before it kept a split of "
    "its own: the server chose which records were held out then, so any record may have "
    "been trained on. It refuses to evaluate or train until a person fixes its split: "
    "`fedfusion ledger split --config <the hospital's file> --after-releases`, once the "
    "privacy officer accepts that a patient trained then and held out now is covered by "
    "the training and the held-out epsilon together"
)


def fix_split_after_releases(
    hospital: HospitalConfig, state_dir: Path, policy: PrivacyPolicy
) -> PrivacyLedger:
    """Fix the split of a ledger that holds releases made without one (a person's call)."""
    backup = hospital.ledger_backup_file(state_dir)
    with ledger_lock(state_dir):
        ledger = open_ledger(state_dir, hospital.name, policy, (), backup, allow_new=False)
        if ledger.split is not None:
            raise LedgerError(f"privacy ledger {ledger.path} has its split already")
        ledger.record_split(new_split(hospital))
    return ledger


def new_split(hospital: HospitalConfig) -> SplitSpec:
    """A fresh split with the fractions of the hospital's own file."""
    return SplitSpec.drawn(hospital.test_fraction, hospital.validation_fraction)


def hospital_split_spec(
    hospital: HospitalConfig, run: RunConfig, state_dir: Path, policy: PrivacyPolicy
) -> SplitSpec:
    """The split this hospital trains and evaluates on in this run.

    A simulated hospital (public embedded data) follows the run. A hospital with its own
    data reads its split from its ledger, or draws and records it there on first use.
    LedgerError when the ledger cannot be trusted, or its file's fractions changed since.
    """
    if hospital.simulated:
        data = run.data
        return embedded_split_spec(
            run.seed, hospital.partition_id, data.test_fraction, data.holdout
        )
    backup = hospital.ledger_backup_file(state_dir)
    with ledger_lock(state_dir):  # two messages at once must not fix two keys
        ledger = open_ledger(state_dir, hospital.name, policy, (), backup, allow_new=False)
        spec = ledger.split_spec()
        if spec is None:
            if ledger.history:
                raise LedgerError(_SPLIT_AFTER_RELEASES.format(n=len(ledger.history)))
            spec = new_split(hospital)
            ledger.record_split(spec)
            log.info(
                "%s: split fixed in the privacy ledger: test %.2f, validation %.2f of "
                "patients (key %s)",
                hospital.name,
                spec.test_fraction,
                spec.validation_fraction,
                spec.key_id(),
            )
    check_fractions(hospital, ledger)
    _say_if_asked_otherwise(hospital, run, spec)
    return spec


def check_fractions(hospital: HospitalConfig, ledger: PrivacyLedger) -> None:
    """LedgerError if the hospital's file asks fractions other than its ledger's split."""
    spec = ledger.split_spec()
    ours = (hospital.test_fraction, hospital.validation_fraction)
    if spec is not None and spec.fractions() != ours:
        raise LedgerError(
            f"hospital 'test-fraction' {ours[0]} and 'validation-fraction' {ours[1]} differ "
            f"from the split fixed in the privacy ledger {ledger.path} (test "
            f"{spec.test_fraction}, validation {spec.validation_fraction}): a changed split "
            "would hold out records already trained on. Put the fractions back; this "
            "hospital refuses to go on until they match"
        )


def _say_if_asked_otherwise(hospital: HospitalConfig, run: RunConfig, spec: SplitSpec) -> None:
    """Log that the run's own split settings are not followed (they never are)."""
    data = run.data
    if data.test_fraction != spec.test_fraction:
        log.warning(
            "%s: the run asks data.test-fraction %s; this hospital keeps its own split "
            "(test %s, validation %s of its patients, fixed in its ledger) and trains on "
            "its own training part",
            hospital.name,
            data.test_fraction,
            spec.test_fraction,
            spec.validation_fraction,
        )
    if data.holdout == VALIDATION and spec.validation_fraction == 0.0:
        log.warning(
            "%s: the run evaluates on a validation part; this hospital keeps none "
            "(hospital validation-fraction = 0), so it declines to evaluate and "
            "trains on its own training part",
            hospital.name,
        )
