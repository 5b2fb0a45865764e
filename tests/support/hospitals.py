"""A hospital with its own data, its ledger started as a person starts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.dp.hospital_split import new_split
from client.dp.ledger_custody import init_ledger
from client.dp.policy import effective_policy
from shared_model.config import HospitalConfig, PrivacyConfig

__all__ = ["started_hospital"]


def started_hospital(tmp_path: Path, manifest: Path, **own: Any) -> HospitalConfig:
    """Hospital 'st-mary' on ``manifest`` whose ledger `fedfusion ledger init` started.

    Its state in ``tmp_path/state``, the backup in ``tmp_path/backup``; ``own``: more of
    its file's keys.
    """
    node = {
        "data-manifest": str(manifest),
        "hospital-id": "st-mary",
        "state-dir": str(tmp_path / "state"),
        "ledger-backup": str(tmp_path / "backup"),
        **own,
    }
    hospital = HospitalConfig.from_node_config(node)
    state = tmp_path / "state"
    policy = effective_policy(PrivacyConfig(), hospital)
    init_ledger(
        state, hospital.name, policy, hospital.ledger_backup_file(state), new_split(hospital)
    )
    return hospital
