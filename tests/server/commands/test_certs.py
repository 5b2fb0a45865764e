"""fedfusion certs: a CA, a server certificate with SANs, hospital key pairs."""

import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.commands.certs import CertError, create_deployment, create_hospital_key


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
