"""Certificates and keys for a deployment, built on ``cryptography``.

- A certificate authority (CA) that the SuperLink's TLS certificate chains to, and that
  every hospital's SuperNode trusts (``--root-certificates ca.crt``).
- A server certificate for the SuperLink, with every name and address hospitals use to
  reach it as subject alternative names (``127.0.0.1`` is needed on loopback).
- One EC (P-256) key pair per hospital, in OpenSSH format, for Flower's SuperNode
  authentication: the SuperLink registers the public key
  (``flwr supernode register <name>.pub``) and the hospital keeps the private key
  (``--auth-supernode-private-key``).

Layout under the output directory::

    ca/ca.key, ca/ca.crt
    server/server.key, server/server.pem, server/ca.crt
    hospitals/<name>/<name>.key, hospitals/<name>/<name>.pub, hospitals/<name>/ca.crt
    members.toml, hospitals/<name>/members.toml

``members.toml`` lists every hospital's public key: the federation's members, whose
SecAgg+ key advertisements a hospital accepts (``shared_model/secagg_signatures.py``).
Where hospitals make their own keys, ``fedfusion certs members`` builds it from their
.pub files and prints each key's fingerprint, for the hospitals to compare among
themselves, away from the coordinator.

Private keys are written with mode 0600 in directories with mode 0700; certificates and
public keys with 0644. Nothing is ever overwritten: an existing CA or key is an error,
because replacing it silently would lock out every site that trusts the old one.
A hospital can also make its own key pair (``fedfusion certs hospital``) and send only
the public key to the server operator: the private key then never leaves the hospital.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_model.secagg_signatures import (
    MEMBERS_FILE,
    Members,
    MembersError,
    load_public_key,
    write_members,
)

__all__ = [
    "CertError",
    "CertPaths",
    "create_ca",
    "create_deployment",
    "create_hospital_key",
    "create_members",
    "create_server_cert",
    "fingerprint",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CertError(RuntimeError):
    """A certificate or key cannot be created; the message says why."""


@dataclass(frozen=True)
class CertPaths:
    """Where a created certificate or key pair lives."""

    key: Path
    cert_or_public: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    if path.exists():
        raise CertError(f"{path} already exists; refusing to overwrite a key or certificate")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    path.chmod(mode)  # independent of the umask


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise CertError(
            f"hospital name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(out: Path, common_name: str = "fedfusion CA", days: int = 3650) -> CertPaths:
    """Create the CA key (0600) and self-signed certificate under ``out/ca``."""
    folder = _private_dir(out / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(folder / "ca.key", _pem_key(key), 0o600)
    _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CertPaths(folder / "ca.key", folder / "ca.crt")


def _load_ca(ca_dir: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    except (OSError, ValueError) as err:
        raise CertError(f"cannot load the CA from {ca_dir}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{ca_dir / 'ca.key'} is not an EC private key")
    return key, cert


def _san(entry: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        pass
    if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]{0,252})$", entry):
        raise CertError(f"server name {entry!r} is neither an IP address nor a DNS name")
    return x509.DNSName(entry)


def create_server_cert(
    out: Path, sans: list[str], ca_dir: Path | None = None, days: int = 825
) -> CertPaths:
    """Create the SuperLink's key and certificate (signed by the CA) under ``out/server``.

    ``sans``: every DNS name or IP address hospitals use to reach the server.
    """
    if not sans:
        raise CertError("give at least one server name or address (e.g. 127.0.0.1)")
    ca_key, ca_cert = _load_ca(ca_dir or out / "ca")
    folder = _private_dir(out / "server")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(folder / "server.key", _pem_key(key), 0o600)
    _write(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if not (folder / "ca.crt").exists():
        shutil.copyfile(ca_dir / "ca.crt" if ca_dir else out / "ca" / "ca.crt", folder / "ca.crt")
    return CertPaths(folder / "server.key", folder / "server.pem")


def create_hospital_key(out: Path, name: str) -> CertPaths:
    """Create one hospital's EC key pair, OpenSSH format, under ``out/hospitals/<name>``."""
    folder = _private_dir(out / "hospitals" / _check_name(name))
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(folder / f"{name}.key", private, 0o600)
    _write(folder / f"{name}.pub", public + f" fedfusion-{name}\n".encode(), 0o644)
    ca = out / "ca" / "ca.crt"
    if ca.exists() and not (folder / "ca.crt").exists():
        shutil.copyfile(ca, folder / "ca.crt")
    return CertPaths(folder / f"{name}.key", folder / f"{name}.pub")


def fingerprint(public_line: str) -> str:
    """A public key's SHA-256 fingerprint, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def create_members(out_file: Path, public_keys: list[Path]) -> dict[str, str]:
    """Write a members file from hospitals' .pub files (name: the file's stem).

    Returns name -> fingerprint. The file is replaced if it exists (it holds no secret).
    """
    lines: dict[str, str] = {}
    for pub in public_keys:
        name = _check_name(Path(pub).stem)
        if name in lines:
            raise CertError(f"two public key files for {name}")
        try:
            lines[name] = Path(pub).read_text("ascii").strip()
            load_public_key(lines[name], str(pub))
        except (OSError, UnicodeDecodeError, MembersError) as err:
            raise CertError(f"{pub}: not a readable OpenSSH public key ({err})") from err
    try:
        Members.from_lines(lines, str(out_file))
    except MembersError as err:
        raise CertError(str(err)) from err
    write_members(out_file, lines)
    return {name: fingerprint(line) for name, line in lines.items()}


def create_deployment(out: Path, sans: list[str], hospitals: list[str]) -> dict[str, CertPaths]:
    """CA, server certificate, one key pair per hospital and the members file, in one go."""
    if len(set(hospitals)) != len(hospitals):
        raise CertError(f"hospital names must be distinct: {hospitals}")
    for name in hospitals:
        _check_name(name)
    created = {"ca": create_ca(out)}
    created["server"] = create_server_cert(out, sans)
    for name in hospitals:
        created[name] = create_hospital_key(out, name)
    if hospitals:
        create_members(out / MEMBERS_FILE, [created[n].cert_or_public for n in hospitals])
        for name in hospitals:  # each hospital's copy, beside its key
            shutil.copyfile(out / MEMBERS_FILE, out / "hospitals" / name / MEMBERS_FILE)
    return created
