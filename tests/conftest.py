"""Shared test plumbing: the fuzz targets' input counts, printed at the end of the run."""

from __future__ import annotations

from typing import Any

import pytest

_FUZZ_COUNTS: dict[str, list[int]] = {}


@pytest.fixture
def fuzz_counts() -> dict[str, list[int]]:
    """Per fuzz target, ``[inputs tried]``; a target adds to its own entry."""
    return _FUZZ_COUNTS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many inputs each fuzz target tried (all of them ran without a crash if it passed)."""
    if not _FUZZ_COUNTS:
        return
    terminalreporter.section("fuzzing")
    for target, (count,) in sorted(_FUZZ_COUNTS.items()):
        terminalreporter.write_line(f"{target}: {count} inputs")
