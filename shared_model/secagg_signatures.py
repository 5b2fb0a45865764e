"""Who takes part in secure aggregation, and what each member signs.

A coordinator that may lie can substitute its own SecAgg+ public keys for a hospital's,
invent members, or show each hospital a different view of who survived a round. The
hospitals defend themselves with signatures made by keys the coordinator cannot swap:

- **The members file** lists every member hospital's public signing key, agreed outside
  the coordinator (``fedfusion certs`` writes it; by default each key is the hospital's
  SuperNode key, the one the server registers). A hospital reads its own copy.
- **Key advertisement:** at key setup each hospital signs (run, round, its node id, the
  round's SecAgg+ parameters, its two fresh public keys). A hospital sends key shares
  only to neighbours whose advertisement verifies under the key the members file lists
  for the member named.
- **Survivor statement:** before anyone releases a share, each surviving hospital signs
  the set of hospitals that completed the key exchange and the set whose masked uploads
  arrived (Bonawitz et al., CCS 2017: the consistency round). A hospital signs one such
  statement per round and unmasks only with enough signatures over exactly its own.

Statements are canonical JSON behind a domain tag and :data:`SCHEME`, so a signature
made for one purpose, run, round or parameter set never verifies for another. Keys are
EC (P-256, P-384: ECDSA with SHA-256) or Ed25519, in OpenSSH or PEM form; signing is
done by ``cryptography`` (hand-written here: only the encodings).
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from shared_model.errors import ExplainedError
from shared_model.files import write_text_atomic

__all__ = [
    "MEMBERS_FILE",
    "Members",
    "MembersError",
    "PrivateKey",
    "PublicKey",
    "advert_statement",
    "create_signing_key",
    "load_private_key",
    "load_public_key",
    "public_line",
    "sign",
    "survivors_statement",
    "write_members",
]

MEMBERS_FILE = "members.toml"
_TABLE = "members"
_TAG = b"fedfusion-secagg-signed/1|"
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


class MembersError(ExplainedError, ValueError):
    """A members file or signing key that cannot be used; the message says why."""


def _statement(kind: str, fields: Mapping[str, object]) -> bytes:
    body = json.dumps({"kind": kind, **fields}, sort_keys=True, separators=(",", ":"))
    return _TAG + body.encode("utf-8")


def advert_statement(
    run: int, server_round: int, node: int, plan: tuple[int, int, int], pk1: bytes, pk2: bytes
) -> bytes:
    """What a hospital signs at key setup: its fresh keys, bound to run, round and plan.

    ``plan`` is (hospitals sampled, shares, threshold) as the hospital was told them.
    """
    return _statement(
        "advert",
        {
            "run": run,
            "round": server_round,
            "node": node,
            "plan": list(plan),
            "pk1": pk1.hex(),
            "pk2": pk2.hex(),
        },
    )


def survivors_statement(
    run: int,
    server_round: int,
    plan: tuple[int, int, int],
    completed: Iterable[int],
    survivors: Iterable[int],
    keys: Mapping[int, tuple[bytes, bytes]] | None = None,
) -> bytes:
    """What a surviving hospital signs before unmasking: one view of the round.

    ``completed``: the node ids that completed the key exchange; ``survivors``: those
    whose masked uploads are in the sum (both sorted here); ``keys``: the completed
    hospitals' public keys of this round, node id -> (pk1, pk2), so that a signature
    belongs to this round's keys and no other run of the same round (None: not bound).
    """
    digest = ""
    if keys is not None:
        listed = [[n, keys[n][0].hex(), keys[n][1].hex()] for n in sorted(keys)]
        digest = hashlib.sha256(json.dumps(listed, separators=(",", ":")).encode()).hexdigest()
    return _statement(
        "survivors",
        {
            "run": run,
            "round": server_round,
            "plan": list(plan),
            "completed": sorted(completed),
            "survivors": sorted(survivors),
            "keys": digest,
        },
    )


def sign(key: PrivateKey, statement: bytes) -> bytes:
    """The signature of ``statement`` by ``key``."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(statement)
    return key.sign(statement, ec.ECDSA(hashes.SHA256()))


def _verify(key: PublicKey, signature: bytes, statement: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, statement)
        else:
            key.verify(signature, statement, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def _usable(key: object, where: str) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise MembersError(f"{where}: EC curve {key.curve.name} is not P-256 or P-384")
        return
    if not isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        raise MembersError(f"{where}: a {type(key).__name__}, not an EC or Ed25519 key")


def load_private_key(path: str | Path) -> PrivateKey:
    """A signing key from an OpenSSH or PEM file (MembersError naming the problem)."""
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MembersError(f"cannot read the SecAgg+ signing key {path}: {err.strerror}") from err
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key = serialization.load_ssh_private_key(data, None)
        else:
            key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as err:
        raise MembersError(f"{path} is not an unencrypted OpenSSH or PEM private key") from err
    _usable(key, str(path))
    return key  # type: ignore[return-value]


def load_public_key(text: str | bytes, where: str) -> PublicKey:
    """A public key from an OpenSSH line or a PEM block (MembersError naming ``where``)."""
    data = text.encode() if isinstance(text, str) else text
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, IndexError) as err:
        raise MembersError(f"{where}: not an OpenSSH or PEM public key") from err
    _usable(key, where)
    return key  # type: ignore[return-value]


