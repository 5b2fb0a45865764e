"""The evaluation's figures as PNG files: ROC curves and reliability diagrams per label.

matplotlib is imported inside the functions (with the non-interactive Agg backend), so
importing this module costs nothing and needs no display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.inference.metrics import LocalEvaluation, check_predictions
from shared_model.metrics import per_label_auroc

__all__ = ["write_reliability_diagram", "write_roc_curves"]

_PANEL = 3.0  # inches per panel side
_MAX_COLUMNS = 4


def _grid(plt: Any, panels: int) -> tuple[Any, list[Any]]:
    """A figure with ``panels`` square axes in rows of up to four; spare axes hidden."""
    cols = min(_MAX_COLUMNS, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(_PANEL * cols, _PANEL * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[panels:]:
        ax.set_axis_off()
    return fig, flat[:panels]


def _pyplot() -> Any:
    # matplotlib loads only when a figure is drawn
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    return plt


def write_roc_curves(
    labels: Sequence[str],
    logits: np.ndarray,
    targets: np.ndarray,
    threshold_logits: np.ndarray,
    path: Path,
) -> Path:
    """One ROC panel per label, AUROC in the legend and the threshold's operating point.

    A label whose targets hold one class gets a panel saying its AUROC is undefined.
    """
    # scikit-learn loads here, not at import: as matplotlib, only when a figure is drawn
    from sklearn.metrics import roc_curve

    z, y, thresholds = check_predictions(labels, logits, targets, threshold_logits)
    aurocs = per_label_auroc(y, z)
    plt = _pyplot()
    fig, axes = _grid(plt, len(labels))
    for j, (ax, name) in enumerate(zip(axes, labels, strict=True)):
        positive = y[:, j] == 1
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", title=name)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.tick_params(labelsize=7)
        if math.isnan(aurocs[j]):
            ax.text(0.5, 0.5, "AUROC undefined\n(one class)", ha="center", va="center")
            continue
        fpr, tpr, _ = roc_curve(positive, z[:, j])
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
        ax.plot(fpr, tpr, lw=1.4, color="tab:blue", label=f"AUROC {aurocs[j]:.3f}")
        decided = z[:, j] >= thresholds[j]
        op_fpr = float(np.mean(decided[~positive]))
        op_tpr = float(np.mean(decided[positive]))
        ax.plot(op_fpr, op_tpr, "o", color="tab:red", ms=6, label="threshold")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reliability_diagram(evaluation: LocalEvaluation, path: Path) -> Path:
    """Per label: observed frequency against mean predicted probability, per bin.

    The diagonal is perfect calibration; the grey bars show the share of examples in
    each bin (same axis), and the marker size grows with the bin's count. ECE in titles.
    """
    plt = _pyplot()
    fig, axes = _grid(plt, len(evaluation.per_label))
    for ax, figures in zip(axes, evaluation.per_label, strict=True):
        bins = figures.reliability
        total = sum(b["count"] for b in bins) or 1
        lowers = [b["lower"] for b in bins]
        widths = [b["upper"] - b["lower"] for b in bins]
        shares = [b["count"] / total for b in bins]
        ax.bar(
            lowers, shares, width=widths, align="edge", color="lightgrey", label="share of records"
        )
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
        full = [b for b in bins if b["count"]]
        xs = [b["mean_predicted"] for b in full]
        ys = [b["observed_frequency"] for b in full]
        sizes = [12 + 120 * b["count"] / total for b in full]
        ax.plot(xs, ys, "-", color="tab:blue", lw=1.0)
        ax.scatter(xs, ys, s=sizes, color="tab:blue", zorder=3, label="observed")
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
        ax.set_title(f"{figures.label}: ECE {figures.ece:.3f}", fontsize=9)
        ax.set_xlabel("mean predicted probability", fontsize=8)
        ax.set_ylabel("observed frequency", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
