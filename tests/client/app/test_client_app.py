"""The ClientApp handlers, called with hand-built Message and Context (Flower-style)."""

import json
import subprocess
import sys

import pytest
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common import MessageType

from client.app.client_app import evaluate, train
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.weights import hospital_layout, initial_model, shared_state
from tests.support.flower import global_request, make_context, make_message


@pytest.fixture
def run_config(tmp_path):
    return {"output-dir": str(tmp_path), "data.max-reports": 300, "num-rounds": 2}


def global_arrays(run_config) -> ArrayRecord:
    return global_request(run_config)[0]


def checks(run_config) -> dict:
    """base-hash and weights-layout, as the server sends them with each request."""
    return global_request(run_config)[1]


def train_message(arrays: ArrayRecord, server_round: int, sent: dict | None = None):
    config = {"server-round": server_round, **(sent or CHECKS)}
    return make_message(
        RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), MessageType.TRAIN
    )


def weights(reply, run_config) -> dict:
    run = RunConfig.from_run_config(run_config)
    return hospital_layout(run.model, run.seed).unpack_record(reply.content["arrays"])


CHECKS = checks({})


def test_train_replies_with_raw_weights_and_cumulative_epsilon(run_config, tmp_path):
    node = {"partition-id": 0, "num-partitions": 2}
    arrays = global_arrays(run_config)
    reply = train(train_message(arrays, 1), make_context(run_config, node))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["declined"] == 0
    assert 0 < metrics["epsilon"] <= 8.0
    run = RunConfig.from_run_config(run_config)
    names = list(shared_state(initial_model(run.model, run.seed)))
    assert list(weights(reply, run_config)) == names  # no "_module." keys
    assert reply.content["hospital"]["hospital-id"] == "hospital-0"
    # a restarted process (fresh Context) continues the same ledger
    reply2 = train(train_message(reply.content["arrays"], 2), make_context(run_config, node))
    assert reply2.content["metrics"]["epsilon"] > metrics["epsilon"]
    ledger = json.loads((tmp_path / "hospitals/hospital-0/privacy_ledger.json").read_text())
    released = [(e["mechanism"], e["round"]) for e in ledger["history"]]
    assert released == [("record-count", 1), ("dp-sgd", 1), ("dp-sgd", 2)]
    assert metrics["num-examples"] == ledger["plan"]["public_records"]  # N̂, not N
    assert all(e["status"] == "completed" for e in ledger["history"])


def test_hospital_declines_a_round_beyond_its_budget(run_config):
    run_config = {**run_config, "num-rounds": 1}
    node = {"partition-id": 1, "num-partitions": 2, "max-epsilon": 2.0}
    arrays = global_arrays(run_config)
    first = train(train_message(arrays, 1), make_context(run_config, node))
    assert first.content["metrics"]["epsilon"] <= 2.0  # the hospital's cap, not the server's 8
    second = train(train_message(arrays, 2), make_context(run_config, node))
    assert second.content["metrics"]["declined"] == 1
    assert second.content["metrics"]["num-examples"] == 0
    assert "arrays" not in second.content.array_records
    reason = second.content["hospital"]["reason"]
    assert second.content["hospital"]["status"] == "declined" and "max-epsilon 2" in reason


def test_evaluate_sends_summable_statistics_and_keeps_the_exact_metrics(run_config, tmp_path):
    reply = evaluate(
        make_message(
            RecordDict(
                {
                    "arrays": global_arrays(run_config),
                    "config": ConfigRecord({"server-round": 0, **CHECKS}),
                }
            ),
            MessageType.EVALUATE,
        ),
        make_context(run_config, {"partition-id": 0, "num-partitions": 2}),
    )
    n = reply.content["metrics"]["num-examples"]
    stats = EvalStats.from_vector(
        RunConfig.from_run_config(run_config).model.labels,
        reply.content["evaluation"]["statistics"].numpy(),
    )
    assert n > 0 and stats.examples == n
    assert stats.positives.sum(1)[0] + stats.negatives.sum(1)[0] == n  # each record once
    for key in ("loss", "accuracy", "precision", "recall", "f1", "auroc"):
        assert key in stats.metrics()
    own = [json.loads(line) for line in (tmp_path / "hospitals/hospital-0/evaluation.jsonl").open()]
    assert own[-1]["round"] == 0 and own[-1]["examples"] == n
    assert own[-1]["loss"] == pytest.approx(stats.metrics()["loss"], rel=1e-6)


