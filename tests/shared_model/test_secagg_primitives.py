"""SecAgg+'s mask generator and secret sharing (shared_model/secagg_primitives.py)."""

import base64
import contextlib
import importlib
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from shared_model import secagg_primitives
from shared_model.secagg_primitives import (
    SCHEME,
    add_masks,
    bytes_to_private_key,
    bytes_to_public_key,
    combine_shares,
    create_shares,
    generate_key_pairs,
    generate_shared_key,
    private_key_to_bytes,
    pseudo_rand_gen,
    public_key_to_bytes,
    subtract_masks,
)
from tests.support.tier import examples


@settings(max_examples=examples(30), deadline=None)
@given(
    secret=st.binary(min_size=0, max_size=200),
    num=st.integers(3, 40),
    data=st.data(),
)
def test_any_threshold_shares_give_the_secret_and_fewer_do_not(secret, num, data):
    threshold = data.draw(st.integers(2, num))
    shares = create_shares(secret, threshold, num)
    assert len(shares) == num and len(set(shares)) == num
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    assert combine_shares(rng.sample(shares, threshold)) == secret
    assert combine_shares(rng.sample(shares, min(num, threshold + 1))) == secret
    # One share short: a random field element, almost surely not even well-formed.
    with contextlib.suppress(ValueError):
        assert combine_shares(rng.sample(shares, threshold - 1)) != secret


def test_shares_are_fresh_and_malformed_sets_are_refused():
    secret = os.urandom(32)
    a, b = create_shares(secret, 3, 5), create_shares(secret, 3, 5)
    assert all(x != y for x, y in zip(a, b, strict=True))  # new random coefficients
    with pytest.raises(ValueError, match="distinct"):
        combine_shares([a[0], a[0], a[1]])
    with pytest.raises(ValueError, match="not of this scheme"):
        combine_shares([a[0][:-1], a[1], a[2]])
    with pytest.raises(ValueError, match="threshold"):
        create_shares(secret, 6, 5)


def test_masks_use_the_whole_seed():
    """Flower 1.42 folds the seed to 32 bits, so two seeds with the same fold get the
    same mask; here every bit of the seed matters."""
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen as flowers

    seed = bytearray(os.urandom(32))
    other = bytearray(seed)
    for i in (0, 4):  # flip the same bits in two words: their XOR fold is unchanged
        other[i] ^= 0x5A
    dims = [(1000,)]
    assert np.array_equal(
        flowers(bytes(seed), 2**22, dims)[0], flowers(bytes(other), 2**22, dims)[0]
    )
    ours, ours_other = (
        pseudo_rand_gen(bytes(seed), 2**22, dims),
        pseudo_rand_gen(bytes(other), 2**22, dims),
    )
    assert not np.array_equal(ours[0], ours_other[0])
    again = pseudo_rand_gen(bytes(seed), 2**22, dims)
    assert np.array_equal(ours[0], again[0])  # the server must regenerate the same mask


def test_masks_are_uniform_in_range_and_shaped_as_asked():
    masks = pseudo_rand_gen(os.urandom(32), 16, [(200, 300), (7,), ()])
    assert [m.shape for m in masks] == [(200, 300), (7,), ()]
    assert masks[0].dtype == masks[1].dtype == np.uint32  # promoted exactly by int64 sums
    values = masks[0].ravel()
    assert values.min() >= 0 and values.max() <= 15
    counts = np.bincount(values, minlength=16)
    assert stats.chisquare(counts).pvalue > 1e-4
    with pytest.raises(ValueError, match="power of two"):
        pseudo_rand_gen(b"seed", 1000, [(3,)])


def test_both_sides_of_secagg_use_these_primitives():
    secaggplus_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    secaggplus_workflow = importlib.import_module(
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
    )

    import client.app.secagg  # installs on import
    import server.app.secagg

    assert secaggplus_mod.pseudo_rand_gen is pseudo_rand_gen
    assert secaggplus_mod.create_shares is create_shares
    assert secaggplus_mod.parameters_addition is add_masks
    assert secaggplus_mod.parameters_subtraction is subtract_masks
    assert secaggplus_workflow.pseudo_rand_gen is pseudo_rand_gen
    assert secaggplus_workflow.combine_shares is combine_shares
    keys = ("bytes_to_private_key", "bytes_to_public_key")
    for name in (*keys, "generate_key_pairs", "private_key_to_bytes", "public_key_to_bytes"):
        assert getattr(secaggplus_mod, name) is getattr(secagg_primitives, name), name
    for name in keys:  # the server derives a dropped hospital's masks from its shared key
        assert getattr(secaggplus_workflow, name) is getattr(secagg_primitives, name), name
    # Pairwise mask keys are bound to the round's instruction on both sides.
    assert secaggplus_mod.generate_shared_key == client.app.secagg.MASKS.shared_key
    assert secaggplus_workflow.generate_shared_key == server.app.secagg.MASKS.shared_key
    assert "aes256ctr" in SCHEME and "x25519" in SCHEME and "bound-masks" in SCHEME


