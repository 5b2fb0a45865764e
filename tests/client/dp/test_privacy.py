"""Privacy properties: the ledger, epsilon composition and budget enforcement."""

import json
import math
from dataclasses import replace

import dp_accounting
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.app.private_round import private_round
from client.dp import accounting
from client.dp.accounting import RDP_ORDERS, RdpTable, compute_epsilon
from client.dp.ledger import DP_SGD, RECORD_COUNT, LedgerEntry, LedgerError, PrivacyLedger
from client.dp.policy import PrivacyPolicy, effective_policy
from shared_model.config import HospitalConfig, PrivacyConfig, RunConfig
from tests.support.dp import (
    POLICY,
    CrashError,
    independent_rdp_epsilon,
    ledger_site,
    one_round,
    planned_steps,
)
from tests.support.tier import examples

# The rounds below run the trainer's own ledger sequence (client/app/private_round.py)
# with a training stage that takes the planned steps and reads no record.
ONE_EPOCH = RunConfig.from_run_config({"train.batch-size": 64, "train.local-epochs": 1})


def run_rounds(tmp_path, rounds, policy=POLICY, n=1000, planned=3):
    return [one_round(tmp_path, policy, r, n=n, planned=planned) for r in range(1, rounds + 1)]


def first_round(tmp_path, training):
    """Round 1 of 3 at a fresh hospital of 500 records, with ``training`` as its stage."""
    return private_round(
        ledger_site(tmp_path, POLICY),
        ONE_EPOCH,
        server_round=1,
        planned_rounds=3,
        num_examples=500,
        ledger_seen=(),
        count_noise=None,
        train=training,
    )


def test_epsilon_grows_every_round_and_matches_fresh_accountants(tmp_path):
    eps = run_rounds(tmp_path, 3)
    assert eps[0] < eps[1] < eps[2]
    ledger = PrivacyLedger.open(tmp_path, "h0", POLICY)
    history = ledger.accountant_history()
    assert [e.mechanism for e in ledger.history] == [RECORD_COUNT, DP_SGD, DP_SGD, DP_SGD]
    assert {e.status for e in ledger.history} == {"completed"}
    # a freshly built Opacus accountant fed the same history
    from opacus.accountants import RDPAccountant

    fresh = RDPAccountant()
    fresh.history = list(history)
    assert eps[2] == pytest.approx(fresh.get_epsilon(1e-5, alphas=RDP_ORDERS), rel=1e-9)
    assert eps[2] == pytest.approx(independent_rdp_epsilon(history, 1e-5), rel=1e-6)


def test_noise_is_planned_to_spend_the_target_over_the_planned_rounds(tmp_path):
    eps = run_rounds(tmp_path, 3, planned=3)
    assert 0.97 * POLICY.target_epsilon <= eps[-1] <= POLICY.target_epsilon
    ledger = PrivacyLedger.open(tmp_path, "h0", POLICY)
    rounds = [e for e in ledger.history if e.mechanism == DP_SGD]
    assert {e.noise_multiplier for e in rounds} == {ledger.noise_multiplier}


def test_round_beyond_budget_is_declined_with_numbers(tmp_path):
    policy = PrivacyPolicy(**{**POLICY.__dict__, "max_epsilon": 8.05})
    eps = run_rounds(tmp_path, 5, policy=policy, planned=3)
    assert eps[3] is None and eps[4] is None  # rounds 4 and 5 would overrun
    ledger = PrivacyLedger.open(tmp_path, "h0", policy)
    assert [e.round for e in ledger.history if e.mechanism == DP_SGD] == [1, 2, 3]

    def never(plan, prior):
        raise AssertionError("a declined round trained")

    declined = private_round(
        ledger_site(tmp_path, policy),
        RunConfig.from_run_config({"train.batch-size": 64, "train.local-epochs": 2}),
        server_round=6,
        planned_rounds=3,
        num_examples=1000,
        ledger_seen=(),
        count_noise=None,
        train=never,
    )
    reason = declined.plan.reason
    assert declined.trained is None and declined.epsilon == ledger.epsilon()
    assert "max-epsilon 8.05" in reason and "would raise epsilon" in reason
    assert PrivacyLedger.open(tmp_path, "h0", policy).history == ledger.history  # unwritten


@settings(max_examples=examples(20), deadline=None)
@given(
    max_eps=st.floats(0.5, 12.0),
    target=st.floats(0.5, 12.0),
    planned=st.integers(1, 6),
    rounds=st.integers(1, 9),
    n=st.integers(100, 3000),
    skips=st.sets(st.integers(1, 9), max_size=4),
)
def test_recorded_epsilon_never_exceeds_the_hospitals_max(
    tmp_path_factory, max_eps, target, planned, rounds, n, skips
):
    """Across any sequence of rounds, skipped rounds and restarts."""
    state = tmp_path_factory.mktemp("ledger")
    policy = PrivacyPolicy(
        **{**POLICY.__dict__, "max_epsilon": max_eps, "target_epsilon": min(target, max_eps)}
    )
    for r in range(1, rounds + 1):
        if r in skips:
            continue  # not sampled this round
        one_round(state, policy, r, n=n, planned=planned, local_epochs=1)
        assert PrivacyLedger.open(state, "h0", policy).epsilon() <= max_eps


