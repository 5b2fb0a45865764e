"""How thorough a test run is: the fast tier (``make check``) or the full one (``make test``)."""

from __future__ import annotations

import os

__all__ = ["FAST", "examples"]

# `make check` sets it: the edit-test loop, under 3 minutes on 2 cores
FAST = os.environ.get("FEDFUSION_TEST_TIER") == "fast"


def examples(full: int) -> int:
    """Hypothesis examples for a property: ``full`` in ``make test``, a tenth in ``make check``."""
    return max(2, full // 10) if FAST else full
