"""Held-out statistics leave only noised and charged: attacked with a crafted model.

The server may send any weights to evaluate. Here it crafts a model that puts one
held-out patient's score alone in the top bin, so that an exact count would read that
patient's label. Through the hospital's own release (client/dp/held_out.py), at
held-out epsilon 0.5, the attacker's accuracy stays within what epsilon allows; with the
noise switched off in the test, the same attack reads the label every time.
"""

import itertools
import math
from dataclasses import replace

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from client.dp.held_out import (
    COARSE_EDGES,
    coarse_layout,
    held_out_epsilon,
    held_out_noise_multipliers,
    release_held_out,
    released_rounds,
    sensitivity,
)
from client.dp.ledger import (
    HELD_OUT_PART,
    LEDGER_FILENAME,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
)
from client.dp.policy import PrivacyPolicy
from shared_model.evaluation import EVAL_LOSS_CLIP, SCORE_BINS, SCORE_EDGES, EvalStats

LABELS = ("normal", "cardiomegaly", "effusion")
POLICY = PrivacyPolicy(True, 8.0, 8.0, 1e-5, 1.0, "rdp", "bk")


def fresh_ledger(tmp_path, policy=POLICY) -> PrivacyLedger:
    """A new, empty ledger in a folder of its own under ``tmp_path``."""
    folder = tmp_path / f"ledger-{next(_FOLDERS)}"
    return PrivacyLedger.empty(folder / LEDGER_FILENAME, "st-mary", policy)


_FOLDERS = itertools.count()


def stats_of(logits, targets, losses=None) -> EvalStats:
    logits, targets = np.asarray(logits, float), np.asarray(targets, float)
    losses = np.zeros(len(logits)) if losses is None else losses
    return EvalStats.from_predictions(LABELS, logits, targets, losses)


def released_with(stats: EvalStats, tmp_path, draw: float):
    """The hospital's release of the final model's ``stats``, every noise draw ``draw``."""
    return release_held_out(
        stats,
        fresh_ledger(tmp_path),
        POLICY,
        model_round=1,
        planned_rounds=1,
        normal=lambda shape: np.full(shape, draw),
    )


def released_vector(stats: EvalStats, tmp_path) -> np.ndarray:
    """The vector the hospital would release with the noise switched off."""
    v = released_with(stats, tmp_path, 0.0).stats.to_vector()
    v[1] /= EVAL_LOSS_CLIP  # the loss, in units of its sensitivity
    return v


def test_one_record_moves_the_released_vector_by_at_most_its_sensitivity(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        logits = rng.normal(0, 4, (n, len(LABELS)))
        targets = rng.random((n, len(LABELS))) < 0.3
        losses = rng.uniform(0, 2 * EVAL_LOSS_CLIP, n)  # clipped inside
        whole = released_vector(stats_of(logits, targets, losses), tmp_path)
        less = released_vector(stats_of(logits[1:], targets[1:], losses[1:]), tmp_path)
        # (+ the rounding of released values to a grid of std / 1024, post-processing)
        assert np.linalg.norm(whole - less) <= sensitivity(len(LABELS)) + 0.02


def test_only_sixteen_public_cells_a_label_can_hold_a_count_and_zero_is_an_edge():
    layout = coarse_layout()
    assert len(np.unique(layout)) == len(COARSE_EDGES) + 1 == 16
    half = SCORE_BINS // 2  # fine bins from here have logit >= 0
    assert (layout[:half] < half).all() and (layout[half:] >= half).all()
    centres = (SCORE_EDGES[:-1] + SCORE_EDGES[1:]) / 2
    assert (np.diff(centres[np.unique(layout)]) > 0).all()  # order kept: AUROC is monotone


def test_held_out_releases_are_charged_to_their_own_part_and_capped(tmp_path):
    policy = replace(POLICY, max_held_out_epsilon=2.0, held_out_releases=3)
    ledger = fresh_ledger(tmp_path, policy)
    stats = stats_of([[1.0, -1.0, 0.5]] * 5, [[1, 0, 1]] * 5)
    outcomes = [
        release_held_out(stats, ledger, policy, model_round=r, planned_rounds=2) for r in range(3)
    ]
    assert all(o.released for o in outcomes)
    assert ledger.epsilon() == 0.0  # the training part is untouched
    assert 1.5 < ledger.epsilon(part=HELD_OUT_PART) <= 2.0
    # a fourth evaluation (the server re-sends a round) would pass the cap: nothing leaves
    again = release_held_out(stats, ledger, policy, model_round=2, planned_rounds=2)
    assert not again.released and "above this hospital's cap 2" in again.reason
    assert again.stats.examples == 0 and not again.stats.positives.any()
    assert len(ledger.history) == 3
    # what the hospital states in its replies is its ledger's held-out epsilon
    assert held_out_epsilon(ledger.history, policy) == ledger.epsilon(part=HELD_OUT_PART)
    assert held_out_epsilon(ledger.history, replace(policy, held_out_noise=False)) is None


def _independent_epsilon(final: float, other: float, releases: int, delta: float) -> float:
    acc = RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(final))
    if releases > 1:
        acc.compose(dp_accounting.GaussianDpEvent(other), releases - 1)
    return acc.get_epsilon(delta)