def test_frozen_weights_are_not_received_and_a_different_copy_is_refused(run_config, tmp_path):
    """Frozen mode: only the trainable part travels; the hospital's frozen copy must match."""
    frozen = {**run_config, "model.encoder-mode": "frozen"}
    node = {"partition-id": 0, "num-partitions": 2}
    arrays, sent = global_request(frozen)
    reply = train(train_message(arrays, 1, sent), make_context(frozen, node))
    names = list(weights(reply, frozen))
    assert names and not any(k.startswith(("image_encoder.", "text_encoder.")) for k in names)
    # another seed initialises other frozen encoders: the server's hash no longer matches
    other = {**sent, "base-hash": checks({**frozen, "seed": 1})["base-hash"]}
    with pytest.raises(Exception, match=r"frozen model weights here .* differ from the server"):
        train(train_message(arrays, 2, other), make_context(frozen, node))
    # refused before any data is read: a manifest that does not exist is never opened
    unread = {
        "data-manifest": str(tmp_path / "missing.csv"),
        "hospital-id": "h",
        "state-dir": str(tmp_path / "s"),
    }
    with pytest.raises(Exception, match=r"frozen model weights here .* differ from the server"):
        train(train_message(arrays, 2, other), make_context(frozen, unread))


def test_bad_node_config_raises_a_clear_error(run_config):
    with pytest.raises(Exception, match="partition-id"):
        train(train_message(global_arrays(run_config), 1), make_context(run_config, {}))


@pytest.mark.fault(
    "A ledger file rolled back behind what the hospital process recorded",
    "Refused",
    "the privacy guarantee",
)
def test_a_ledger_file_rolled_back_behind_the_nodes_state_is_refused(run_config, tmp_path):
    node = {"partition-id": 0, "num-partitions": 2}
    context = make_context(run_config, node)  # one long-lived process: its state persists
    arrays = global_arrays(run_config)
    train(train_message(arrays, 1), context)
    assert "privacy-ledger" in context.state.config_records
    (tmp_path / "hospitals/hospital-0/privacy_ledger.json").unlink()  # "reset epsilon"
    with pytest.raises(Exception, match=r"no longer holds the 2 release\(s\)"):
        train(train_message(arrays, 2), context)


def test_the_client_app_module_does_not_import_torch():
    """Each SecAgg+ key-exchange stage starts a ClientApp process: it must start fast."""
    code = (
        "import sys, client.app.client_app; print(sorted({'torch', 'opacus'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_request_in_another_weights_layout_is_refused_before_training(run_config, tmp_path):
    """A server built from other model settings packs its weights otherwise: say so."""
    other = {**CHECKS, "weights-layout": checks({"model.fusion": "gated"})["weights-layout"]}
    assert other != CHECKS
    unread = {
        "data-manifest": str(tmp_path / "missing.csv"),
        "hospital-id": "h",
        "state-dir": str(tmp_path / "s"),
    }
    with pytest.raises(Exception, match=r"laid out as .* disagree on the model settings"):
        train(train_message(global_arrays(run_config), 1, other), make_context(run_config, unread))


def test_a_nodes_next_message_reuses_its_per_step_rdp(run_config, monkeypatch):
    """Each deployed message is a new process: Flower's node state carries the RDP over."""
    from opacus.accountants.analysis import rdp as opacus_rdp

    from client.dp import accounting

    node = {"partition-id": 0, "num-partitions": 2}
    context = make_context(run_config, node)
    monkeypatch.setattr(accounting, "RDP", accounting.RdpTable())
    reply = train(train_message(global_arrays(run_config), 1), context)
    carried = context.state.config_records["privacy-rdp"]
    assert accounting.RdpTable().absorb(carried) == 2  # the record count and the round
    monkeypatch.setattr(accounting, "RDP", accounting.RdpTable())  # the next message's process
    computed = []
    real = opacus_rdp.compute_rdp
    monkeypatch.setattr(opacus_rdp, "compute_rdp", lambda **kw: computed.append(kw) or real(**kw))
    reply2 = train(train_message(reply.content["arrays"], 2), context)
    assert [kw for kw in computed if len(kw["orders"]) == len(accounting.RDP_ORDERS)] == []
    assert reply2.content["metrics"]["epsilon"] > reply.content["metrics"]["epsilon"]


def test_a_recorded_timeline_gets_the_start_and_end_of_each_message(tmp_path, monkeypatch):
    """Only timestamps, the stage and the node: nothing the message or the reply holds."""
    # Prepare
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from client.app.client_app import timeline_mod
    from shared_model.timeline import TIMELINE_ENV, read

    trace = tmp_path / "timeline.jsonl"
    stage = ConfigRecord({Key.STAGE: "share_keys", "secret": "not for the timeline"})
    msg = make_message(RecordDict({RECORD_KEY_CONFIGS: stage}), MessageType.TRAIN)
    context = make_context({}, {}, node_id=7)
    handled = []
    # Execute: off, then on
    timeline_mod(msg, context, lambda m, c: handled.append(m) or m)
    monkeypatch.setenv(TIMELINE_ENV, str(trace))
    reply = timeline_mod(msg, context, lambda m, c: handled.append(m) or m)
    # Assert
    assert handled == [msg, msg] and reply is msg
    events = read(trace)
    assert [e["event"] for e in events] == ["clientapp.handle", "clientapp.handled"]
    assert all(e["stage"] == "share_keys" and e["node"] == 7 for e in events)
    assert "not for the timeline" not in trace.read_text()
