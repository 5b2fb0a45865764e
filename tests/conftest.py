"""Shared test plumbing, printed at the end of the run: the fuzz targets' input counts,
and how the tests behind the fault table in docs/faults.md (tests/support/fault_table.py) fared."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

_FUZZ_COUNTS: dict[str, int] = {}
_FAULT_OUTCOMES: dict[str, str] = {}  # test function -> passed | failed | skipped
_SLOW_FIRST = "slow"


@pytest.fixture
def fuzz_counts(request: pytest.FixtureRequest) -> Iterator[dict[str, list[int]]]:
    """Per fuzz target, ``[inputs tried]``; a target adds to its own entry.

    The counts travel in the test's report (``user_properties``), so that they reach the
    summary from pytest-xdist's worker processes too.
    """
    counts: dict[str, list[int]] = {}
    yield counts
    request.node.user_properties.extend(("fuzz", (t, n)) for t, (n,) in counts.items())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first: on several workers, the longest work starts at once instead
    of leaving one worker busy with it at the end (longest-first scheduling)."""
    items.sort(key=lambda item: item.get_closest_marker(_SLOW_FIRST) is None)


def pytest_runtest_logreport(report: Any) -> None:
    """Record fuzz counts, and the outcome of each fault-table test (a parametrized one
    fails if any case does)."""
    for key, value in report.user_properties if report.when == "teardown" else ():
        if key == "fuzz":
            target, count = value
            _FUZZ_COUNTS[target] = _FUZZ_COUNTS.get(target, 0) + count
    if "fault" not in report.keywords:
        return
    test = report.nodeid.split("[", 1)[0]
    if report.failed:
        _FAULT_OUTCOMES[test] = "failed"
    elif report.when == "call" or report.skipped:
        _FAULT_OUTCOMES.setdefault(test, "skipped" if report.skipped else "passed")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Fuzz input counts (all ran without a crash if the target passed), fault-table tests."""
    if _FUZZ_COUNTS:
        terminalreporter.section("fuzzing")
        for target, count in sorted(_FUZZ_COUNTS.items()):
            terminalreporter.write_line(f"{target}: {count} inputs")
    if _FAULT_OUTCOMES:
        from collections import Counter

        from tests.support.fault_table import scan

        counts = Counter(_FAULT_OUTCOMES.values())
        terminalreporter.section("faults injected (the fault table, docs/faults.md)")
        terminalreporter.write_line(
            f"{len(_FAULT_OUTCOMES)} of {len(scan())} fault tests ran: "
            + ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
        )
        for test, outcome in sorted(_FAULT_OUTCOMES.items()):
            if outcome != "passed":
                terminalreporter.write_line(f"  {outcome}: {test}")
