"""The sparse-share margins docs/privacy.md quotes, checked against what is known exactly."""

import math

import numpy as np
import pytest

from benchmarks.secagg_protocol import _gaps, exposed, margins, round_fails, split


@pytest.mark.parametrize(("n", "t"), [(10, 7), (100, 67)])
def test_on_the_complete_graph_an_upload_is_exposed_exactly_when_t_collude(n, t):
    assert exposed(n, n, t, t - 1) == 0.0
    assert exposed(n, n, t, t) == pytest.approx(1.0)


def test_exposure_on_a_sparse_graph_is_the_hypergeometric_tail():
    # 100 hospitals, 15 shares, threshold 10, 33 colluders: P(X >= 10), X ~ HG(99, 33, 14)
    tail = sum(math.comb(33, x) * math.comb(66, 14 - x) / math.comb(99, 14) for x in range(10, 15))
    assert exposed(100, 15, 10, 33) == pytest.approx(tail, rel=1e-9)
    assert 1e-3 < tail < 3e-3  # what the docs quote: 2.0e-3


def test_round_failures_on_the_complete_graph_follow_the_binomial_tail():
    rng = np.random.default_rng(1)
    # 10 hospitals, threshold 7: the round fails when 4 or more of 10 drop out
    want = sum(math.comb(10, d) * 0.2**d * 0.8 ** (10 - d) for d in range(4, 11))
    assert round_fails(10, 10, 7, 0.2, rng, draws=40_000) == pytest.approx(want, abs=0.01)


def test_a_sparse_graph_fails_more_rounds_than_the_complete_one():
    rng = np.random.default_rng(2)
    sparse, complete = (
        round_fails(100, 15, 10, 0.1, rng, 5_000),
        round_fails(100, 100, 67, 0.1, rng),
    )
    assert sparse > 0.02 and complete < 0.001
    assert split(100, 15, 0, rng) == 0.0 and split(100, 100, 33, rng) == 0.0


def test_two_runs_of_colluders_as_long_as_the_links_cut_the_honest_hospitals_apart():
    """On a ring where each is linked to the 2 on either side (k = 5)."""
    ring = np.ones((3, 20), dtype=bool)
    ring[0, [3, 4, 12, 13]] = False  # two runs of 2: cut in two
    ring[1, [3, 4, 12]] = False  # one run of 2, one of 1: still connected
    ring[2, [3, 4, 5, 6]] = False  # one long run: a path, still connected
    assert list(_gaps(ring, 2) >= 2) == [True, False, False]


def test_margins_put_the_servers_default_plan_beside_the_complete_graph():
    m = margins(100, np.random.default_rng(0))
    assert m["sparse"] == (15, 10) and m["complete"] == (100, 67)
    assert m["sparse/tolerated"] == 5 and m["complete/tolerated"] == 33


def test_the_sparse_protocol_bench_runs_the_sparse_plan(monkeypatch):
    """`python -m benchmarks.secagg_protocol sparse` measures sparse shares: each hospital's
    key material is smaller than with the complete graph at the same size (12: 9 shares)."""
    from flwr.supercore.task_identity import TaskIdentity

    from benchmarks.secagg_protocol import _measure, run_sparse_protocol_bench

    def key_bytes(measured):
        (m,) = [m for m in measured if "bytes-up-keys" in m.name]
        return m.median

    sparse = run_sparse_protocol_bench([12], 1, echo=lambda *_: None)
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):  # as a ServerApp
        monkeypatch.setattr(TaskIdentity, name, value)
    complete = _measure("protocol", 12, 1, 0, lambda *_: None, ("signed",))
    assert key_bytes(sparse) < 0.85 * key_bytes(complete)
