"""The hospitals the coordinator has registered, read again at every SecAgg+ stage.

`fedfusion server` names its ``server.toml`` in the ServerApp's environment
(:data:`REGISTRY_ENV`). The SecAgg+ workflow (``server/app/flwr_compat.py``) checks each
hospital's signed key advertisement against the public keys that file lists *now*: a
hospital whose key the operator removes from ``server.hospitals`` while a run goes on is
refused at its next message, and the round completes with the others. A simulation has no
registry: its hospitals are all on one machine.
"""

from __future__ import annotations

import os
import tomllib
from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

from shared_model.secagg_signatures import Members, MembersError

__all__ = ["REGISTRY_ENV", "HospitalRegistry"]

REGISTRY_ENV = "FEDFUSION_HOSPITAL_REGISTRY"


class HospitalRegistry:
    """The ``server.hospitals`` public keys of a server file, re-read on every call."""

    def __init__(self, server_file: Path) -> None:
        self.path = Path(server_file)
        self.last: Members | None = None

    @classmethod
    def from_environment(cls) -> HospitalRegistry | None:
        """The registry `fedfusion server` named, or None (a simulation)."""
        path = os.environ.get(REGISTRY_ENV, "")
        return cls(Path(path)) if path else None

    def current(self) -> Members:
        """The registered hospitals now; an unreadable file keeps the last good reading."""
        try:
            table = tomllib.loads(self.path.read_text("utf-8")).get("server", {})
            listed = table.get("hospitals", [])
            paths = listed.split("|") if isinstance(listed, str) else list(listed)
            files = [Path(p) if Path(p).is_absolute() else self.path.parent / p for p in paths]
            lines = {f.stem: f.read_text("ascii") for f in files if str(f)}
            self.last = Members.from_lines(lines, f"{self.path} server.hospitals")
        except (OSError, tomllib.TOMLDecodeError, MembersError, UnicodeDecodeError) as err:
            if self.last is None:
                raise MembersError(f"cannot read the registered hospitals: {err}") from err
            log(WARNING, "[fedfusion] %s unreadable (%s): keeping its last reading", self.path, err)
        return self.last  # type: ignore[return-value]
