"""A hospital with its own data, its ledger started as a person starts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from client.dp.hospital_split import new_split
from client.dp.ledger_custody import init_ledger
from client.dp.policy import effective_policy
from shared_model.cli import build_app
from shared_model.config import HospitalConfig, PrivacyConfig
from shared_model.secagg_signatures import create_signing_key, public_line, write_members

__all__ = ["hospital_file", "started_hospital"]


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


def hospital_file(tmp_path, ledger: bool = True, **connection) -> Path:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs/ca.crt").write_text("ca")
    key = create_signing_key(tmp_path / "certs/h.key")
    write_members(tmp_path / "certs/members.toml", {"h": public_line(key)})
    (tmp_path / "m.csv").write_text("image,report,labels\n,x,normal\n")
    conn = {
        "server": '"127.0.0.1:9092"',
        "root-certificates": '"certs/ca.crt"',
        "private-key": '"certs/h.key"',
        **connection,
    }
    lines = [
        "[hospital]",
        'hospital-id = "h"',
        'data-manifest = "m.csv"',
        'state-dir = "state"',
        "max-epsilon = 3.0",
        "",
        "[connection]",
    ]
    lines += [f"{k} = {v}" for k, v in conn.items() if v is not None]
    path = tmp_path / "hospital.toml"
    path.write_text("\n".join(lines) + "\n")
    if ledger:  # as the hospital's operator does once, before its first start
        started = CliRunner().invoke(build_app(), ["ledger", "init", "--config", str(path)])
        assert started.exit_code == 0, started.output
    return path
