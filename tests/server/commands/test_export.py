"""`fedfusion export`: the chosen round, thresholds from pooled statistics only, a model card."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from server.commands.export import export_run, read_run
from shared_model.cli import build_app
from shared_model.evaluation import COARSE_EDGES, EvalStats
from shared_model.inference.bundle import BundleError, load_bundle
from shared_model.inference.operating_points import (
    choose_thresholds,
    parse_operating_point,
    pooled_figures,
)
from tests.support.runs import fake_run, round_stats

LABELS = ("normal", "cardiomegaly", "opacity")
SMALL = {"model.labels": "|".join(LABELS), "model.embed-dim": 16, "model.text-heads": 2}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    fake_run(root, [None, 0.5, 2.5, 1.0], SMALL)
    return root


def _weights_equal(a, b):
    return set(a) == set(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.mark.parametrize(("which", "expected"), [("best", 2), ("final", 3), ("1", 1)])
def test_export_ships_the_chosen_rounds_model(run_dir, tmp_path, which, expected):
    bundle = load_bundle(export_run(run_dir, tmp_path / "b", which))
    assert bundle.info["source"]["round"] == expected
    shipped = load_file(str(tmp_path / "b" / "weights.safetensors"))
    saved = load_file(str(run_dir / "checkpoints" / f"round-{expected:04d}.safetensors"))
    assert _weights_equal(shipped, saved)


def test_thresholds_are_the_rule_applied_to_that_rounds_pooled_statistics(run_dir, tmp_path):
    bundle = load_bundle(export_run(run_dir, tmp_path / "b", "best", "sensitivity=0.8"))
    pooled = read_run(run_dir).stats(2)
    expected, _ = choose_thresholds(pooled, "sensitivity=0.8")
    assert np.allclose(bundle.threshold_logits, expected)
    figures, _ = pooled_figures(pooled, bundle.threshold_logits)
    assert all(f.sensitivity >= 0.8 for f in figures)
    # and not the other rounds': round 1's statistics give other thresholds
    other, _ = choose_thresholds(read_run(run_dir).stats(1), "sensitivity=0.8")
    assert not np.allclose(other, expected)


def test_the_model_card_states_use_privacy_and_figures_with_intervals(run_dir, tmp_path):
    export_run(run_dir, tmp_path / "b")
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "Not a medical device" in card
    assert "synthetic phantom radiographs" in card
    # each hospital's epsilon at the exported round (2) and at the end (3), and its delta
    assert "| hospital-0 | patient | 2.00 | 3.00 | 8 | exact (public data) | - | 1e-05 |" in card
    assert "| hospital-1 | patient | 2.10 | 3.10 | 8 | exact (public data) | - | 1e-06 |" in card
    _, (macro, low, high) = pooled_figures(read_run(run_dir).stats(2), np.zeros(3))
    assert f"Macro AUROC {macro:.3f} (95% CI {low:.3f}-{high:.3f})" in card
    assert "optimistic by that selection" in card  # chosen on the reported split
    assert "output-dir" not in card  # no path of the machine that trained it


def test_export_refuses_what_it_cannot_ship(run_dir, tmp_path):
    with pytest.raises(BundleError, match="no model of round 9"):
        export_run(run_dir, tmp_path / "a", "9")
    with pytest.raises(BundleError, match="not a fedfusion run"):
        export_run(tmp_path, tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("keep me")
    with pytest.raises(BundleError, match="not empty"):
        export_run(run_dir, tmp_path / "c")
    assert (tmp_path / "c" / "x").read_text() == "keep me"


def test_a_run_without_pooled_evaluation_exports_its_final_round_and_says_why(tmp_path):
    fake_run(tmp_path / "run", [None, None], SMALL)
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "b"))
    assert bundle.info["source"]["selection"] == "final"
    assert "no pooled held-out evaluation" in bundle.info["source"]["selection-note"]
    assert np.allclose(bundle.threshold_logits, 0.0)  # probability 0.5, and it says so
    assert bundle.info["decision"]["notes"]
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "No pooled figures are published" in card and "reached the coordinator" in card
    assert "the final round is exported" in card


@pytest.mark.parametrize("pooled", [1, 2])
def test_statistics_of_fewer_than_three_hospitals_are_not_published(tmp_path, pooled):
    """With two, a hospital holding the bundle would subtract its own and read the other's."""
    fake_run(tmp_path / "run", [None, 1.0, 2.0, 0.5], SMALL, pooled=pooled)
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "b"))
    assert np.allclose(bundle.threshold_logits, 0.0)
    assert bundle.info["source"]["pooled-hospitals"] == pooled
    # no round was chosen by a metric of fewer than 3 hospitals: the final one ships
    assert bundle.info["source"]["round"] == 3
    assert bundle.info["source"]["selection"] == "final"
    assert bundle.info["source"]["selection-metric"]["value"] is None
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert f"pool {pooled} hospital(s), fewer than the 3 needed" in card
    assert "at least 3 hospitals: the final round is exported" in card
    assert "AUROC (95% CI)" not in card
    with pytest.raises(BundleError, match="--min-hospitals 2: pooled figures come from at least 3"):
        export_run(tmp_path / "run", tmp_path / "c", min_hospitals=2)


