"""Shared loopback deployment (tests/support/loopback.py), stopped by PID even when a test fails."""

from __future__ import annotations

import pytest

from tests.support.loopback import LoopbackDeployment


@pytest.fixture
def deployment(tmp_path):
    d = LoopbackDeployment(tmp_path)
    try:
        yield d
    finally:
        assert d.stop_all() == []
