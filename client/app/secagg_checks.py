"""The pieces of a hospital's SecAgg+ checks: refusals, message readers, signing keys.

``client/app/secagg_guard.py`` (key setup, key sharing, masked upload) and
``client/app/secagg_survivors.py`` (the consistency round and unmasking) use them.
``signing_keys`` loads what a hospital signs with and trusts: its private signing key and
its own copy of the federation's members file (``shared_model/secagg_signatures.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord

from shared_model.config import HospitalConfig, SecAggConfig
from shared_model.errors import ExplainedError
from shared_model.protocol import SecAggSigned
from shared_model.secagg_signatures import (
    MEMBERS_FILE,
    Members,
    PrivateKey,
    create_signing_key,
    load_private_key,
)

__all__ = [
    "SIM_MEMBERS_ENV",
    "SecAggRefusedError",
    "SigningKeys",
    "distinct",
    "node_ids",
    "signed_entries",
    "signing_keys",
    "sparse_share_floor",
]

_SIM_MEMBERS = "secagg-members"  # a simulation's members folder, under its output-dir
# Or where a process that runs simulated hospitals in-process wants it (tests, benchmarks).
SIM_MEMBERS_ENV = "FEDFUSION_SIM_MEMBERS"


class SecAggRefusedError(ExplainedError, ValueError):
    """A SecAgg+ message the hospital will not answer; ``code`` names the reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code


def sparse_share_floor(hospitals: int) -> int:
    """Fewest shares accepted below a complete graph: 2 * ceil(log2 n) + 1.

    The same number the server plans with secagg.sparse (``SecAggConfig.sparse_shares``); below
    n it is never under 7, as 2 * ceil(log2 n) + 1 >= n for n <= 7.
    """
    return SecAggConfig.sparse_shares(hospitals)


@dataclass(frozen=True)
class SigningKeys:
    """A hospital's member name, its private signing key and the members file it trusts."""

    name: str
    signing: PrivateKey
    members: Members


def signing_keys(hospital: HospitalConfig, output_dir: str = "") -> SigningKeys:
    """The hospital's signing key and members file, as its config says (or defaults).

    ``output_dir``: the run's, where simulated hospitals keep theirs. Raises
    SecAggRefusedError or MembersError naming what is missing.
    """
    sim_folder = Path(os.environ.get(SIM_MEMBERS_ENV, "") or Path(output_dir) / _SIM_MEMBERS)
    path = Path(hospital.secagg_signing_key).expanduser() if hospital.secagg_signing_key else None
    if path is None and hospital.simulated:
        path = sim_folder / f"{hospital.name}.key"
        if not path.exists():
            create_signing_key(path)
    if path is None:
        raise SecAggRefusedError(
            "no-signing-key",
            "this hospital has no SecAgg+ signing key: set secagg-signing-key in its file "
            "(`fedfusion hospital` uses [connection] private-key)",
        )
    signing = load_private_key(path)
    if hospital.secagg_members:
        members_path = Path(hospital.secagg_members).expanduser()
    else:
        members_path = sim_folder if hospital.simulated else path.parent / MEMBERS_FILE
    members = Members.load(members_path)
    if not members.holds(hospital.name, signing):
        raise SecAggRefusedError(
            "not-a-member",
            f"the members file {members.source} does not list {hospital.name} with this "
            "hospital's signing key, so no other hospital would accept its keys",
        )
    return SigningKeys(hospital.name, signing, members)


def node_ids(values: Any, what: str) -> list[int]:
    """``values`` as node ids, or a refusal naming ``what``."""
    if not isinstance(values, list) or not all(type(v) is int for v in values):
        raise SecAggRefusedError("malformed", f"{what} is not a list of node ids")
    return list(values)


def signed_entries(record: ConfigRecord, what: str) -> list[tuple[int, str, bytes]]:
    """(node id, member, signature) triples of a record's parallel lists."""
    nodes = node_ids(record.get(SecAggSigned.NODES), f"{what}' node ids")
    members, sigs = record.get(SecAggSigned.MEMBERS), record.get(SecAggSigned.SIGS)
    if (
        not isinstance(members, list)
        or not isinstance(sigs, list)
        or not all(isinstance(m, str) for m in members)
        or not all(isinstance(g, bytes) for g in sigs)
        or not len(nodes) == len(members) == len(sigs)
    ):
        raise SecAggRefusedError(
            "malformed", f"{what}: node ids, member names and signatures do not line up"
        )
    return list(zip(nodes, members, sigs, strict=True))


def distinct(values: list[int], what: str) -> set[int]:
    """``values`` as a set, or a refusal if one repeats."""
    if len(set(values)) != len(values):
        raise SecAggRefusedError("duplicate-id", f"{what} names a hospital more than once")
    return set(values)