def test_the_best_round_is_chosen_only_among_rounds_of_enough_hospitals(tmp_path):
    # round 2 scores highest, but on the statistics of 2 hospitals
    fake_run(tmp_path / "run", [None, 1.0, 2.5, 0.5], SMALL, pooled=[3, 3, 2, 3])
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "b"))
    assert bundle.info["source"]["round"] == 1
    assert bundle.info["source"]["selection"] == "best"
    assert bundle.info["source"]["pooled-hospitals"] == 3
    tighter = load_bundle(export_run(tmp_path / "run", tmp_path / "c", min_hospitals=4))
    assert tighter.info["source"]["selection"] == "final"


def test_a_plain_run_says_the_statistics_were_sent_in_the_clear(tmp_path):
    fake_run(tmp_path / "run", [None, 1.0], {**SMALL, "secagg.enabled": False})
    card = (export_run(tmp_path / "run", tmp_path / "b") / "MODEL_CARD.md").read_text()
    assert "in the clear (its own choice) and summed by the server" in card
    assert "secure aggregation" not in card.split("## Evaluation")[1].split("##")[0]


def test_best_export_ships_the_round_it_names_even_if_best_files_disagree(tmp_path):
    """A server killed between writing best_model and best.json leaves them out of step."""
    fake_run(tmp_path / "run", [None, 0.5, 2.5, 1.0], SMALL)
    run = tmp_path / "run"
    shutil.copy(run / "checkpoints" / "round-0003.safetensors", run / "best_model.safetensors")
    bundle = load_bundle(export_run(run, tmp_path / "b"))
    assert bundle.info["source"]["round"] == 2
    shipped = load_file(str(tmp_path / "b" / "weights.safetensors"))
    assert _weights_equal(shipped, load_file(str(run / "checkpoints" / "round-0002.safetensors")))


def test_the_cli_prints_the_round_and_thresholds(run_dir, tmp_path):
    result = CliRunner().invoke(build_app(), ["export", str(run_dir), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "round 2 (best)" in result.output and "normal" in result.output
    bad = CliRunner().invoke(
        build_app(), ["export", str(tmp_path / "nope"), "-o", str(tmp_path / "c")]
    )
    assert bad.exit_code == 2 and "is not a directory" in bad.output


# ---------------------------------------------------------------- operating points


def _brute_youden(stats: EvalStats, j: int) -> float:
    """Youden's J at the best bin edge, by trying every edge."""
    pos, neg = stats.positives[j], stats.negatives[j]
    return max(
        pos[i:].sum() / pos.sum() + neg[:i].sum() / neg.sum() - 1 for i in range(len(pos) + 1)
    )


def test_youden_thresholds_maximise_j_on_the_histograms():
    stats = round_stats(LABELS, 1.5, n=300, seed=4)
    thresholds, notes = choose_thresholds(stats, "youden")
    figures, _ = pooled_figures(stats, thresholds)
    assert not notes
    for j, f in enumerate(figures):
        assert f.sensitivity + f.specificity - 1 == pytest.approx(_brute_youden(stats, j))


def test_specificity_rule_and_fixed_probability():
    stats = round_stats(LABELS, 1.0, n=300, seed=5)
    spec, _ = choose_thresholds(stats, "specificity=0.9")
    figures, _ = pooled_figures(stats, spec)
    assert all(f.specificity >= 0.9 for f in figures)
    fixed, _ = choose_thresholds(stats, "probability=0.25")
    assert np.allclose(fixed, np.log(0.25 / 0.75))


def test_a_label_with_one_class_gets_probability_one_half_and_a_note():
    stats = round_stats(LABELS, 1.0, n=50)
    stats.negatives[1] += stats.positives[1]
    stats.positives[1] = 0
    thresholds, notes = choose_thresholds(stats, "youden")
    assert thresholds[1] == 0.0 and "cardiomegaly" in notes[0]


@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ("", "use youden, sensitivity=X"),
        ("best", "use youden, sensitivity=X"),
        ("sensitivity=1.5", "sensitivity needs a number above 0 and at most 1"),
        ("sensitivity", "sensitivity needs a number"),
        ("probability=1", "probability needs a number above 0 and below 1"),
    ],
)
def test_an_unknown_operating_point_is_refused_saying_what_is_wrong(rule, problem):
    with pytest.raises(ValueError, match=problem):
        parse_operating_point(rule)