@pytest.mark.fault(
    "A hospital crashing mid-training",
    "The round was written to its ledger before the first step, and counts in full",
    "the ledger",
)
def test_round_is_counted_before_training_touches_data(tmp_path):
    """A crash mid-round leaves the round counted in full (the conservative choice)."""
    seen = {}

    def training(plan, prior):
        # what a restarted process would read the moment training starts
        seen["plan"], seen["on disk"] = plan, PrivacyLedger.open(tmp_path, "h0", POLICY)
        raise CrashError("the process dies here, mid-training")

    with pytest.raises(CrashError):
        first_round(tmp_path, training)
    started = seen["on disk"].history[-1]
    assert (started.round, started.mechanism, started.status) == (1, DP_SGD, "started")
    assert seen["on disk"].epsilon() == pytest.approx(seen["plan"].epsilon_after)
    reopened = PrivacyLedger.open(tmp_path, "h0", POLICY)
    assert reopened.history[-1].status == "started"
    assert reopened.epsilon() == pytest.approx(seen["plan"].epsilon_after)


def test_ledger_survives_restart(tmp_path):
    run_rounds(tmp_path, 2)
    before = PrivacyLedger.open(tmp_path, "h0", POLICY)
    after = PrivacyLedger.open(tmp_path, "h0", POLICY)
    assert after.history == before.history and after.epsilon() == before.epsilon() > 0
    assert after.noise_multiplier == before.noise_multiplier


