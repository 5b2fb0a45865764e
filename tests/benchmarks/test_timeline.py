"""One round's hops laid out from timeline marks (benchmarks/timeline.py)."""

from __future__ import annotations

import pytest

from benchmarks.timeline import _rounds, hops_of_round


def _e(t: float, event: str, pid: int = 1, **fields: object) -> dict[str, object]:
    return {"t": t, "pid": pid, "event": event, **fields}


def _round() -> list[dict[str, object]]:
    """Two hospitals (nodes 11, 12) answer a `setup` stage, then one `unmask` stage."""
    return [
        _e(100.0, "server.round"),
        _e(100.1, "server.push", stage="setup"),
        _e(100.2, "server.pushed", stage="setup"),
        _e(100.4, "node.pulled", pid=2, node=11),
        _e(100.9, "node.pulled", pid=3, node=12),
        _e(101.0, "clientapp.forked", pid=21),  # its node: from its own handle mark
        _e(101.1, "clientapp.handle", pid=21, stage="setup", node=11),
        _e(101.2, "clientapp.forked", pid=22),
        _e(101.3, "clientapp.handle", pid=22, stage="setup", node=12),
        _e(101.5, "clientapp.handled", pid=21, stage="setup", node=11),
        _e(101.6, "clientapp.handled", pid=22, stage="setup", node=12),
        _e(101.7, "node.sent", pid=2, node=11),
        _e(101.9, "node.sent", pid=3, node=12),
        _e(102.3, "server.replies", pending=0),
        _e(102.4, "server.push", stage="unmask"),
        _e(102.5, "server.pushed", stage="unmask"),
        _e(103.0, "node.pulled", pid=2, node=11),
        _e(103.5, "server.replies", pending=1),
    ]


def test_each_hop_is_timed_at_the_slowest_hospital_from_the_rounds_start():
    # Execute
    hops = hops_of_round(_round())
    # Assert
    table = {(h.stage, h.hop): h for h in hops}
    assert [h.stage for h in hops][:1] == ["setup"] and hops[-1].stage == "unmask"
    pulled = table["setup", "SuperNode: got objects"]
    assert pulled.at == pytest.approx(0.9) and pulled.first == pytest.approx(0.4)
    forked = table["setup", "ClientApp: forked"]  # matched to its node through its pid
    assert forked.at == pytest.approx(1.2) and forked.first == pytest.approx(1.0)
    assert table["setup", "server: all replies"].at == pytest.approx(2.3)
    assert table["unmask", "SuperNode: got objects"].step == pytest.approx(3.0 - 2.5)
    # steps chain: each is the time since the hop listed before it
    assert sum(h.step for h in hops) == pytest.approx(hops[-1].at)
    assert ("unmask", "ClientApp: handling") not in table  # no mark, no row


def test_rounds_split_at_each_round_mark():
    events = [_e(1.0, "node.pulled"), *_round(), *_round()[:3]]
    rounds = _rounds(events)
    assert [len(r) for r in rounds] == [len(_round()), 3]  # what came before a round: none
