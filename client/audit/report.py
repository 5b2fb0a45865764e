"""The one-run audit's outcome of one run, and the table, JSON and plot it writes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AuditOutcome",
    "audit_row",
    "audit_table",
    "judge",
    "verdict",
    "write_audit_results",
]


@dataclass
class AuditOutcome:
    """One audited run: the accounted epsilon and the audited lower bound, side by side."""

    run: str
    accounted_epsilon: float  # inf without DP
    checked_against: float  # the accounted epsilon, or without DP the run's reference
    lower_bound: float  # at 95% confidence
    cap: float  # the most these m and r could show (every guess right)
    canaries: int  # m
    included: int
    guesses: int  # r
    right: int  # v
    delta: float
    flagged: bool  # lower_bound > checked_against: the implementation leaks more
    power_claimed: bool
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    variant: str = "white-box"  # or black-box (record canaries)
    # True: a control that must be flagged; False: a correct run that must not; None: shown
    expect_flagged: bool | None = False

    @property
    def as_expected(self) -> bool:
        """Flagged if a control, not flagged if a correct run; any outcome if neither."""
        return self.expect_flagged is None or self.flagged == self.expect_flagged


def verdict(o: AuditOutcome) -> str:
    """What one run's bound says, against what the run is there to show."""
    if o.flagged:
        said = f"FLAGGED: leaks more than ε = {o.checked_against:.2f}"
        return f"{said} (control: caught)" if o.expect_flagged else said
    if o.expect_flagged:
        return "NOT CAUGHT (control): no power at these settings"
    if not o.power_claimed:
        return f"no power claimed (cap {o.cap:.2f} ≤ ε)"
    return "ok" if o.expect_flagged is False else "ok (not caught)"


def judge(outcomes: list[AuditOutcome]) -> tuple[list[str], list[str]]:
    """(correct DP runs flagged: a leak; controls not flagged: no power), by name."""
    leaking = [f"{o.variant} {o.run}" for o in outcomes if o.flagged and o.expect_flagged is False]
    blind = [f"{o.variant} {o.run}" for o in outcomes if o.expect_flagged and not o.flagged]
    return leaking, blind


def audit_row(o: AuditOutcome) -> str:
    """One run's line of the Markdown table."""
    accounted = f"{o.accounted_epsilon:.2f}"
    if math.isinf(o.accounted_epsilon):
        accounted = f"none (no DP; checked against {o.checked_against:g})"
    return (
        f"| {o.variant} | {o.run} | {accounted} | {o.lower_bound:.2f} | {o.cap:.2f} | {o.canaries} "
        f"| {o.guesses} | {o.right} | {verdict(o)} | {o.seconds:.0f} |"
    )


def audit_table(outcomes: list[AuditOutcome]) -> str:
    """The Markdown table the audit prints and writes."""
    head = (
        "| audit | run | accounted ε | audited ε lower bound (95%) | cap (all r right) | m | r "
        "| v | verdict | seconds |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(audit_row(o) for o in outcomes)])


def software() -> dict[str, str]:
    """The versions that produced a result: fedfusion and the libraries it audits."""
    found = {}
    for name in ("fedfusion", "flwr", "opacus", "torch"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def write_audit_results(outcomes: list[AuditOutcome], out: Path, machine: str) -> None:
    """``audit.json``, ``audit.md`` and ``audit.png`` (accounted vs audited epsilon)."""
    out.mkdir(parents=True, exist_ok=True)
    versions = software()
    (out / "audit.json").write_text(
        json.dumps(
            {"machine": machine, "software": versions, "runs": [asdict(o) for o in outcomes]},
            indent=2,
            default=str,
        )
        + "\n",
        encoding="utf-8",
    )
    shown = ", ".join(f"{k} {v}" for k, v in versions.items())
    (out / "audit.md").write_text(
        "# One-run privacy audit (white-box gradient canaries, black-box record canaries)\n\n"
        f"{machine}; {shown}\n\n{audit_table(outcomes)}\n",
        encoding="utf-8",
    )
    _plot(outcomes, out / "audit.png")


def _plot(outcomes: list[AuditOutcome], path: Path) -> None:
    """Bars: the audited lower bound of each run, its accounted epsilon and its cap."""
    # matplotlib (and its font cache) loads only when the audit writes its plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen, as matplotlib requires

    fig, ax = plt.subplots(figsize=(max(7.0, 0.8 * len(outcomes)), 3.5))
    x = np.arange(len(outcomes))
    ax.bar(
        x, [o.lower_bound for o in outcomes], color=["C3" if o.flagged else "C0" for o in outcomes]
    )
    for i, o in enumerate(outcomes):
        ax.hlines(o.cap, i - 0.4, i + 0.4, colors="grey", linestyles=":")
        if not math.isinf(o.accounted_epsilon):
            ax.hlines(o.accounted_epsilon, i - 0.4, i + 0.4, colors="k")
        elif not math.isinf(o.checked_against):  # no DP: the epsilon it is checked against
            ax.hlines(o.checked_against, i - 0.4, i + 0.4, colors="k", linestyles="--")
    labels = [f"{o.variant[0]}b {o.run.split(' ')[0]}" for o in outcomes]  # wb / bb
    ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("ε")
    ax.set_title(
        "audited lower bound (bars; red: flagged), cap (dotted); wb white-, bb black-box\n"
        "accounted ε (line; dashed: the ε a run without DP is checked against)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
