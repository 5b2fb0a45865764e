"""Epsilon checked against Google's dp-accounting, an implementation independent of Opacus.

Histories vary (q, sigma, steps, delta) and change sigma or q between rounds, as when a
hospital's data grows. RDP is compared with RDP (same orders): never above
dp-accounting's, and within 3% of it (at fractional orders dp-accounting's RDP is a
looser bound, up to ~2% above the exact value, which Opacus computes; checked here
against the Renyi divergence integrated numerically). Opacus's PRV with dp-accounting's
PLD, within PRV's stated error (eps_error = 0.01) plus 0.1%.
The ledger's exported JSON alone is enough to recompute the same epsilon.
"""

import json
import logging

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from client.dp.accounting import RDP, RDP_ORDERS, compute_epsilon
from shared_model.cli import build_app
from tests.support.dp import POLICY, dp_accounting_epsilon, one_round
from tests.support.tier import examples


class DroppedOrders(logging.Handler):
    """Counts the RDP orders dp-accounting could not evaluate (it warns and drops them)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += "Excluding this order" in record.getMessage()


DROPPED = DroppedOrders()
logging.getLogger("absl").addHandler(DROPPED)
logging.getLogger("absl").propagate = False

PRV_EPS_ERROR = 0.01  # Opacus PRVAccountant.get_epsilon's default eps_error


round_strategy = st.tuples(
    st.floats(0.5, 4.0), st.floats(0.001, 0.2), st.integers(1, 600)
)  # (sigma, q, steps)


@settings(max_examples=examples(60), deadline=None)
@given(st.lists(round_strategy, min_size=1, max_size=6), st.sampled_from([1e-4, 1e-5, 1e-6]))
@example([(2.375, 0.2, 58), (2.0, 0.16796875, 592)], 1e-4)  # found: 1.2% below (order 2.7)
def test_rdp_matches_dp_accounting(history, delta):
    ours = compute_epsilon(history, delta, "rdp")
    dropped = DROPPED.count
    theirs = dp_accounting_epsilon(history, delta, "rdp")
    assert ours <= theirs * (1 + 1e-9)  # equal at integer orders, looser at fractional
    if DROPPED.count == dropped:  # else dp-accounting minimized over fewer orders
        assert ours >= theirs * 0.97


@pytest.mark.parametrize(
    ("sigma", "q", "order"),
    [(2.0, 0.16796875, 2.5), (2.0, 0.16796875, 2.7), (0.8, 0.05, 1.5), (1.3, 0.2, 3.0)],
)
def test_per_step_rdp_is_the_renyi_divergence_integrated_numerically(sigma, q, order):
    """The sampled Gaussian's RDP at a (fractional) order, from its definition."""
    from mpmath import inf, log, mp, mpf, npdf, quad

    mp.dps = 30
    a, s, q_ = mpf(order), mpf(sigma), mpf(q)

    def mixture(z):
        return (1 - q_) * npdf(z, 0, s) + q_ * npdf(z, 1, s)

    # both directions; the mechanism's RDP is the larger
    forward = quad(lambda z: npdf(z, 0, s) * (mixture(z) / npdf(z, 0, s)) ** a, [-inf, 0, 1, inf])
    backward = quad(lambda z: mixture(z) * (npdf(z, 0, s) / mixture(z)) ** a, [-inf, 0, 1, inf])
    exact = float(max(log(forward), log(backward)) / (a - 1))
    ours = RDP.per_step(sigma, q)[RDP_ORDERS.index(order)]
    assert ours == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize(
    ("history", "delta"),
    [
        ([(1.0, 0.05, 100)], 1e-5),
        ([(0.7, 0.02, 300)], 1e-6),
        ([(2.0, 0.1, 50)], 1e-4),
        ([(1.1, 0.05, 40), (1.1, 0.05, 40), (1.1, 0.05, 40)], 1e-5),  # fixed plan, 3 rounds
        ([(0.9, 0.05, 40), (1.2, 0.03, 66)], 1e-5),  # sigma and q change
        ([(1.0, 0.08, 25), (1.0, 0.04, 50), (1.0, 0.02, 100)], 1e-5),  # the data doubles twice
    ],
)
def test_prv_matches_an_independent_pld_within_the_stated_error(history, delta):
    ours = compute_epsilon(history, delta, "prv")
    pld = dp_accounting_epsilon(history, delta, "pld")
    assert abs(ours - pld) <= PRV_EPS_ERROR + 1e-3 * pld


def grow_a_hospital(state_dir, sizes):
    """Rounds at a hospital whose data grows between rounds: q changes every round."""
    for r, n in enumerate(sizes, start=1):
        assert one_round(state_dir, POLICY, r, n=n, planned=len(sizes), hospital="st-mary")


def test_the_exported_json_alone_recomputes_the_recorded_epsilon(tmp_path):
    grow_a_hospital(tmp_path, [600, 900, 1500])
    result = CliRunner().invoke(build_app(), ["ledger", "show", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert set(view) >= {"hospital", "accountant", "delta", "max_epsilon", "epsilon", "history"}
    history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in view["history"]]
    # N grew every round; the sample rate did not: it comes from the released N̂ alone
    assert [e["mechanism"] for e in view["history"]] == ["record-count", *["dp-sgd"] * 3]
    assert len({q for _, q, _ in history[1:]}) == 1 and view["public_records"] > 0
    # Any accountant, from the JSON alone: RDP agrees with the record; PLD is tighter.
    assert dp_accounting_epsilon(history, view["delta"], "rdp") == pytest.approx(
        view["epsilon"], rel=0.01
    )
    default_orders = RdpAccountant()  # dp-accounting's own orders, not ours
    for sigma, q, steps in history:
        default_orders.compose(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    assert default_orders.get_epsilon(view["delta"]) == pytest.approx(view["epsilon"], rel=0.01)
    assert dp_accounting_epsilon(history, view["delta"], "pld") <= view["epsilon"]
    after = [e["epsilon_after"] for e in view["history"]]
    assert after == sorted(after) and after[-1] == pytest.approx(view["epsilon"])


def test_ledger_show_is_readable_and_refuses_a_tampered_ledger(tmp_path):
    grow_a_hospital(tmp_path, [600, 600])
    runner = CliRunner()
    shown = runner.invoke(build_app(), ["ledger", "show", str(tmp_path)])
    assert shown.exit_code == 0 and "st-mary: epsilon" in shown.output and "left" in shown.output
    # no held-out release in its ledger: the zero is not read as exact statistics being free
    assert "no noised release recorded" in shown.output and "carry no epsilon" in shown.output
    path = tmp_path / "privacy_ledger.json"
    data = json.loads(path.read_text())
    data["history"][1]["steps"] = 1  # someone lowers the recorded spend
    path.write_text(json.dumps(data))
    refused = runner.invoke(build_app(), ["ledger", "show", str(tmp_path)])
    assert refused.exit_code == 2 and "cannot be trusted" in refused.output
    missing = runner.invoke(build_app(), ["ledger", "show", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no privacy ledger" in missing.output
