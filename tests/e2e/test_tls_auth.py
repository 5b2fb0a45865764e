"""The certificates from `fedfusion certs` work with real Flower processes on loopback.

A SuperLink with TLS and SuperNode authentication accepts a registered hospital, refuses
an unregistered hospital key, and a plaintext SuperNode cannot connect. Every process is
stopped by PID, even when an assertion fails.
"""

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.fault(
    "An unregistered hospital key, and a plaintext SuperNode against the TLS SuperLink",
    "Refused; the hospital exits at once, saying what to register or fix",
    "the federation (no unauthenticated hospital joins)",
)
def test_registered_hospital_joins_unregistered_and_plaintext_are_refused(deployment):
    d = deployment
    d.start_superlink()
    d.register("hospital-0")
    cmd, marker = d.hospital("hospital-0")
    d.start(cmd, "hospital-0.log", (marker,))
    d.wait_online(1)

    cmd, marker = d.hospital("hospital-1")  # its key was never registered
    code, log = d.run_to_exit(cmd, "unregistered.log", markers=(marker,))
    assert code == 1, log  # exits by itself, and says why in plain words
    assert "refused to let this hospital join. Either its key is not registered" in log
    assert "flwr supernode register hospital-1.pub" in log

    cmd, marker = d.hospital("hospital-0", tls=False)  # plaintext against TLS
    code, log = d.run_to_exit(cmd, "plaintext.log", markers=(marker,))
    assert code == 1, log
    assert "WITHOUT TLS" in log and "stopped with exit code" in log
