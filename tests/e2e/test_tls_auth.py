"""The certificates from `fedfusion certs` work with real Flower processes on loopback.

A SuperLink with TLS and SuperNode authentication accepts a registered hospital, refuses
an unregistered hospital key, and a plaintext SuperNode cannot connect. Every process is
stopped by PID, even when an assertion fails.
"""

import pytest

pytestmark = pytest.mark.slow


def test_registered_hospital_joins_unregistered_and_plaintext_are_refused(deployment):
    d = deployment
    d.register("hospital-0")
    d.start(d.supernode("hospital-0"), "hospital-0.log")
    d.wait_online(1)

    code, log = d.run_to_exit(d.supernode("hospital-1"), "unregistered.log")
    assert code not in (0, None), log  # exits by itself, with an error
    assert "Failed to activate SuperNode" in log

    code, log = d.run_to_exit(d.supernode("hospital-0", tls=False), "plaintext.log")
    assert code not in (0, None), log
