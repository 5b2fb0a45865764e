"""A hospital's ``[connection]`` table: how its SuperNode reaches the server."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shared_model.config.schema import ConfigError, construct, load_toml, parse_table
from shared_model.config.schema import option as _opt

__all__ = ["ConnectionConfig"]


@dataclass(frozen=True)
class ConnectionConfig:
    """How a hospital's SuperNode reaches the server: the ``[connection]`` table."""

    server: str = _opt("", "The SuperLink's address, host:port.")
    root_certificates: str = _opt("", "The CA certificate the server's TLS certificate chains to.")
    private_key: str = _opt("", "This hospital's OpenSSH EC private key (its registered identity).")
    port: int = _opt(9094, "Local port of the SuperNode's ClientApp API.", min=1, max=65535)
    insecure: bool = _opt(False, "Plaintext, no TLS: development only (prints a warning).")
    poll_interval: float = _opt(
        0.5,
        "Seconds between an idle SuperNode's requests for work (Flower's own: 3); each "
        "costs the server one small request per hospital.",
        min=0.05,
        max=60.0,
    )
    heartbeat_interval: float = _opt(
        30.0,
        "Seconds between this hospital's heartbeats (Flower's default: 30). The server "
        "counts a hospital offline two intervals after its last one: a crashed hospital "
        "stops holding up a round, and can rejoin, that much sooner; each costs one small "
        "request.",
        min=10.0,
        max=1800.0,
    )
    rejoin_timeout: float = _opt(
        120.0,
        "Seconds a restarted hospital retries joining while the server still counts its "
        "previous connection as online (it frees it two heartbeat intervals after the last "
        "heartbeat); 0 gives up at once.",
        min=0.0,
        max=3600.0,
    )

    @classmethod
    def from_file(cls, path: Path) -> ConnectionConfig:
        """Read and check the ``[connection]`` table of a hospital file."""
        path = Path(path).expanduser().resolve()
        table = load_toml(path, "fedfusion hospital --config").get("connection")
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: needs a [connection] table (server, root-certificates, private-key)"
            )
        values = parse_table(cls, table, "connection", "hospital file")
        for key in ("root_certificates", "private_key"):  # relative to the file
            if values.get(key) and not Path(values[key]).is_absolute():
                values[key] = str(path.parent / values[key])
        cfg = construct(cls, values, prefix="connection")
        cfg._check()
        return cfg

    def _check(self) -> None:
        if 0 < self.rejoin_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(
                f"connection.rejoin-timeout {self.rejoin_timeout:g}s is shorter than the "
                f"{2 * self.heartbeat_interval:g}s after which the server frees a crashed "
                "hospital's connection (two connection.heartbeat-interval): a restart would "
                "give up before it can rejoin; raise rejoin-timeout (or 0: never retry)"
            )
        if not re.match(r"^[^\s:]+:\d{1,5}$", self.server):
            raise ConfigError(f"connection.server: expected host:port, got {self.server!r}")
        if self.insecure and self.root_certificates:
            raise ConfigError(
                "connection.insecure = true contradicts connection.root-certificates:"
                " choose TLS (give the CA) or plaintext (development only)"
            )
        if not self.insecure and not self.root_certificates:
            raise ConfigError(
                "connection.root-certificates: the CA certificate is required "
                "(plaintext needs an explicit connection.insecure = true)"
            )
        for key, value in (
            ("root-certificates", self.root_certificates),
            ("private-key", self.private_key),
        ):
            if key == "root-certificates" and self.insecure:
                continue
            if not value:
                raise ConfigError(f"connection.{key}: missing")
            if not Path(value).is_file():
                raise ConfigError(f"connection.{key}: {value} does not exist")
