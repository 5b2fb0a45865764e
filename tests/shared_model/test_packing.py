"""The trainable weights travel as one flat array (shared_model/packing.py): exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from hypothesis import given, settings
from hypothesis import strategies as st

from server.app.strategy import packed_record
from shared_model.config import RunConfig
from shared_model.packing import LayoutError, WeightLayout
from shared_model.weights import initial_model, shared_state
from tests.support.tier import examples


def default_state() -> dict[str, torch.Tensor]:
    run = RunConfig()
    return shared_state(initial_model(run.model, run.seed))


def test_packing_the_default_model_round_trips_bit_for_bit():
    state = default_state()
    layout = WeightLayout.of(state)
    flat = layout.pack(state)
    assert flat.shape == (sum(t.numel() for t in state.values()),) and flat.dtype == np.float32
    back = layout.unpack(flat)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].shape == tensor.shape
        assert torch.equal(back[name], tensor)
    # unpacked tensors own their memory: checkpoints (safetensors) refuse shared storage
    pointers = {t.untyped_storage().data_ptr() for t in back.values()}
    assert len(pointers) == len(back)


@settings(max_examples=examples(30), deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=6),
    weights=st.lists(st.integers(1, 1000), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_fedavg_over_packed_weights_equals_fedavg_tensor_by_tensor(shapes, weights, seed):
    """Flower's own FedAvg aggregation gives the same numbers, packed or not."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"layer{i}.weight" for i in range(len(shapes))]
    states = [
        {n: torch.randn(tuple(s), generator=gen) for n, s in zip(names, shapes, strict=True)}
        for _ in weights
    ]
    layout = WeightLayout.of(states[0])

    def replies(packed: bool) -> list[RecordDict]:
        return [
            RecordDict(
                {
                    "arrays": packed_record(s, layout) if packed else ArrayRecord(s),
                    "metrics": MetricRecord({"num-examples": w}),
                }
            )
            for s, w in zip(states, weights, strict=True)
        ]

    by_tensor = aggregate_arrayrecords(replies(False), "num-examples").to_torch_state_dict()
    packed = layout.unpack_record(aggregate_arrayrecords(replies(True), "num-examples"))
    assert list(packed) == names
    for name in names:
        assert torch.equal(packed[name], by_tensor[name])


def test_weights_that_do_not_fit_are_refused_naming_the_problem():
    state = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
    layout = WeightLayout.of(state)
    with pytest.raises(LayoutError, match=r"shape \[9\].*need \[10\]"):
        layout.unpack(np.zeros(9, np.float32))
    with pytest.raises(LayoutError, match="float64"):
        layout.unpack(np.zeros(10, np.float64))
    with pytest.raises(LayoutError, match=r"shape \[2, 5\]"):
        layout.unpack(np.zeros((2, 5), np.float32))
    with pytest.raises(LayoutError, match=r"missing \['b'\]"):
        layout.pack({"a": torch.zeros(2, 3)})
    with pytest.raises(LayoutError, match="another order"):
        layout.pack({"b": torch.ones(4), "a": torch.zeros(2, 3)})
    with pytest.raises(LayoutError, match="one floating-point dtype"):
        WeightLayout.of({"a": torch.zeros(2), "n": torch.zeros(2, dtype=torch.int64)})
    with pytest.raises(LayoutError, match="one packed 'weights' array"):
        layout.unpack_record(ArrayRecord(state))


def test_the_digest_tells_layouts_apart():
    base = WeightLayout.of({"a": torch.zeros(2, 3), "b": torch.ones(4)})
    same = WeightLayout.of({"a": torch.ones(2, 3), "b": torch.zeros(4)})  # values don't count
    assert base.digest == same.digest
    others = [
        {"a": torch.zeros(3, 2), "b": torch.ones(4)},  # a shape
        {"a": torch.zeros(2, 3), "c": torch.ones(4)},  # a name
        {"b": torch.ones(4), "a": torch.zeros(2, 3)},  # the order
        {"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.ones(4, dtype=torch.float64)},
    ]
    assert len({base.digest, *(WeightLayout.of(o).digest for o in others)}) == 1 + len(others)
