"""The evaluation's PNG figures and its Markdown report."""

import re

import numpy as np
import pytest

from shared_model.inference.metrics import evaluate_predictions
from shared_model.inference.plots import write_reliability_diagram, write_roc_curves
from shared_model.inference.report import RELIABILITY_PNG, ROC_PNG, render_report

LABELS = ("pleural effusion", "edema", "no finding | other", "cardiomegaly", "nodule")
PNG = b"\x89PNG\r\n\x1a\n"


def data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    logits = rng.normal(size=targets.shape) + 1.5 * targets
    targets[:, 4] = 0.0  # one class only
    return logits, targets


@pytest.fixture(scope="module")
def evaluation():
    logits, targets = data()
    k = len(LABELS)
    return evaluate_predictions(LABELS, logits, targets, np.full(k, 0.4), np.ones(k), bootstrap=200)


def _is_png(path, min_bytes=10_000):
    raw = path.read_bytes()
    return raw[:8] == PNG and len(raw) > min_bytes


def test_roc_curves_are_written_as_a_png(tmp_path):
    logits, targets = data()
    out = write_roc_curves(LABELS, logits, targets, np.zeros(len(LABELS)), tmp_path / ROC_PNG)
    assert out == tmp_path / ROC_PNG
    assert _is_png(out)


def test_roc_curves_refuse_bad_input(tmp_path):
    logits, targets = data()
    with pytest.raises(ValueError, match="threshold_logits"):
        write_roc_curves(LABELS, logits, targets, np.zeros(2), tmp_path / ROC_PNG)
    assert not (tmp_path / ROC_PNG).exists()


def test_one_label_roc_draws_a_single_panel(tmp_path):
    logits, targets = data()
    out = write_roc_curves(
        LABELS[:1], logits[:, :1], targets[:, :1], np.zeros(1), tmp_path / "a.png"
    )
    assert _is_png(out, min_bytes=5_000)


def test_reliability_diagram_is_written_as_a_png(tmp_path, evaluation):
    out = write_reliability_diagram(evaluation, tmp_path / RELIABILITY_PNG)
    assert _is_png(out)


def test_report_has_every_label_its_figures_and_the_links(evaluation):
    facts = [("Model", "chest-xray-v3, round 30"), ("Test set", "test.csv"), ("Recalibrated", "no")]
    text = render_report(evaluation, title="Evaluation at St Elsewhere", facts=facts)
    assert text.startswith("# Evaluation at St Elsewhere\n")
    for name, value in facts:
        assert name in text and value in text
    for f in evaluation.per_label:
        assert f.label.replace("|", "\\|") in text
    f = evaluation.label("edema")
    assert f"{f.auroc:.3f} [{f.auroc_ci95[0]:.3f}, {f.auroc_ci95[1]:.3f}]" in text
    s = f.sensitivity
    assert f"{s.value:.2f} [{s.ci95[0]:.2f}, {s.ci95[1]:.2f}]" in text
    m = evaluation.macro
    assert f"{m.auroc:.3f} [{m.auroc_ci95[0]:.3f}, {m.auroc_ci95[1]:.3f}]" in text
    assert f"]({ROC_PNG})" in text and f"]({RELIABILITY_PNG})" in text
    assert "95%" in text and "prevalence" in text and "pooled" in text
    assert "AUROC is undefined for nodule" in text


def test_report_tables_keep_their_columns(evaluation):
    text = render_report(evaluation, title="t", facts=[("a | b", "c")])
    for block in re.split(r"\n\n", text):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            widths = {len(re.split(r"(?<!\\)\|", row)) for row in rows}
            assert len(widths) == 1, block


def test_report_marks_undefined_figures_with_a_dash(evaluation):
    text = render_report(evaluation, title="t", facts=[])
    row = next(line for line in text.splitlines() if line.startswith("| nodule"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "0 / 300" and cells[3] == "-" and cells[4] == "-"  # AUROC, sensitivity
    assert "nan" not in text.lower()
