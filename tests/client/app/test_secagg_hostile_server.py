"""A coordinator that lies in every SecAgg+ message gets no hospital's upload.

Every attack drives the real hospital-side code (tests/support/hostile_server.py) as a
hostile server would. Each is first run against the hospital code as it was before
hospitals signed their keys and survivor sets (``TODAYS_HOSPITAL``), where it
reconstructs the target's individual upload exactly; then against the hospital code
now, where the server does its best to satisfy the new checks and every hospital it
needs refuses by name (never a malformed-message error), and nothing can be
reconstructed. Prepare / Execute / Assert, as Flower's own tests.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common import MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from shared_model.config import HospitalConfig
from tests.support.flower import make_message
from tests.support.hostile_server import (
    NOW,
    TODAYS_HOSPITAL,
    Lab,
    exact,
    unmasked_mean,
    upload_of,
)

T, A, B, C, D = 101, 102, 103, 104, 105


def split_unmask(lab: Lab, views: dict, lists: dict) -> None:
    """Unmask with each hospital's own view; against signed code, with every signature
    over that same view the server could collect (the best a lying server can do)."""
    if lab.mods is TODAYS_HOSPITAL:
        lab.unmask({n: (*lists[n], {}) for n in lists})
        return
    lab.consistency(views)
    records = {}
    for node, view in views.items():
        same = [m for m in lab.signed if views[m] == view]
        records[node] = lab.signatures(view, same)
    lab.unmask({n: (*lists[n], records[n]) for n in lists})


def codes(lab: Lab) -> set[str]:
    assert all(r.code for r in lab.refusals), [r.reason for r in lab.refusals]
    return {r.code for r in lab.refusals}


# ---------------------------------------------------------------- the attacks
def split_views_with_a_duplicate(lab: Lab) -> None:
    """The target is told its neighbours dropped out (itself listed twice to meet the
    threshold); each neighbour is told the target survived and the other dropped."""
    lab.setup((3, 3, 2))
    lab.share_keys()
    lab.upload()
    everyone = [T, A, B]
    split_unmask(
        lab,
        views={T: (everyone, [T, T]), A: (everyone, [T, A]), B: (everyone, [T, B])},
        lists={T: ([T, T], [A, B]), A: ([T, A], [B]), B: ([T, B], [A])},
    )


def split_views_at_a_low_threshold(lab: Lab) -> None:
    """5 hospitals, a server-chosen threshold of 3: the target gets only A's and B's key
    shares (so it masks with them alone) and is left out of the unmasking; the others are
    told the target survived and A or B dropped. No duplicate anywhere."""
    lab.setup((5, 5, 3))
    lab.share_keys()
    lab.upload(withhold={T: {C, D}})
    everyone = [T, A, B, C, D]
    lists = {A: ([T, A, C], [B]), B: ([T, B, D], [A]), C: ([T, C, D], [A, B])}
    lists[D] = ([T, C, D], [A, B])
    split_unmask(lab, {n: (everyone, lists[n][0]) for n in lists}, lists)


def split_lists_after_an_honest_consistency_round(lab: Lab) -> None:
    """Everyone signs the true survivor set; the unmasking lists then lie."""
    lab.setup((3, 3, 2))
    lab.share_keys()
    lab.upload()
    everyone = [T, A, B]
    if lab.mods is NOW:
        lab.consistency({n: (everyone, everyone) for n in everyone})
        record = lab.signatures((everyone, everyone), everyone)
    else:
        record = {}
    lists = {T: ([T, T], [A, B]), A: ([T, A], [B]), B: ([T, B], [A])}
    lab.unmask({n: (*lists[n], record) for n in lists})


def substituted_keys(lab: Lab) -> None:
    """The server puts its own public keys in the target's key list for both neighbours:
    the target encrypts its key shares for the server, and masks with keys it knows."""
    lab.setup((3, 3, 2))
    lists = {n: lab.key_list([T, A, B]) for n in (A, B)}
    lists[T] = lab.substituted([T, A, B], [A, B])
    lab.share_keys(lists)
    lab.forge_shares(T)
    lab.upload()


def invented_member(lab: Lab) -> None:
    """As above, but the server's keys are claimed for a hospital it made up."""
    lab.setup((3, 3, 2))
    lists = {n: lab.key_list([T, A, B]) for n in (A, B)}
    keys, records = lab.substituted([T, A, B], [A, B])
    records[next(iter(records))]["members"] = ["hospital-0", "hospital-7", "hospital-8"]
    lists[T] = (keys, records)
    lab.share_keys(lists)
    lab.forge_shares(T)
    lab.upload()


