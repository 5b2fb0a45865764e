"""A hospital's evaluation as a short Markdown report (``report.md``).

The report links the figures written next to it by :mod:`shared_model.inference.plots`
(``roc_curves.png`` and ``reliability.png``) and explains in plain words how to read
the tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from shared_model.inference.metrics import LocalEvaluation, Proportion

__all__ = ["RELIABILITY_PNG", "ROC_PNG", "render_report"]

ROC_PNG = "roc_curves.png"
RELIABILITY_PNG = "reliability.png"
_MISSING = "-"


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(value: float, spec: str = ".3f") -> str:
    return _MISSING if value is None or math.isnan(value) else format(value, spec)


def _with_ci(value: float, ci: tuple[float, float], spec: str = ".3f") -> str:
    if math.isnan(value):
        return _MISSING
    if math.isnan(ci[0]) or math.isnan(ci[1]):
        return _num(value, spec)
    return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def _prop(p: Proportion) -> str:
    return _with_ci(p.value, p.ci95, ".2f")


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def render_report(
    evaluation: LocalEvaluation, *, title: str, facts: Sequence[tuple[str, str]]
) -> str:
    """The Markdown text of ``report.md`` for ``evaluation``.

    ``facts`` are ``(name, value)`` rows shown first (for example the model's name, the
    test set, the number of records used and refused, the date, whether recalibrated).
    """
    ev, macro = evaluation, evaluation.macro
    lines = [f"# {title}", ""]
    if facts:
        lines += [*_table(["", ""], [(f"**{k}**", v) for k, v in facts]), ""]

    lines += ["## Results per finding", ""]
    header = [
        "Finding",
        "Positives / n",
        "Prevalence",
        "AUROC [95% CI]",
        "Sensitivity",
        "Specificity",
        "PPV",
        "NPV",
        "ECE",
    ]
    rows: list[list[object]] = [
        [
            f.label,
            f"{f.positives} / {f.n}",
            _num(f.prevalence, ".1%"),
            _with_ci(f.auroc, f.auroc_ci95),
            _prop(f.sensitivity),
            _prop(f.specificity),
            _prop(f.ppv),
            _prop(f.npv),
            _num(f.ece),
        ]
        for f in ev.per_label
    ]
    rows.append(
        [
            "**Mean over findings**",
            _MISSING,
            _MISSING,
            _with_ci(macro.auroc, macro.auroc_ci95),
            _num(macro.sensitivity, ".2f"),
            _num(macro.specificity, ".2f"),
            _num(macro.ppv, ".2f"),
            _num(macro.npv, ".2f"),
            _num(macro.ece),
        ]
    )
    lines += [*_table(header, rows), ""]

    lines += ["## Decisions at the threshold", ""]
    counts = [
        [
            f.label,
            _num(f.threshold_probability),
            f.tp,
            f.fp,
            f.tn,
            f.fn,
            _num(f.brier),
        ]
        for f in ev.per_label
    ]
    lines += [
        *_table(
            [
                "Finding",
                "Threshold (probability)",
                "True positives",
                "False positives",
                "True negatives",
                "False negatives",
                "Brier score",
            ],
            counts,
        ),
        "",
    ]

    lines += [
        "## Figures",
        "",
        f"![ROC curves, one per finding, with the threshold's operating point]({ROC_PNG})",
        "",
        f"![Reliability diagrams: observed frequency against predicted probability]"
        f"({RELIABILITY_PNG})",
        "",
        "## How to read this",
        "",
        *_how_to_read(ev),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _how_to_read(ev: LocalEvaluation) -> list[str]:
    macro = ev.macro
    undefined = [f.label for f in ev.per_label if math.isnan(f.auroc)]
    paragraph = [
        f"All figures come from this hospital's own {ev.n} labelled test records; none of them "
        "left the hospital. Values in brackets are 95% confidence intervals: the range the "
        "figure would plausibly take on another sample of records like these. For AUROC they "
        f"come from {ev.bootstrap} bootstrap resamples of the records (seed {ev.seed}); for "
        "sensitivity, specificity, PPV and NPV they are Wilson score intervals. Wide "
        "intervals mean few records, usually few positives.",
        "",
        "AUROC measures how well the model ranks records with a finding above records "
        "without it (0.5 is chance, 1.0 is perfect) and does not depend on any threshold. "
        "Sensitivity, specificity, PPV and NPV are for the decisions at each finding's "
        "threshold. The thresholds were chosen from the evaluation results pooled across "
        "all participating hospitals, not from this hospital's data, so they may not be the "
        "best operating points here. PPV and NPV also depend on how common each finding is "
        "at this hospital (the prevalence column): the same model has a lower PPV where a "
        "finding is rarer.",
        "",
        "ECE (expected calibration error) is the average gap between the predicted "
        "probability and the observed frequency, over ten probability bins; 0 is perfect. "
        "The Brier score is the mean squared error of the probabilities. Recalibration "
        "changes the probabilities only, never the decisions or the AUROC.",
    ]
    mean_line = (
        f"The mean AUROC averages the {len(macro.auroc_labels)} findings where AUROC is "
        "defined; the other means average the findings where each figure is defined. "
        "A dash means a figure is undefined (for example a PPV with no positive decisions)."
    )
    paragraph += ["", mean_line]
    if undefined:
        paragraph += [
            "",
            f"AUROC is undefined for {', '.join(undefined)}: the test set holds records of "
            "only one class (all with or all without the finding), so it is left out of "
            "the mean rather than counted as 0.5.",
        ]
    return paragraph