@pytest.mark.fault(
    "A privacy ledger edited, truncated or corrupted",
    "The hospital refuses to train, naming the ledger",
    "the privacy guarantee (never read as a smaller epsilon)",
)
@pytest.mark.parametrize("tamper", ["lower_epsilon", "drop_round", "truncate", "garbage"])
def test_tampered_or_corrupt_ledger_is_refused(tmp_path, tamper):
    run_rounds(tmp_path, 2)
    path = tmp_path / "privacy_ledger.json"
    text = path.read_text()
    data = json.loads(text)
    if tamper == "lower_epsilon":
        data["epsilon"] = 0.1
        path.write_text(json.dumps(data))
    elif tamper == "drop_round":
        data["history"] = data["history"][:1]
        path.write_text(json.dumps(data))
    elif tamper == "truncate":
        path.write_text(text[: len(text) // 2])
    else:
        path.write_bytes(b"\x00\xff garbage")
    with pytest.raises(LedgerError, match="refuses to train"):
        PrivacyLedger.open(tmp_path, "h0", POLICY)


def test_ledger_of_another_hospital_is_refused(tmp_path):
    run_rounds(tmp_path, 1)
    with pytest.raises(LedgerError, match="belongs to 'h0'"):
        PrivacyLedger.open(tmp_path, "h1", POLICY)


def test_more_steps_than_recorded_is_refused(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "h0", POLICY)
    ledger.begin_round(LedgerEntry(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10))
    with pytest.raises(LedgerError, match="only 10 were recorded"):
        ledger.complete_round(1, 11)


@pytest.mark.parametrize("slip", ["a step Opacus did not count", "a step short of the plan"])
def test_a_round_whose_steps_disagree_with_the_ledger_fails_charged_in_full(tmp_path, slip):
    """Opacus's own accountant must agree with the ledger, or the round fails."""
    planned = {}

    def training(plan, prior):
        honest = planned_steps(plan, prior, policy=POLICY)
        planned["steps"], planned["epsilon"] = plan.entry.steps, plan.epsilon_after
        if slip == "a step short of the plan":
            return replace(honest, steps=honest.steps - 1)
        sigma, q, steps = honest.opacus_history[-1]
        return replace(honest, opacus_history=[*honest.opacus_history[:-1], (sigma, q, steps - 1)])

    with pytest.raises(LedgerError, match="planned steps; Opacus counted epsilon"):
        first_round(tmp_path, training)
    ledger = PrivacyLedger.open(tmp_path, "h0", POLICY)
    assert ledger.history[-1].steps == planned["steps"]  # the planned release, not fewer
    assert ledger.epsilon() == pytest.approx(planned["epsilon"])


def test_hospital_policy_caps_the_servers_request():
    asked = PrivacyConfig(target_epsilon=20.0, delta=1e-3)
    policy = effective_policy(
        asked, HospitalConfig(max_epsilon=4.0, delta=1e-6, partition_id=0, num_partitions=1)
    )
    assert policy.target_epsilon == 4.0 and policy.max_epsilon == 4.0 and policy.delta == 1e-6


def test_prv_accountant_agrees_with_an_independent_pld():
    history = [(0.9, 0.05, 40), (1.2, 0.03, 66)]
    from dp_accounting.pld import PLDAccountant

    pld = PLDAccountant()
    for sigma, q, steps in history:
        pld.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    assert compute_epsilon(history, 1e-5, "prv") == pytest.approx(pld.get_epsilon(1e-5), rel=0.02)
    assert math.isclose(compute_epsilon([], 1e-5), 0.0)


@settings(max_examples=examples(25), deadline=None)
@given(
    max_eps=st.floats(0.5, 12.0),
    planned=st.integers(1, 6),
    sizes=st.lists(st.integers(50, 4000), min_size=1, max_size=8),
    skips=st.sets(st.integers(1, 8), max_size=3),
    crashes=st.sets(st.integers(1, 8), max_size=3),
)
def test_budget_holds_while_data_grows_rounds_crash_and_processes_restart(
    tmp_path_factory, max_eps, planned, sizes, skips, crashes
):
    """q and steps change every round; a crashed round counts in full; nothing exceeds."""
    state = tmp_path_factory.mktemp("ledger")
    policy = PrivacyPolicy(**{**POLICY.__dict__, "max_epsilon": max_eps, "target_epsilon": max_eps})
    spent = 0.0
    for r, n in enumerate(sizes, start=1):
        if r in skips:
            continue
        # a fresh process every round; a crash leaves the entry "started", counted in full
        one_round(state, policy, r, n=n, planned=planned, local_epochs=1, crash=r in crashes)
        reopened = PrivacyLedger.open(state, "h0", policy)
        this_round = [e for e in reopened.history if e.round == r and e.mechanism == DP_SGD]
        if this_round:  # not declined: begun before training, completed only after it
            assert this_round[0].status == ("started" if r in crashes else "completed")
        assert reopened.epsilon() <= max_eps
        assert reopened.epsilon() >= spent  # never decreases, never resets
        spent = reopened.epsilon()


def test_per_step_rdp_carried_between_processes_gives_the_same_epsilon(monkeypatch):
    """What a deployed hospital's handlers keep in Flower's node state between messages."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    history = [(1.3, 0.05, 40), (1.3, 0.05, 40), (0.9, 0.1, 20)]
    monkeypatch.setattr(accounting, "RDP", RdpTable())
    expected = compute_epsilon(history, 1e-5)
    compute_epsilon([(2.0, 0.01, 5)], 1e-5)  # another hospital's, in the same worker
    carried = accounting.RDP.export((s, q) for s, q, _ in history)
    assert len(carried) == 2
    monkeypatch.setattr(accounting, "RDP", RdpTable())  # a fresh process for the next message
    assert accounting.RDP.absorb(carried) == 2

    def not_again(**_kwargs):
        raise AssertionError("per-step RDP computed again although it was carried over")

    monkeypatch.setattr(opacus_rdp, "compute_rdp", not_again)
    assert compute_epsilon(history, 1e-5) == expected


@pytest.mark.parametrize(
    "damage",
    [
        lambda v: v[:-1],  # an order missing
        lambda v: [-1.0, *v[1:]],  # negative
        lambda v: [math.nan, *v[1:]],
        lambda v: ["x", *v[1:]],
    ],
)
def test_a_damaged_carried_rdp_entry_is_computed_again(monkeypatch, damage):
    monkeypatch.setattr(accounting, "RDP", RdpTable())
    expected = compute_epsilon([(1.1, 0.2, 10)], 1e-5)
    ((key, values),) = accounting.RDP.export([(1.1, 0.2)]).items()
    monkeypatch.setattr(accounting, "RDP", RdpTable())
    assert accounting.RDP.absorb({key: damage(values), "not|a key": values}) == 0
    assert len(accounting.RDP) == 0
    assert compute_epsilon([(1.1, 0.2, 10)], 1e-5) == expected


def test_a_ledger_of_the_version_that_sent_exact_counts_and_losses_is_not_continued(tmp_path):
    """Its epsilon does not bound what that version released: continuing would understate."""
    from client.dp.ledger import _checksum

    run_rounds(tmp_path, 1)
    path = tmp_path / "privacy_ledger.json"
    data = json.loads(path.read_text())
    data.pop("checksum")
    data["format"] = "fedfusion-privacy-ledger/1"
    path.write_text(json.dumps({**data, "checksum": _checksum(data)}))
    with pytest.raises(LedgerError, match=r"earlier fedfusion.*outside the DP accounting"):
        PrivacyLedger.open(tmp_path, "h0", POLICY)