def test_the_noise_meets_the_cap_under_an_independent_accountant():
    for cap, releases in ((8.0, 4), (0.5, 1), (3.0, 10)):
        policy = replace(POLICY, max_held_out_epsilon=cap, held_out_releases=releases)
        final, other = held_out_noise_multipliers(policy)
        assert _independent_epsilon(final, other, releases, policy.delta) <= cap * (1 + 1e-3)
        less = _independent_epsilon(final * 0.95, other * 0.95, releases, policy.delta)
        assert less > cap  # not more noise than needed
        if releases > 1:
            assert final < other  # the final model's evaluation gets the larger share


def test_the_hospital_evaluates_the_final_model_and_evenly_spaced_rounds_only():
    assert released_rounds(30, 4) == {8, 15, 23, 30}
    assert released_rounds(2, 4) == {0, 1, 2}
    ledger_free = release_held_out(
        stats_of([[1.0, 1.0, 1.0]], [[1, 1, 1]]),
        None,  # never opened: declined before any release
        POLICY,
        model_round=9,
        planned_rounds=30,
    )
    assert not ledger_free.released and "held-out-releases" in ledger_free.reason


def _crafted_model_attack(tmp_path, trials, noise) -> float:
    """The attacker's accuracy at reading the target's label from one released evaluation."""
    policy = replace(POLICY, max_held_out_epsilon=0.5, held_out_releases=1)
    rng = np.random.default_rng(3)
    correct = 0
    for t in range(trials):
        label = int(rng.integers(0, 2))
        logits = np.full((20, len(LABELS)), -9.0)  # everyone else: the bottom bin
        logits[0] = 9.0  # the crafted model singles out the target: the top bin
        targets = rng.random((20, len(LABELS))) < 0.3
        targets[0, 2] = bool(label)
        out = release_held_out(
            stats_of(logits, targets),
            PrivacyLedger.empty(tmp_path / f"{t}.json", "st-mary", policy),
            policy,
            model_round=1,
            planned_rounds=1,
            normal=noise,
        )
        top_positives = out.stats.positives[2, coarse_layout()[-1]]
        correct += int((top_positives > 0.5) == bool(label))
    return correct / trials


def test_a_crafted_model_reads_a_label_only_as_well_as_epsilon_allows(tmp_path):
    rng = np.random.default_rng(11)
    trials = 1500
    accuracy = _crafted_model_attack(tmp_path, trials, lambda shape: rng.standard_normal(shape))
    bound = math.exp(0.5) / (1 + math.exp(0.5)) + 1e-5  # (0.5, 1e-5)-DP: 0.6225
    assert accuracy <= bound + 3 * math.sqrt(bound * (1 - bound) / trials)


def test_without_the_noise_the_same_attack_reads_every_label(tmp_path):
    """The attack above is real: with the noise switched off, it always succeeds."""
    assert _crafted_model_attack(tmp_path, 50, lambda shape: np.zeros(shape)) == 1.0


def test_pooled_auroc_from_released_statistics_stays_close_to_the_exact_one(tmp_path):
    """Five hospitals of 155 held-out patients, the 7 default labels, epsilon 8 over 4.

    The final model's evaluation, through the hospitals' own releases and the server's
    reading of the noised sum (a binormal fit), over 40 noise draws.
    """
    from shared_model.datasets.iu_reports import EMBEDDED_LABELS, PUBLIC_PREVALENCE

    prevalence = np.array([PUBLIC_PREVALENCE[label] for label in EMBEDDED_LABELS])
    rng = np.random.default_rng(5)
    exact = []
    for _ in range(5):
        y = rng.random((155, len(prevalence))) < prevalence
        logits = rng.normal(0, 1.3, y.shape) + 2.0 * y - 1.5
        exact.append(EvalStats.from_predictions(EMBEDDED_LABELS, logits, y, np.zeros(len(y))))
    true = sum(exact[1:], exact[0]).metrics()["auroc"]
    noise = np.random.default_rng(6)
    errors = []
    for draw in range(40):
        released = [
            release_held_out(
                stats,
                fresh_ledger(tmp_path / f"{draw}-{h}"),
                POLICY,
                model_round=30,
                planned_rounds=30,
                normal=noise.standard_normal,
            ).stats
            for h, stats in enumerate(exact)
        ]
        pooled = sum(released[1:], released[0])
        assert pooled.noised == 5
        errors.append(abs(pooled.metrics()["auroc"] - true))
    assert np.median(errors) < 0.04 and np.percentile(errors, 95) < 0.12