def test_pooled_auroc_matches_the_histograms_and_its_interval_contains_it():
    stats = round_stats(LABELS, 1.0, n=500, seed=2)
    figures, (macro, low, high) = pooled_figures(stats, np.zeros(3))
    for j, f in enumerate(figures):
        assert f.auroc == pytest.approx(stats.auroc(j))
        assert f.auroc_ci95[0] < f.auroc < f.auroc_ci95[1]
    assert low < macro < high
    assert json.dumps([f.auroc for f in figures])  # plain floats


def test_a_threshold_that_never_or_always_fires_is_named(tmp_path):
    fake_run(tmp_path / "run", [None, 0.0], SMALL)
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "b", "1", "specificity=1.0"))
    notes = bundle.info["decision"]["notes"]
    assert notes and all("fires on no pooled record" in n for n in notes)


def test_intervals_of_noised_statistics_hold_the_privacy_noise_and_cover_the_truth():
    """Hospitals release their statistics noised: the interval must widen to cover the
    truth about as often as it says. Read as if exact (the resampling alone), it would
    not: the test can fail."""
    truth = float(round_stats(LABELS, 1.0, n=20_000, seed=99).metrics()["auroc"])
    covered, widths, exact_widths = 0, [], []
    for seed in range(20):
        noised = round_stats(LABELS, 1.0, n=600, seed=seed, hospitals=5, noise_std=8.0)
        _, (_, low, high) = pooled_figures(noised, np.zeros(3), bootstrap=300, seed=seed)
        covered += low <= truth <= high
        widths.append(high - low)
        exact = round_stats(LABELS, 1.0, n=600, seed=seed, hospitals=5)
        _, (_, exact_low, exact_high) = pooled_figures(exact, np.zeros(3), bootstrap=300)
        exact_widths.append(exact_high - exact_low)
    assert covered >= 17  # of 20, for a 95% interval
    assert np.median(widths) > 1.3 * np.median(exact_widths)  # the noise is in it
    unknown = dataclasses.replace(noised, noise_variance=float("nan"))  # an older run's
    assert np.isnan(pooled_figures(unknown, np.zeros(3), bootstrap=50)[1][1])


def test_a_run_whose_hospitals_noised_their_statistics_exports_a_card_that_says_so(tmp_path):
    fake_run(tmp_path / "run", [None, 0.5, 2.0, 1.0], SMALL, noise_std=6.0)
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "b", "best"))
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    pooled = bundle.info["pooled-evaluation"]
    assert pooled["noised-hospitals"] == 3
    assert pooled["noise-std"] == pytest.approx(6.0 * np.sqrt(3))
    assert pooled["macro-auroc-ci95"][0] < pooled["macro-auroc"] < pooled["macro-auroc-ci95"][1]
    assert "parametric bootstrap" in card and "include the privacy noise" in card
    # each hospital's held-out epsilon at the end (round 3: 3/4) beside its cap
    assert "| hospital-0 | patient | 2.00 | 3.00 | 8 | 0.75 | 4 | 1e-05 |" in card
    # thresholds at coarse edges only: where the noised counts say what the records do
    coarse = {-10.0, 10.0, *COARSE_EDGES}
    assert all(min(abs(t - c) for c in coarse) < 1e-9 for t in bundle.threshold_logits)