def test_two_hospitals_agree_a_key_that_others_cannot():
    (a, a_pub), (b, b_pub), (_, c_pub) = (generate_key_pairs() for _ in range(3))
    wire = [public_key_to_bytes(k) for k in (a_pub, b_pub, c_pub)]
    assert [len(w) for w in wire] == [32, 32, 32] and len(set(wire)) == 3
    # a's secret key, Shamir-shared and rebuilt by the server for a dropped hospital
    shares = create_shares(private_key_to_bytes(a), 3, 5)
    a_rebuilt = bytes_to_private_key(combine_shares(shares[:3]))
    k_ab = generate_shared_key(a_rebuilt, bytes_to_public_key(wire[1]))
    assert k_ab == generate_shared_key(b, bytes_to_public_key(wire[0]))
    assert k_ab != generate_shared_key(a, bytes_to_public_key(wire[2]))
    assert len(base64.urlsafe_b64decode(k_ab)) == 32  # a Fernet key


def test_malformed_and_small_order_public_keys_are_refused():
    with pytest.raises(ValueError, match="public key of 120 bytes, not 32"):
        bytes_to_public_key(b"-----BEGIN PUBLIC KEY-----".ljust(120, b"x"))  # P-384 PEM
    with pytest.raises(ValueError, match="secret key of 31 bytes"):
        bytes_to_private_key(bytes(31))
    secret, _ = generate_key_pairs()
    with pytest.raises(ValueError, match="small-order point"):
        generate_shared_key(secret, bytes_to_public_key(bytes(32)))  # the point 0


def test_a_hospital_refuses_masks_made_by_another_scheme():
    from flwr.common import FitIns, MessageType, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from client.app.secagg import SecAggSchemeError, legacy_request
    from shared_model.packing import WeightLayout
    from tests.support.flower import make_message

    def request(config):
        ins = FitIns(ndarrays_to_parameters([np.zeros(3, np.float32)]), config)
        content = compat.fitins_to_recorddict(ins, keep_input=True)
        return make_message(content, MessageType.TRAIN)

    layout = WeightLayout.of({"w": torch.zeros(3)})
    weights, config = legacy_request(request({"secagg-scheme": SCHEME}), layout)
    assert list(weights) == ["w"] and config["secagg-scheme"] == SCHEME
    with pytest.raises(SecAggSchemeError, match=r"Flower's own.*would not cancel"):
        legacy_request(request({"server-round": 1}), layout)


def test_masking_in_place_gives_flowers_sums():
    """A hospital's vector plus and minus its pairwise masks, as Flower computes it."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )

    rng = np.random.default_rng(0)
    dims = [(1,), (300, 7), (50,)]
    start = [rng.integers(0, 2**22, d, dtype=np.int64) for d in dims]
    masks = [pseudo_rand_gen(os.urandom(32), 2**22, dims) for _ in range(5)]
    ours, flowers = [a.copy() for a in start], [a.copy() for a in start]
    for i, mask in enumerate(masks):
        before = [id(a) for a in ours]
        ours = (add_masks if i % 2 else subtract_masks)(ours, mask)
        flowers = (parameters_addition if i % 2 else parameters_subtraction)(flowers, mask)
        assert [id(a) for a in ours] == before  # no new array per neighbour
    for got, want in zip(parameters_mod(ours, 2**22), parameters_mod(flowers, 2**22), strict=True):
        assert np.array_equal(got, want)
    frozen = start[1].copy()
    frozen.flags.writeable = False  # an array it does not own is never written
    (result,) = add_masks([frozen], [masks[0][1]])
    assert result is not frozen and np.array_equal(frozen, start[1])


def test_mask_keys_bound_to_different_instructions_differ_and_unbound_ones_agree():
    from shared_model.secagg_primitives import MaskBinding, round_binding

    (a, a_pub), (b, b_pub) = generate_key_pairs(), generate_key_pairs()
    at_a, at_b = MaskBinding(), MaskBinding()
    same = round_binding({"server-round": 3, "evaluate": True}, [b"weights"])
    with at_a.bound(same), at_b.bound(same):
        assert at_a.shared_key(a, b_pub) == at_b.shared_key(b, a_pub)
    other = round_binding({"server-round": 3, "evaluate": False}, [b"weights"])
    with at_a.bound(same), at_b.bound(other):
        assert at_a.shared_key(a, b_pub) != at_b.shared_key(b, a_pub)
    assert round_binding({"x": 1}, [b"w1"]) != round_binding({"x": 1}, [b"w2"])
    # outside a bound block (key-share encryption), the agreed key itself
    assert at_a.shared_key(a, b_pub) == generate_shared_key(a, b_pub)
