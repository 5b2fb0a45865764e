"""The masked upload's compact encoding changes no value the server computes."""

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType, bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from hypothesis import given, settings
from hypothesis import strategies as st

from client.app.secagg import compact_masked_vector
from tests.support.flower import make_message
from tests.support.tier import examples


def masked_reply(arrays: list[np.ndarray]) -> Message:
    request = make_message(RecordDict(), MessageType.TRAIN)
    configs = ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in arrays]})
    return Message(RecordDict({RECORD_KEY_CONFIGS: configs}), reply_to=request)


def uploaded(reply: Message) -> list[np.ndarray]:
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    return [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]


@settings(max_examples=examples(30), deadline=None)
@given(
    st.integers(2, 5),
    st.sampled_from([2**16, 2**24, 2**32]),
    st.integers(0, 2**31),
)
def test_server_sum_is_unchanged_by_uint32_uploads(hospitals, modulus, seed):
    """Flower's server adds the uploads, subtracts int64 masks and reduces mod the modulus."""
    rng = np.random.default_rng(seed)
    shapes = [(7, 3), (5,), ()]
    uploads = [
        [rng.integers(0, modulus, size=s, dtype=np.int64) for s in shapes] for _ in range(hospitals)
    ]
    masks = [rng.integers(0, modulus, size=s, dtype=np.int64) for s in shapes]

    def server_view(vectors: list[list[np.ndarray]]) -> list[np.ndarray]:
        total = vectors[0]
        for vec in vectors[1:]:
            total = parameters_addition(total, vec)
        total = parameters_mod(total, modulus)
        return parameters_mod(parameters_subtraction(total, masks), modulus)

    compact = [uploaded(compact_masked_vector(masked_reply(u))) for u in uploads]
    assert all(a.dtype == np.uint32 for vec in compact for a in vec)
    for got, want in zip(server_view(compact), server_view(uploads), strict=True):
        np.testing.assert_array_equal(got.astype(np.int64), want)


def test_the_upload_halves_and_other_replies_pass_unchanged():
    arr = np.arange(1000, dtype=np.int64)
    plain, compact = masked_reply([arr]), compact_masked_vector(masked_reply([arr]))
    size = len(compact.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][0])
    assert size < 0.6 * len(ndarray_to_bytes(arr))
    np.testing.assert_array_equal(uploaded(plain)[0], uploaded(compact)[0])
    big = np.array([2**33], dtype=np.int64)  # a modulus above 2**32 keeps int64
    assert uploaded(compact_masked_vector(masked_reply([big])))[0].dtype == np.int64
    keys = make_message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({"x": 1})}), "train")
    assert compact_masked_vector(keys) is keys
