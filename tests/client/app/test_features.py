"""The frozen-feature cache: computed once per record, reused, kept at the hospital."""

import logging

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from flwr.common import MessageType

from client.app.client_app import train
from client.app.features import FeatureCache
from shared_model.config import PRESETS, RunConfig
from shared_model.packing import WeightLayout
from shared_model.weights import initial_model, shared_state
from tests.support.flower import global_request, make_context, make_message


class Counting:
    """A stand-in backbone that counts the rows it encodes."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return x.float().sum(dim=1, keepdim=True) * 2


def test_each_record_is_encoded_once_and_reused_across_subsets_and_restarts(tmp_path):
    inputs = torch.arange(40).reshape(10, 4)
    backbone = Counting()
    first = FeatureCache(tmp_path, "ns").features(inputs, backbone, what="rows", batch_size=3)
    assert backbone.rows == 10
    torch.testing.assert_close(first, backbone(inputs))
    backbone.rows = 0
    # a new process (new cache object), other records in another order, some new
    again = torch.cat([inputs[[7, 2, 2]], torch.full((2, 4), 99)])
    out = FeatureCache(tmp_path, "ns").features(again, backbone, what="rows")
    assert backbone.rows == 1  # the one distinct new record
    torch.testing.assert_close(out, backbone(again))


def test_a_damaged_shard_is_reported_and_its_records_recomputed(tmp_path, caplog):
    inputs = torch.arange(12).reshape(3, 4)
    cache = FeatureCache(tmp_path, "ns")
    cache.features(inputs, Counting(), what="rows")
    shard = next((tmp_path / "ns").glob("*.pt"))
    shard.write_bytes(b"torn write")
    backbone = Counting()
    with caplog.at_level(logging.WARNING, logger="fedfusion.hospital"):
        out = FeatureCache(tmp_path, "ns").features(inputs, backbone, what="rows")
    assert "unreadable shard" in caplog.text and backbone.rows == 3
    torch.testing.assert_close(out, Counting()(inputs))


@pytest.mark.parametrize("preset", ["efficientnet-minilm-concat"])
def test_a_frozen_pretrained_round_trains_on_cached_features_and_sends_no_frozen_weight(
    tmp_path, preset
):
    flat = {
        **PRESETS[preset],
        "output-dir": str(tmp_path),
        "data.max-reports": 150,
        "model.max-report-tokens": 24,
        "num-rounds": 1,
    }
    run = RunConfig.from_run_config(flat)
    server = initial_model(run.model, run.seed)
    arrays, checks = global_request(flat)
    config = ConfigRecord({"server-round": 1, **checks})
    node = {"partition-id": 0, "num-partitions": 2}
    reply = train(
        make_message(RecordDict({"arrays": arrays, "config": config}), MessageType.TRAIN),
        make_context(flat, node),
    )
    assert reply.content["metrics"]["declined"] == 0
    sent = WeightLayout.of(shared_state(server)).unpack_record(reply.content["arrays"])
    assert list(sent) == list(shared_state(server))
    assert not any(".backbone." in k for k in sent)
    total = sum(p.numel() for p in server.parameters())
    assert sum(t.numel() for t in sent.values()) < total / 100
    cache = tmp_path / "hospitals" / "hospital-0" / "feature-cache"
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["image", "text"]