def replayed_signatures(lab: Lab) -> None:
    """Round 1 runs honestly; in round 2 the server splits the views and offers the
    round-1 survivor signatures as the quorum."""
    everyone = [T, A, B]
    lab.setup((3, 3, 2))
    lab.share_keys()
    lab.upload()
    old = {}
    if lab.mods is NOW:
        lab.consistency({n: (everyone, everyone) for n in everyone})
        old = lab.signatures((everyone, everyone), everyone)
    lab.unmask({n: (everyone, [], old) for n in everyone})
    lab.round, lab.masked, lab.shares, lab.signed, lab.refusals = 2, {}, {}, {}, []
    lab.setup((3, 3, 2))
    lab.share_keys()
    lab.upload()
    lists = {T: ([T, T], [A, B]), A: ([T, A], [B]), B: ([T, B], [A])}
    records = {n: {} for n in lists}
    if lab.mods is NOW:
        views = {T: (everyone, [T]), A: (everyone, [T, A]), B: (everyone, [T, B])}
        lab.consistency(views)
        for node, (completed, survivors) in views.items():  # round 1's signatures, as if
            record = next(iter(old.values())).copy()  # they were over this round's view
            record.update({"completed": completed, "survivors": survivors})
            records[node] = {next(iter(old)): record}
    lab.unmask({n: (*lists[n], records[n]) for n in lists})


