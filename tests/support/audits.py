"""The one-run audit at a test's size, and audit outcomes made by hand."""

from __future__ import annotations

import functools

import pytest

from client.audit import one_run
from client.audit.report import AuditOutcome

__all__ = ["QUICK", "outcome", "quick_white_box"]

# Small and fast (about 5 s a run once features are cached): 200 canaries, 100 guesses,
# whose cap (3.49) is far above the accounted epsilon of 1.
QUICK = {
    "canaries": 200,
    "guesses": 100,
    "hospitals": 2,
    "rounds": 1,
    "data": {"data.max-reports": 400},
}


def quick_white_box(monkeypatch: pytest.MonkeyPatch, *runs: one_run.AuditRun) -> None:
    """Make the audit's white-box variant ``runs`` alone, each at the quick size.

    The hospitals are left out of the size: the caller's (the CLI's, say) count.
    """
    monkeypatch.setattr(one_run, "AUDIT_RUNS", runs)
    quick = {k: v for k, v in QUICK.items() if k != "hospitals"}
    monkeypatch.setattr(
        one_run, "white_box_audit", functools.partial(one_run.white_box_audit, **quick)
    )


def outcome(flagged: bool, expect: bool | None) -> AuditOutcome:
    """A white-box run's outcome, flagged or not; ``expect``: as ``AuditRun.expect_flagged``."""
    return AuditOutcome(
        run=f"{flagged}-{expect}",
        accounted_epsilon=1.0,
        checked_against=1.0,
        lower_bound=2.0 if flagged else 0.0,
        cap=4.17,
        canaries=1000,
        included=500,
        guesses=200,
        right=190 if flagged else 100,
        delta=1e-5,
        flagged=flagged,
        power_claimed=True,
        seconds=1.0,
        expect_flagged=expect,
    )