def test_each_component_gets_exactly_its_noise(tmp_path):
    """With every draw 1, each released value moves by its own std: z * sqrt(3 + K) (* clip)."""
    stats = stats_of([[1.0, -1.0, 0.5]] * 4, [[1, 0, 1]] * 4, np.full(4, 3.0))
    out = released_with(stats, tmp_path, 1.0)
    std = held_out_noise_multipliers(POLICY)[0] * sensitivity(len(LABELS))
    grid = std / 1024
    assert out.stats.examples == pytest.approx(4 + std, abs=grid)
    assert out.stats.exact_matches == pytest.approx(stats.exact_matches + std, abs=grid)
    assert out.stats.loss_sum == pytest.approx(
        12.0 + std * EVAL_LOSS_CLIP, abs=grid * EVAL_LOSS_CLIP
    )
    cells = np.unique(coarse_layout())
    expected = np.zeros_like(stats.positives)
    for j in range(len(LABELS)):
        np.add.at(expected[j], coarse_layout(), stats.positives[j])
    assert np.allclose(out.stats.positives[:, cells], expected[:, cells] + std, atol=grid)
    others = np.setdiff1d(np.arange(SCORE_BINS), cells)
    assert not out.stats.positives[:, others].any() and not out.stats.negatives[:, others].any()
    assert out.stats.noised == 1.0 and out.stats.hospitals == 1.0
    assert out.stats.noise_variance == pytest.approx(std**2)  # for the server's intervals


def test_the_noise_comes_from_the_os_csprng_in_float64_and_has_its_std(tmp_path, monkeypatch):
    import client.dp.secure_noise as secure_noise

    drawn = []
    real = secure_noise.secure_normals
    monkeypatch.setattr(secure_noise, "secure_normals", lambda n: drawn.append(n) or real(n))
    stats = stats_of(np.zeros((0, len(LABELS))), np.zeros((0, len(LABELS))))  # nothing held out
    released = []
    for i in range(300):
        out = release_held_out(
            stats, fresh_ledger(tmp_path / str(i)), POLICY, model_round=1, planned_rounds=1
        )
        released.append(out.stats.positives[0, coarse_layout()[0]])
    assert len(drawn) == 300 * 3  # the header and both histograms, every time
    std = held_out_noise_multipliers(POLICY)[0] * sensitivity(len(LABELS))
    assert np.std(released) == pytest.approx(std, rel=0.15)
    # the low bits of a released value carry nothing: it lies on a grid of std / 1024
    grid = std / 1024
    assert np.allclose(np.round(np.array(released) / grid) * grid, released, rtol=0, atol=1e-9)


def test_a_ledger_changed_by_another_message_is_not_saved_over(tmp_path):
    """Two messages at once: the second writer fails rather than erasing the first's release."""
    first = fresh_ledger(tmp_path)
    first.save()
    path = first.path
    training = PrivacyLedger.from_json(path.read_bytes(), path)
    stats = stats_of([[1.0, -1.0, 0.5]] * 4, [[1, 0, 1]] * 4)
    evaluating = PrivacyLedger.from_json(path.read_bytes(), path)
    assert release_held_out(stats, evaluating, POLICY, model_round=1, planned_rounds=1).released
    with pytest.raises(LedgerError, match="changed on disk since this process read it"):
        training.begin_round(LedgerEntry(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=5))
    kept = PrivacyLedger.from_json(path.read_bytes(), path)
    assert kept.epsilon(part=HELD_OUT_PART) > 0  # the release is still charged


def test_a_crafted_infinite_or_nan_logit_reveals_nothing_and_raises_nothing():
    """+inf for the target: torch's loss is NaN if its label is 1, inf if 0. Both read alike."""
    import torch

    from client.dp.held_out import finite_predictions

    released = []
    for label in (0.0, 1.0):
        logits = torch.tensor([[math.inf, 0.3, -0.2], [-1.0, math.nan, 0.5]])
        targets = torch.tensor([[label, 0.0, 1.0], [0.0, 1.0, 0.0]])
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, targets, reduction="none"
        ).mean(1)
        assert not torch.isfinite(losses).all()  # what the crafted model achieves
        clean_logits, clean_losses = finite_predictions(logits.numpy(), losses.numpy())
        stats = stats_of(clean_logits, targets.numpy(), clean_losses)  # no exception
        released.append((stats.loss_sum, np.isfinite(stats.to_vector()).all()))
    assert released[0] == released[1] == (2 * EVAL_LOSS_CLIP, True)