ATTACKS = {
    "split views with a duplicate": (split_views_with_a_duplicate, 3, {}, 2),
    "split views at a low threshold": (split_views_at_a_low_threshold, 5, {}, 3),
    "split views, hospital floor lowered": (
        split_views_at_a_low_threshold,
        5,
        {"secagg-min-threshold": 0.55},
        3,
    ),
    "split lists after consistency": (split_lists_after_an_honest_consistency_round, 3, {}, 2),
    "substituted keys": (substituted_keys, 3, {}, 2),
    "invented member": (invented_member, 3, {}, 2),
    "replayed signatures": (replayed_signatures, 3, {}, 2),
}
REFUSED_AS = {
    "split views with a duplicate": {"duplicate-id", "unsigned", "no-quorum"},
    "split views at a low threshold": {"below-floor", "out-of-order"},
    "split views, hospital floor lowered": {"no-quorum"},
    "split lists after consistency": {"duplicate-id", "split-view"},
    "substituted keys": {"forged-signature"},
    "invented member": {"unlisted-member"},
    "replayed signatures": {"below-threshold", "unsigned", "no-quorum"},
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_the_attack_unmasks_one_upload_against_the_hospital_code_before_signatures(tmp_path, name):
    # Prepare
    attack, hospitals, policy, threshold = ATTACKS[name]
    lab = Lab(tmp_path, TODAYS_HOSPITAL, hospitals, policy)
    # Execute
    attack(lab)
    # Assert: the target's own upload, exactly (to the quantization step)
    assert exact(lab.reconstruct(T, threshold), T), [r.reason for r in lab.refusals]


@pytest.mark.fault(
    "A lying server: split survivor views, duplicate ids, a low threshold, substituted, "
    "invented or replayed keys and signatures",
    "Each hospital it needs refuses by name ([split-view], [no-quorum], [below-floor], "
    "[forged-signature], ...) before releasing any share",
    "every hospital's upload (none can be unmasked)",
)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_the_attack_is_refused_by_name_and_unmasks_nothing(tmp_path, name):
    # Prepare
    attack, hospitals, policy, threshold = ATTACKS[name]
    lab = Lab(tmp_path, NOW, hospitals, policy)
    # Execute
    attack(lab)
    # Assert
    assert codes(lab) == REFUSED_AS[name], [r.reason for r in lab.refusals]
    for node in lab.nodes:
        assert lab.reconstruct(node, threshold) is None


# ---------------------------------------------------------------- the honest protocol
def honest_round(lab: Lab, survivors: list[int]) -> None:
    everyone = lab.nodes
    lab.setup((len(everyone), len(everyone), 2 if len(everyone) == 3 else 3))
    lab.share_keys()
    lab.upload()
    lab.masked = {n: v for n, v in lab.masked.items() if n in survivors}  # the rest dropped
    view = (everyone, survivors)
    lab.consistency({n: view for n in survivors})
    record = lab.signatures(view, survivors)
    dead = sorted(set(everyone) - set(survivors))
    lab.unmask({n: (survivors, dead, record) for n in survivors})


def test_an_honest_server_unmasks_the_mean(tmp_path):
    lab = Lab(tmp_path, NOW, 3)
    honest_round(lab, [T, A, B])
    assert not lab.refusals
    got = unmasked_mean(lab, [T, A, B], 2)
    np.testing.assert_allclose(got, sum(upload_of(n) for n in (T, A, B)) / 3, atol=1e-5)


@pytest.mark.fault(
    "A hospital is lost after the SecAgg+ key exchange (signed protocol)",
    "The survivors sign the survivor set without it and unmask; the sum is theirs",
    "the survivors' mean, exact",
)
def test_a_hospital_lost_after_the_key_exchange_leaves_a_round_the_others_complete(tmp_path):
    lab = Lab(tmp_path, NOW, 3)
    honest_round(lab, [T, A])  # B uploaded nothing
    assert not lab.refusals
    got = unmasked_mean(lab, [T, A], 2)
    np.testing.assert_allclose(got, (upload_of(T) + upload_of(A)) / 2, atol=1e-5)


# ---------------------------------------------------------------- single refusals
@pytest.mark.fault(
    "The server shows a hospital other hospitals' signatures over a different survivor set",
    "The hospital refuses ([split-view]), keeps both statements and the signatures as "
    "evidence, and takes no further part in the run",
    "its mask seed (never released); the signed proof, in state-dir/secagg-evidence/",
)
def test_a_signed_contradiction_is_kept_as_evidence_and_ends_the_run(tmp_path):
    # Prepare: 4 hospitals; the target signs the true set, the others one without it
    lab = Lab(tmp_path, NOW, 4)
    lab.setup((4, 4, 3))
    lab.share_keys()
    lab.upload()
    everyone, others = [T, A, B, C], [A, B, C]
    lab.consistency({T: (everyone, everyone), **{n: (everyone, others) for n in others}})
    # Execute: the target is shown the others' signatures over their set
    lab.unmask({T: (others, [T], lab.signatures((everyone, others), others))})
    lab.setup((4, 4, 3), nodes=[T], round=2)
    # Assert
    assert [r.code for r in lab.refusals] == ["split-view", "run-stopped"]
    (evidence,) = (tmp_path / "hospitals" / "hospital-0" / "secagg-evidence").glob("*.json")
    kept = json.loads(evidence.read_text())
    assert sorted(s["member"] for s in kept["shown-to-this-hospital"]["signed"]) == [
        "hospital-1",
        "hospital-2",
        "hospital-3",
    ]
    assert '"survivors":[102,103,104]' in kept["shown-to-this-hospital"]["statement"]
    assert lab.reconstruct(T, 3) is None  # the others released its key, never its seed
    # restarted (its node state lost), it still takes no part in that run
    lab.ctx[T].state.config_records.clear()
    lab.setup((4, 4, 3), nodes=[T], round=3)
    assert lab.refusals[-1].code == "run-stopped"


def test_a_second_survivor_set_in_one_round_is_not_signed(tmp_path):
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    lab.share_keys()
    lab.upload()
    lab.consistency({T: ([T, A, B], [T, A, B])})
    lab.consistency({T: ([T, A, B], [T, A])})
    assert [r.code for r in lab.refusals] == ["second-statement"]


@pytest.mark.parametrize(
    ("plan", "policy"),
    [
        ((3, 3, 2), {"secagg-min-hospitals": 4}),  # fewer hospitals than its floor
        ((5, 5, 3), {}),  # threshold below ceil(2/3 of 5)
        # keys shared with only 7 of 9 (a graph the server chooses): this hospital wants all
        ((9, 7, 5), {"secagg-sparse-shares": False}),
        ((10, 7, 5), {}),  # a sparse graph is allowed, but 7 < 2 * ceil(log2 10) + 1
        ((10, 7, 5), {"secagg-min-shares": 3}),  # its own floor is lower; the log floor holds
        ((100, 13, 9), {}),  # the server's default at 100 is 15 shares: 13 is below the floor
        ((100, 15, 9), {}),  # threshold 9 of 15, below ceil(2/3 of 15) = 10
        ((100, 15, 10), {"secagg-min-shares": 21}),  # this hospital's own floor is higher
        ((100, 15, 10), {"secagg-min-threshold": 0.8}),  # and so is its threshold: 12
        ((1000, 19, 13), {}),  # 19 < 2 * ceil(log2 1000) + 1 = 21
        ((3, 3, 1), {}),
        ((1, 1, 1), {}),  # a round of one
        ((4, 4, 2), {}),  # a threshold of half the shares
        ((9, 7, 3), {}),
        ((2, 3, 2), {}),  # more shares than hospitals
    ],
)
def test_a_server_asking_for_less_than_the_hospitals_floor_is_declined(tmp_path, plan, policy):
    lab = Lab(tmp_path, NOW, 3, policy)
    lab.setup(plan, nodes=[T])
    assert [r.code for r in lab.refusals] == ["below-floor"]
    assert "secagg-min" in lab.refusals[0].reason


@pytest.mark.parametrize(
    ("plan", "policy"),
    [
        ((4, 4, 3), {}),
        ((10, 9, 6), {"secagg-min-shares": 3}),
        # the server's sparse plans (secagg.sparse), which a simulated hospital accepts
        # by default
        ((10, 9, 6), {}),
        ((100, 15, 10), {}),
        ((1000, 21, 14), {}),
        ((100, 21, 14), {"secagg-min-shares": 21}),
        ((100, 15, 12), {"secagg-min-threshold": 0.8}),
    ],
)
def test_parameters_at_or_above_the_hospitals_floor_are_accepted(tmp_path, plan, policy):
    lab = Lab(tmp_path, NOW, 3, policy)
    lab.setup(plan, nodes=[T])
    assert not lab.refusals


def test_a_key_list_other_than_the_announced_shares_is_refused(tmp_path):
    """The server leaves a real hospital out (it could put keys of its own in its place)."""
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    lab.share_keys({T: lab.key_list([T, A])})
    assert [r.code for r in lab.refusals] == ["key-count"]


@pytest.mark.parametrize(("active", "dead"), [([T, A, B], [A]), ([A, B], [T])])
def test_a_hospital_both_active_and_dropped_or_itself_dropped_is_refused(tmp_path, active, dead):
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    lab.share_keys()
    lab.upload()
    lab.consistency({n: (lab.nodes, lab.nodes) for n in lab.nodes})
    record = lab.signatures((lab.nodes, lab.nodes), lab.nodes)
    lab.unmask({T: (active, dead, record)})
    assert [r.code for r in lab.refusals] == ["both-active-and-dead"]
    assert not lab.shares


@pytest.mark.parametrize(
    ("when", "code"),
    [("setup again", "replay"), ("another run", "replay"), ("upload first", "out-of-order")],
)
def test_messages_replayed_or_out_of_order_are_refused(tmp_path, when, code):
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    if when == "setup again":  # an earlier round's key setup, after a later one
        lab.setup((3, 3, 2), nodes=[T], round=2)
        lab.setup((3, 3, 2), nodes=[T], round=1)
    elif when == "another run":
        lab.share_keys({T: lab.key_list([T, A, B])}, run=2)
    else:
        lab.sent_to = {A: {T: b"x"}}
        lab.upload()
    assert {r.code for r in lab.refusals} == {code}


def test_a_round_one_key_list_replayed_in_round_two_is_refused(tmp_path):
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    old = lab.key_list([T, A, B])
    lab.round = 2
    lab.setup((3, 3, 2))
    lab.share_keys({T: old})
    assert [r.code for r in lab.refusals] == ["forged-signature"]


@pytest.mark.parametrize("missing", ["record", "signatures"])
def test_keys_without_signatures_are_refused(tmp_path, missing):
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    keys, records = lab.key_list([T, A, B])
    if missing == "record":
        records = {}
    else:
        records[next(iter(records))]["signatures"] = [b"", b"", b""]
    lab.share_keys({T: (keys, records)})
    assert [r.code for r in lab.refusals] == [
        "unsigned" if missing == "record" else "forged-signature"
    ]


def test_an_unmasking_without_the_consistency_round_is_refused(tmp_path):
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    lab.share_keys()
    lab.upload()
    lab.unmask({n: ([T, A, B], [], {}) for n in (T, A, B)})
    assert {r.code for r in lab.refusals} == {"unsigned"}
    assert not lab.shares


def test_a_retried_round_sets_up_fresh_keys_and_completes(tmp_path):
    """server.short-round = retry runs a round again under the same number."""
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    first = dict(lab.keys)
    honest_round(lab, [T, A, B])
    assert not lab.refusals
    assert all(lab.keys[n] != first[n] for n in lab.nodes)  # new keys, not the old ones
    np.testing.assert_allclose(
        unmasked_mean(lab, [T, A, B], 2), sum(upload_of(n) for n in (T, A, B)) / 3, atol=1e-5
    )


def test_signatures_from_another_run_of_the_same_round_do_not_count(tmp_path):
    """The server runs round 1 again and again (its keys made anew each time), collecting
    real signatures over each view it wants, then offers them in the round it attacks:
    a survivor statement is bound to the round's keys, so they verify for nothing."""
    lab = Lab(tmp_path, NOW, 4)
    everyone, split = [T, A, B, C], {T: [T, A, B, C], A: [A, B, C], B: [A, B, C], C: [A, B, C]}
    bank = {}
    for view in {tuple(v) for v in split.values()}:
        lab.setup((4, 4, 3))
        lab.share_keys()
        lab.upload()
        lab.consistency({n: (everyone, list(view)) for n in view})
        bank[view] = lab.signatures((everyone, list(view)), list(view))
    lab.setup((4, 4, 3))  # the attack: T told all survived, the others that T dropped
    lab.share_keys()
    lab.upload()
    lab.consistency({n: (everyone, split[n]) for n in everyone})
    lab.unmask(
        {
            n: (split[n], sorted(set(everyone) - set(split[n])), bank[tuple(split[n])])
            for n in everyone
        }
    )
    assert {r.code for r in lab.refusals} == {"no-quorum"}
    assert not lab.shares and lab.reconstruct(T, 3) is None


def sparse_partner_attack(lab: Lab) -> None:
    """The server chooses the graph (9 shares of 16): the target and its 5 partners sign a
    view where all survive (its mask seed is released); the partners' other neighbours,
    whom the target never met, sign one where the partners dropped (their keys are
    released). No hospital colludes. (Found by an adversarial review.)"""
    ids = lab.nodes
    target, partners, x = ids[0], ids[1:6], ids[6]
    b, e = ids[7:12], ids[12:17]
    z = b + e
    b_of = {j: [b[(3 * i + s) % 5] for s in range(3)] for i, j in enumerate(partners)}
    e_of = {j: [e[(3 * i + s) % 5] for s in range(3)] for i, j in enumerate(partners)}
    d = {y: [j for j in partners if y in b_of[j] or y in e_of[j]] for y in z}
    ring = {z[i]: [z[(i + k) % 10] for k in (-2, -1, 1, 2, 5)] for i in range(10)}
    nbrs = {target: [target, *partners], x: [x, *partners]}
    nbrs.update({j: [j, target, x, *b_of[j], *e_of[j]] for j in partners})
    nbrs.update({y: [y, *d[y], *ring[y]] for y in z})
    lab.setup((16, 9, 6))
    if lab.refusals:  # the hospitals declined the plan: no keys to go on with
        return
    lab.share_keys({n: lab.key_list(sorted(nbrs[n])) for n in ids})
    lab.upload(withhold={j: set(e_of[j]) for j in partners})
    sa = sorted({target, *partners, x, *b})
    sb = (sorted({*z, *partners}), sorted(z))
    lab.consistency({**{n: (sa, sa) for n in [target, *partners, x]}, **{y: sb for y in z}})
    ra, rb = lab.signatures((sa, sa), [target, *partners, x]), lab.signatures(sb, z)
    lists = {target: (sorted([target, *partners]), [], ra), x: (sorted([x, *partners]), [], ra)}
    lists.update({j: (sorted([j, target, x, *b_of[j]]), [], ra) for j in partners})
    lists.update({y: (sorted([y, *ring[y]]), sorted(d[y]), rb) for y in z})
    lab.unmask(lists)


def own_data(tmp_path: Path) -> dict:
    """The node config of a hospital with its own data (not a simulated one)."""
    return {"data-manifest": str(tmp_path / "manifest.csv"), "state-dir": str(tmp_path / "s")}


def test_keys_shared_with_only_some_hospitals_are_declined_by_default_with_own_data(tmp_path):
    lab = Lab(tmp_path, NOW, 17, own_data(tmp_path))
    assert not HospitalConfig.from_node_config(lab.ctx[T].node_config).simulated
    sparse_partner_attack(lab)
    assert {r.code for r in lab.refusals} == {"below-floor"} and len(lab.refusals) == 17
    assert "graph the server chooses" in lab.refusals[0].reason
    assert "secagg-sparse-shares" in lab.refusals[0].reason
    assert lab.reconstruct(T, 6) is None


def test_a_simulated_hospital_that_says_no_to_a_sparse_graph_declines_it(tmp_path):
    lab = Lab(tmp_path, NOW, 17, {"secagg-sparse-shares": False})
    sparse_partner_attack(lab)
    assert {r.code for r in lab.refusals} == {"below-floor"} and len(lab.refusals) == 17


@pytest.mark.parametrize(
    "policy",
    [
        {},  # a simulated hospital (public data) accepts the server's sparse plan
        {"secagg-min-shares": 9},
        {"secagg-sparse-shares": True},
    ],
)
def test_a_hospital_that_allows_a_sparse_graph_is_not_protected_from_a_lying_server(
    tmp_path, policy
):
    """What docs/privacy.md says of sparse shares: the graph is the server's, so against
    a lying server it protects nothing, even with no colluding hospital."""
    lab = Lab(tmp_path, NOW, 17, policy)
    sparse_partner_attack(lab)
    assert not lab.refusals
    assert exact(lab.reconstruct(T, 6), T)


def test_a_failed_masked_upload_cannot_be_asked_again_to_train_once_more(tmp_path):
    """Flower's mod trains before it reads the key shares: a server sending one bad share
    could otherwise have the hospital train (and spend budget) again and again."""
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    lab.share_keys()
    good = lab.sent_to[A][T]
    lab.sent_to[A][T] = b"gAAAAA" + good[6:-4] + b"abcd"  # a share that does not decrypt
    lab.upload()
    assert T not in lab.masked and not lab.refusals[0].code  # Flower's own error
    lab.sent_to[A][T] = good
    lab.upload()
    assert T not in lab.masked
    assert [r.code for r in lab.refusals if r.node == T] == ["", "replay"]


def test_a_key_setup_flower_refuses_leaves_the_round_as_it_was(tmp_path):
    """The hospital's record and Flower's state never disagree about the round's keys."""
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    keys = dict(lab.keys)
    # round 2's setup without a clipping range: the guard passes it, Flower's mod does not
    content = RecordDict()
    content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
        {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2}
    )
    reply = lab.app(make_message(content, MessageType.TRAIN, T, group_id="2"), lab.ctx[T])
    assert reply.has_error()
    lab.keys = keys
    honest_round_from_key_sharing(lab)
    assert not lab.refusals
    got = unmasked_mean(lab, [T, A, B], 2)
    np.testing.assert_allclose(got, sum(upload_of(n) for n in (T, A, B)) / 3, atol=1e-5)


def honest_round_from_key_sharing(lab: Lab) -> None:
    lab.share_keys()
    lab.upload()
    view = (lab.nodes, lab.nodes)
    lab.consistency({n: view for n in lab.nodes})
    lab.unmask({n: (lab.nodes, [], lab.signatures(view, lab.nodes)) for n in lab.nodes})


def test_a_node_id_of_absurd_length_is_refused_by_name(tmp_path):
    lab = Lab(tmp_path, NOW, 3)
    lab.setup((3, 3, 2))
    keys, records = lab.key_list([T, A, B])
    keys["9" * 5000] = keys.pop(str(B))
    lab.share_keys({T: (keys, records)})
    assert [r.code for r in lab.refusals] == ["malformed"]
