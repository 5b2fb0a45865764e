"""The coordinator's ``server.toml``: the ``[server]`` table and the ``[run]`` settings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_model.config import RunConfig
from shared_model.config.schema import (
    ConfigError,
    construct,
    flatten_toml,
    load_toml,
    parse_table,
)
from shared_model.config.schema import option as _opt

__all__ = ["ServerDeployConfig"]


@dataclass(frozen=True)
class ServerDeployConfig:
    """The coordinator's deployment: the ``[server]`` table of ``server.toml``."""

    address: str = _opt("0.0.0.0:9092", "host:port the SuperLink listens on.")
    state_dir: str = _opt("server-state", "SuperLink database, runs (checkpoints, metrics), logs.")
    root_certificates: str = _opt("", "The federation's CA certificate.")
    certificate: str = _opt("", "The SuperLink's TLS certificate (from `fedfusion certs`).")
    private_key: str = _opt("", "The SuperLink's TLS private key.")
    hospitals: str = _opt(
        "", "The hospitals' public key files to register: a TOML list (or '|'-separated)."
    )
    insecure: bool = _opt(False, "Plaintext, no TLS, no hospital authentication: development only.")
    timeout: float = _opt(86400.0, "Stop the run after this many seconds.", min=1.0)
    tracking: bool = _opt(True, "Log each run to MLflow (parameters, rounds, artifacts).")
    tracking_uri: str = _opt(
        "", "MLflow tracking URI; empty: the SQLite store runs/mlflow.db in the state directory."
    )
    tracking_experiment: str = _opt("fedfusion", "MLflow experiment the runs are logged under.")

    @classmethod
    def from_file(cls, path: Path) -> tuple[ServerDeployConfig, RunConfig, dict[str, Any]]:
        """Read ``server.toml``: the ``[server]`` table, and ``[run]`` run settings."""
        path = Path(path).expanduser().resolve()
        data = load_toml(path, "fedfusion server --config")
        table = data.get("server")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: needs a [server] table")
        if isinstance(table.get("hospitals"), list):
            table = {**table, "hospitals": "|".join(str(p) for p in table["hospitals"])}
        values = parse_table(cls, table, "server", "server file")
        for key in ("state_dir", "root_certificates", "certificate", "private_key"):
            if values.get(key) and not Path(values[key]).is_absolute():
                values[key] = str(path.parent / values[key])
        if values.get("hospitals"):
            values["hospitals"] = "|".join(
                p if Path(p).is_absolute() else str(path.parent / p)
                for p in values["hospitals"].split("|")
            )
        cfg = construct(cls, values, prefix="server")
        run_table = data.get("run", {})
        if not isinstance(run_table, dict):
            raise ConfigError(f"{path}: [run] must be a table of run settings")
        flat = flatten_toml(run_table)
        run = RunConfig.from_run_config(flat)
        cfg._check()
        return cfg, run, flat

    def _check(self) -> None:
        if not re.match(r"^[^\s:]+:\d{1,5}$", self.address):
            raise ConfigError(f"server.address: expected host:port, got {self.address!r}")
        if self.insecure:
            if self.root_certificates or self.certificate or self.private_key:
                raise ConfigError(
                    "server.insecure = true contradicts the TLS files given: "
                    "choose TLS or plaintext (development only)"
                )
            return
        for key, value in (
            ("root-certificates", self.root_certificates),
            ("certificate", self.certificate),
            ("private-key", self.private_key),
        ):
            if not value:
                raise ConfigError(
                    f"server.{key}: required for TLS (plaintext needs an "
                    "explicit server.insecure = true)"
                )
            if not Path(value).is_file():
                raise ConfigError(f"server.{key}: {value} does not exist")
        for pub in self.hospital_keys():
            if not Path(pub).is_file():
                raise ConfigError(f"server.hospitals: {pub} does not exist")

    def hospital_keys(self) -> list[str]:
        """Paths of the hospitals' public keys to register."""
        return [p for p in self.hospitals.split("|") if p]