def public_line(key: PrivateKey | PublicKey) -> str:
    """The OpenSSH line of a key's public half (what a members file holds)."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    raw = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)  # type: ignore[union-attr]
    return raw.decode("ascii")


def create_signing_key(path: Path) -> PrivateKey:
    """A new P-256 signing key at ``path`` (0600, OpenSSH), its public line beside (.pub).

    The file is created exclusively: an existing key is never replaced.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    # mode=None: a public key is for others to read
    write_text_atomic(path.with_suffix(".pub"), public_line(key) + "\n", mode=None)
    return key


def write_members(path: Path, keys: Mapping[str, str]) -> None:
    """Write a members file: each member's name and public key line, sorted by name."""
    lines = [
        "# The hospitals of this federation and their public signing keys, agreed outside",
        "# the coordinator. Every hospital keeps its own copy (secagg-members).",
        f"[{_TABLE}]",
        *(f"{json.dumps(name)} = {json.dumps(keys[name].strip())}" for name in sorted(keys)),
    ]
    # mode=None: every hospital keeps a copy of this file; it holds no secret
    write_text_atomic(path, "\n".join(lines) + "\n", mode=None)


@dataclass(frozen=True)
class Members:
    """The federation's members and their public signing keys, from a file the hospital keeps."""

    keys: Mapping[str, PublicKey]
    source: str

    @classmethod
    def load(cls, path: str | Path) -> Members:
        """Read a members file (``[members]`` name = key line) or a folder of ``*.pub`` files.

        A file or folder read before, unchanged since (same names, sizes and modification
        times), is not parsed again: a simulation's hospitals share one process.
        """
        path = Path(path).expanduser()
        stamp = _stamp(path)
        if stamp is not None and _LOADED.get(path) is not None and _LOADED[path][0] == stamp:
            return _LOADED[path][1]
        if path.is_dir():
            lines = {p.stem: p.read_text("ascii") for p in sorted(path.glob("*.pub"))}
        else:
            try:
                table = tomllib.loads(path.read_text("utf-8")).get(_TABLE)
            except OSError as err:
                raise MembersError(f"cannot read the members file {path}: {err.strerror}") from err
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
                raise MembersError(f"the members file {path} is not valid TOML: {err}") from err
            if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
                raise MembersError(f'{path}: expected a [{_TABLE}] table of name = "key line"')
            lines = table
        members = cls.from_lines(lines, str(path))
        if stamp is not None:
            _LOADED[path] = (stamp, members)
        return members

    @classmethod
    def from_lines(cls, lines: Mapping[str, str], source: str) -> Members:
        """Members from name -> public key line (MembersError naming a bad one)."""
        if not lines:
            raise MembersError(f"{source} lists no members")
        keys = {n: load_public_key(line, f"{source}: member {n!r}") for n, line in lines.items()}
        fingerprints = [_fingerprint(k) for k in keys.values()]
        if len(set(fingerprints)) != len(fingerprints):
            raise MembersError(f"{source}: two members share one public key")
        return cls(keys, source)

    def verify(self, member: str, signature: bytes, statement: bytes) -> bool:
        """Whether ``member`` is listed and its listed key signed ``statement``."""
        key = self.keys.get(member)
        return key is not None and _verify(key, signature, statement)

    def holds(self, member: str, key: PrivateKey) -> bool:
        """Whether the file lists ``member`` with the public half of ``key``."""
        listed = self.keys.get(member)
        return listed is not None and _fingerprint(listed) == _fingerprint(key.public_key())


_LOADED: dict[Path, tuple[tuple, Members]] = {}  # path -> (its stamp, what it held)


def _stamp(path: Path) -> tuple | None:
    """Names, sizes and modification times of a members file or folder (None: unreadable).

    A folder is listed with one stat per file (``os.scandir``): a hospital stamps it at
    every SecAgg+ message, and a simulation's folder holds every hospital's key.
    """
    try:
        if not path.is_dir():
            info = path.stat()
            return ((path.name, info.st_size, info.st_mtime_ns),)
        found = []
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.endswith(".pub"):  # what load() reads: *.pub
                    info = entry.stat()
                    found.append((entry.name, info.st_size, info.st_mtime_ns))
        return tuple(sorted(found))
    except OSError:
        return None


def _fingerprint(key: PublicKey) -> str:
    raw = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(raw).hexdigest()
