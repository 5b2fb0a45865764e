"""Who may start a privacy ledger, where its backup lives, and how it comes back.

A deleted ledger used to come back empty by itself: the hospital then trained again from
epsilon 0 (and released a fresh noisy record count). Now a hospital with its own data
never starts one alone. A person runs ``fedfusion ledger init`` once, which refuses a
state directory that shows earlier use (a cache, an evaluation log, evidence, a backup):
its ledger was lost, and its patients' epsilon does not restart because a file is gone.
``fedfusion ledger restore`` puts the backup back.

The backup is a second copy written at every save (``hospital.ledger-backup``; default
``<state-dir>/ledger-backup/``, better on other storage). The ledger's entries are
hash-chained, so the backup's entries must be the ledger's first ones: an edit with a
recomputed checksum, a rollback or a replacement shows (``PrivacyLedger.open``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from client.dp.ledger import (
    LEDGER_FILENAME,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
)
from client.dp.policy import PrivacyPolicy
from shared_model.split import SplitSpec

__all__ = [
    "check_against_backup",
    "earlier_use",
    "init_ledger",
    "missing_ledger",
    "open_ledger",
    "restore_ledger",
    "write_backup",
]

# What a hospital leaves in its state directory once it has taken part.
_TRACES = (
    "evaluation.jsonl",
    "supernode.json",
    "image-cache",
    "feature-cache",
    "secagg-evidence",
    "ledger-backup",
)
_INIT = "fedfusion ledger init --config <the hospital's file>"


def check_against_backup(ledger: PrivacyLedger) -> None:
    """LedgerError unless the backup holds this ledger, or it less its last release.

    The ledger is written before its backup, so a crash between the two leaves the
    ledger one release ahead; anything else is an edit, a rollback or a replacement. A
    ledger without its backup is refused too (also one of the previous format: a person
    writes its first backup with ``fedfusion ledger backup``).
    """
    if ledger.backup is None:
        return
    if _same_file(ledger.backup, ledger.path):
        raise LedgerError(
            f"the ledger's backup {ledger.backup} is the ledger itself: it checks nothing "
            "(hospital.ledger-backup must name a folder of its own)"
        )
    if not ledger.backup.is_file():
        raise LedgerError(
            f"privacy ledger {ledger.path} has no backup at {ledger.backup}, so it cannot "
            "be checked (the backup was deleted, or its storage is not mounted). "
            "This hospital refuses to train: put the backup back, or, once your "
            "privacy officer has checked the ledger, `fedfusion ledger backup "
            "--config <the hospital's file>` writes a new one"
        )
    kept = PrivacyLedger.from_json(ledger.backup.read_bytes(), ledger.backup)
    chain = [e.chain for e in ledger.history]
    # A split is fixed once: the backup may lack it (a crash before the backup's write,
    # the ledger then fixed on top of the backup's history), never disagree.
    if kept.split is None and ledger.split is not None:
        split_moved = ledger.split.get("since_release") != len(kept.history)
    else:
        split_moved = kept.split != ledger.split
    # Likewise whom epsilon protects: it may change only while neither holds a release, or
    # be fixed per record on a ledger from before the unit was kept.
    legacy = kept.unit is None and ledger.unit == "record"
    released = bool(kept.history or ledger.history)
    unit_moved = kept.unit != ledger.unit and released and not legacy
    if (
        kept.genesis != ledger.genesis
        or chain[: len(kept.history)] != [e.chain for e in kept.history]
        or len(ledger.history) > len(kept.history) + 1
        or split_moved
        or unit_moved
    ):
        what = (
            "its train/held-out split is not the backup's"
            if split_moved
            else "whom its epsilon protects (patient or record) is not the backup's"
            if unit_moved
            else f"the backup holds {len(kept.history)} release(s), the ledger "
            f"{len(ledger.history)}, not the same ones"
        )
        raise LedgerError(
            f"privacy ledger {ledger.path} disagrees with its backup {ledger.backup} ({what}): "
            "it was edited, rolled back or replaced. This hospital "
            "refuses to train; `fedfusion ledger restore` puts the backup back"
        )


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (also through links)."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def earlier_use(state_dir: Path, backup: Path | None) -> list[str]:
    """What in ``state_dir`` (and the backup) shows that this hospital took part before."""
    found = [name for name in _TRACES if (Path(state_dir) / name).exists()]
    if backup is not None and backup.exists() and str(backup) not in found:
        found.append(str(backup))
    return found


def missing_ledger(state_dir: Path, backup: Path | None) -> LedgerError:
    """Why there is no ledger in ``state_dir``, and what a person should do."""
    where = Path(state_dir) / LEDGER_FILENAME
    if backup is not None and backup.is_file():
        return LedgerError(
            f"no privacy ledger at {where}, but its backup {backup} exists: the ledger was "
            "deleted. This hospital refuses to train; `fedfusion ledger restore --config "
            "<the hospital's file>` puts the backup back"
        )
    traces = earlier_use(state_dir, backup)
    if traces:
        return LedgerError(
            f"no privacy ledger at {where}, but this state directory was used before "
            f"({', '.join(traces)}): its ledger was lost, and its patients' epsilon does not "
            "restart because a file is gone. This hospital refuses to train: restore the "
            f"ledger from a backup; only if your privacy officer accepts a fresh start, "
            f"`{_INIT} --fresh-start`"
        )
    return LedgerError(
        f"no privacy ledger at {where}: a hospital's ledger is started once, by a person: "
        f"`{_INIT}`. If this hospital took part before (its state directory or volume was "
        "lost), do not: restore its ledger and backup instead, or its patients' epsilon "
        "restarts from zero"
    )


def open_ledger(
    state_dir: Path,
    hospital: str,
    policy: PrivacyPolicy,
    seen: Sequence[LedgerEntry],
    backup: Path,
    allow_new: bool,
) -> PrivacyLedger:
    """The hospital's ledger, checked against its backup; a missing one explained.

    ``allow_new``: a simulated hospital (the public embedded data) starts one by itself.
    """
    if not (Path(state_dir) / LEDGER_FILENAME).exists() and not allow_new:
        raise missing_ledger(state_dir, backup)
    ledger = PrivacyLedger.open(
        state_dir, hospital, policy, seen, backup=backup, allow_new=allow_new
    )
    if ledger.path.exists():
        check_against_backup(ledger)
    return ledger


def init_ledger(
    state_dir: Path,
    hospital: str,
    policy: PrivacyPolicy,
    backup: Path,
    split: SplitSpec,
    fresh_start: bool = False,
) -> PrivacyLedger:
    """Start this hospital's ledger, empty but for its split, with its backup.

    LedgerError if it may not (a ledger exists, or the state directory shows earlier use).
    """
    path = Path(state_dir) / LEDGER_FILENAME
    if path.exists():
        raise LedgerError(f"{path} already exists: a hospital's ledger is started once")
    if backup.is_file():
        raise missing_ledger(state_dir, backup)
    traces = earlier_use(state_dir, None)
    if traces and not fresh_start:
        raise missing_ledger(state_dir, None)
    ledger = PrivacyLedger.empty(path, hospital, policy, backup)
    backup.parent.mkdir(parents=True, exist_ok=True)
    ledger.record_split(split)
    return ledger


def write_backup(state_dir: Path, backup: Path) -> PrivacyLedger:
    """Write a missing backup from the ledger (verified); LedgerError if one exists."""
    if backup.exists():
        raise LedgerError(f"{backup} exists: a backup is only written anew when it is lost")
    path = Path(state_dir) / LEDGER_FILENAME
    if not path.is_file():
        raise LedgerError(f"no privacy ledger at {path} to back up")
    ledger = PrivacyLedger.from_json(path.read_bytes(), path)
    ledger.backup = backup
    backup.parent.mkdir(parents=True, exist_ok=True)
    ledger.save()
    return ledger


def restore_ledger(state_dir: Path, hospital: str, backup: Path) -> PrivacyLedger:
    """Put the backup back as the ledger; LedgerError if there is none or a ledger exists."""
    path = Path(state_dir) / LEDGER_FILENAME
    if path.exists():
        raise LedgerError(
            f"{path} exists: restoring would replace it (move it aside first if you are "
            "sure the backup is the ledger to keep)"
        )
    if not backup.is_file():
        raise LedgerError(f"no ledger backup at {backup} to restore")
    kept = PrivacyLedger.from_json(backup.read_bytes(), backup)  # verified before it is used
    if kept.hospital != hospital:
        raise LedgerError(f"the backup {backup} is the ledger of {kept.hospital}, not {hospital}")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(backup, path)
    kept.path, kept.backup = path, backup
    return kept
