"""fedfusion certs: a CA, a server certificate with SANs, hospital key pairs."""

import base64
import hashlib
import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from server.commands.certs import CertError, create_deployment, create_hospital_key
from shared_model.cli import build_app
from shared_model.secagg_signatures import Members, MembersError, load_private_key


@pytest.fixture
def certs(tmp_path):
    create_deployment(
        tmp_path, ["127.0.0.1", "localhost", "fl.example.org"], ["hospital-0", "st-mary"]
    )
    return tmp_path


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_chains_to_the_ca_with_the_right_names(certs):
    ca = x509.load_pem_x509_certificate((certs / "ca/ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server/server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_private(certs):
    for key in [
        certs / "ca/ca.key",
        certs / "server/server.key",
        certs / "hospitals/hospital-0/hospital-0.key",
    ]:
        assert mode(key) == 0o600, key
        assert mode(key.parent) == 0o700, key.parent
    assert mode(certs / "server/server.pem") == 0o644
    assert mode(certs / "hospitals/st-mary/st-mary.pub") == 0o644


def test_hospital_keys_are_openssh_ec_pairs(certs):
    folder = certs / "hospitals/st-mary"
    private = serialization.load_ssh_private_key((folder / "st-mary.key").read_bytes(), None)
    public = serialization.load_ssh_public_key((folder / "st-mary.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert (folder / "ca.crt").read_bytes() == (certs / "ca/ca.crt").read_bytes()


def test_nothing_is_ever_overwritten(certs):
    before = (certs / "ca/ca.key").read_bytes()
    with pytest.raises(CertError, match="refusing to overwrite"):
        create_deployment(certs, ["127.0.0.1"], ["other"])
    with pytest.raises(CertError, match="refusing to overwrite"):
        create_hospital_key(certs, "st-mary")
    assert (certs / "ca/ca.key").read_bytes() == before


@pytest.mark.parametrize("name", ["", "../evil", "a b", "-x"])
def test_bad_hospital_names_are_refused(tmp_path, name):
    with pytest.raises(CertError, match="hospital name"):
        create_hospital_key(tmp_path, name)


def test_a_tls_client_trusting_the_ca_accepts_the_server_on_loopback(certs):
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs / "server/server.pem", certs / "server/server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca/ca.crt"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.recv(2) == b"ok"  # hostname (IP SAN) and chain both verified
    thread.join(5)
    listener.close()


def test_the_members_file_lists_every_hospital_key_and_each_hospital_keeps_a_copy(certs):
    members = Members.load(certs / "members.toml")
    assert sorted(members.keys) == ["hospital-0", "st-mary"]
    for name in members.keys:
        key = load_private_key(certs / f"hospitals/{name}/{name}.key")
        assert members.holds(name, key)
        assert not members.holds("st-mary" if name == "hospital-0" else "hospital-0", key)
        copy = certs / f"hospitals/{name}/members.toml"
        assert copy.read_text() == (certs / "members.toml").read_text()


def test_certs_members_builds_the_file_from_public_keys_with_fingerprints(tmp_path):
    pubs = [create_hospital_key(tmp_path, name).cert_or_public for name in ("a", "b")]
    runner = CliRunner()
    out = tmp_path / "members.toml"
    result = runner.invoke(build_app(), ["certs", "members", *map(str, pubs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(Members.load(out).keys) == ["a", "b"]
    for pub in pubs:  # the fingerprint ssh-keygen -l prints for the same key
        blob = base64.b64decode(pub.read_text().split()[1])
        expected = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        assert f"SHA256:{expected}" in result.output
    # one key under two names is refused: a member would count twice
    (tmp_path / "c.pub").write_text(pubs[0].read_text())
    twice = runner.invoke(build_app(), ["certs", "members", str(pubs[0]), str(tmp_path / "c.pub")])
    assert twice.exit_code == 2 and "two members share one public key" in twice.output
    broken = tmp_path / "d.pub"
    broken.write_text("ssh-ed25519 not-base64")
    bad = runner.invoke(build_app(), ["certs", "members", str(broken), "--out", str(out)])
    assert bad.exit_code == 2 and "d.pub" in bad.output


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[members]\na = 1\n", 'name = "key line"'),
        ("[members\n", "not valid TOML"),
        ('[members]\na = "ssh-rsa AAAA"\n', "not an OpenSSH or PEM public key"),
        ("[other]\n", 'name = "key line"'),
    ],
)
def test_a_bad_members_file_is_refused_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "members.toml"
    path.write_text(text)
    with pytest.raises(MembersError, match=problem):
        Members.load(path)
