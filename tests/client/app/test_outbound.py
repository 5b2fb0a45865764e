"""The hospital decides, and nothing leaves it unlisted: attacks at the message boundary.

Each test is what an adversary would try, built Flower-style from hand-made Message and
Context and sent through the real ClientApp (its mods included): a server that asks a
hospital to drop DP or secure aggregation, a reply that smuggles a statistic of the
training data, an error message that quotes a record.
"""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import FitIns, MessageType, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from client.app.client_app import app
from client.app.outbound import FIELDS, outbound_guard, unlisted_fields
from shared_model import secagg_primitives
from shared_model.config import ConfigError, HospitalConfig, RunConfig
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.protocol import Request
from shared_model.weights import hospital_layout
from tests.support.flower import global_request, make_context, make_message

NODE = {"partition-id": 0, "num-partitions": 2}
NOISED = {**NODE, "held-out-noise": True}  # releases its held-out statistics noised


@pytest.fixture
def run_config(tmp_path):
    return {"output-dir": str(tmp_path), "data.max-reports": 300, "num-rounds": 2}


def plain(run_config, message_type=MessageType.TRAIN, server_round=1):
    arrays, checks = global_request(run_config)
    config = ConfigRecord({"server-round": server_round, **checks})
    return make_message(RecordDict({"arrays": arrays, "config": config}), message_type)


def secagg_upload_request(run_config, server_round=1, **extra):
    """The train message SecAgg+ hands the handler in its masked-upload stage."""
    arrays, checks = global_request(run_config)
    config = {
        "server-round": server_round,
        **checks,
        Request.SECAGG_SCHEME: secagg_primitives.SCHEME,
        Request.EVALUATE: True,
        **extra,
    }
    ins = FitIns(ndarrays_to_parameters([arrays["weights"].numpy()]), config)
    return make_message(compat.fitins_to_recorddict(ins, keep_input=True), MessageType.TRAIN)


def as_the_mod_calls(request, context):
    """The handler, called as secaggplus_mod calls it in the masked-upload stage."""
    from client.app import handlers
    from client.app.secagg import masked_upload

    with masked_upload(context):
        return handlers.train(request, context)


def ledger_file(run_config):
    from pathlib import Path

    return Path(run_config["output-dir"]) / "hospitals/hospital-0/privacy_ledger.json"


# ------------------------------------------------------------------ the hospital decides


def test_a_server_asking_to_drop_dp_is_declined_and_nothing_is_charged(run_config):
    """The review's finding: privacy.enabled = false from the server trained without DP."""
    asked = {**run_config, "privacy.enabled": False}
    node = {**NODE, "allow-non-private": False}  # a hospital with its own data, by default
    reply = app(plain(asked), make_context(asked, node))
    assert not reply.has_error() and unlisted_fields(reply) == []
    assert reply.content["hospital"]["status"] == "declined"
    reason = reply.content["hospital"]["reason"]
    assert "privacy.enabled = false" in reason and "allow-non-private = false" in reason
    assert "arrays" not in reply.content.array_records
    assert reply.content["metrics"]["declined"] == 1 and reply.content["metrics"]["epsilon"] == 0
    assert not ledger_file(run_config).exists()  # nothing released, nothing to charge


def test_a_hospital_with_its_own_data_needs_its_own_word_to_drop_dp_or_secagg(tmp_path):
    own = HospitalConfig.from_node_config(
        {"data-manifest": str(tmp_path / "m.csv"), "state-dir": str(tmp_path)}
    )
    assert not own.non_private_allowed and own.secagg_required and not own.evaluation_shared
    simulated = HospitalConfig.from_node_config(NODE)
    assert simulated.non_private_allowed and not simulated.secagg_required
    assert simulated.evaluation_shared
    said = HospitalConfig.from_node_config(
        {
            "data-manifest": "m.csv",
            "state-dir": "s",
            "allow-non-private": True,
            "require-secagg": False,
        }
    )
    assert said.non_private_allowed and not said.secagg_required
    with pytest.raises(ConfigError, match="allow-non-private"):
        HospitalConfig.from_node_config({**NODE, "allow-non-private": "yes"})


def test_a_plain_training_request_is_declined_where_secagg_is_required(run_config):
    reply = app(plain(run_config), make_context(run_config, {**NODE, "require-secagg": True}))
    assert reply.content["hospital"]["status"] == "declined"
    assert "require-secagg = true" in reply.content["hospital"]["reason"]
    assert "arrays" not in reply.content.array_records
    assert not ledger_file(run_config).exists()


def test_a_simulated_hospital_keeps_the_non_private_baseline(run_config):
    asked = {**run_config, "privacy.enabled": False}
    reply = app(plain(asked), make_context(asked, NODE))
    assert reply.content["hospital"]["status"] == "trained" and "arrays" in reply.content
    assert reply.content["metrics"]["epsilon"] == float("inf")


def test_a_withheld_evaluation_sends_no_statistics_and_the_hospital_keeps_them(run_config):
    node = {**NODE, "share-evaluation": False}
    reply = app(plain(run_config, MessageType.EVALUATE), make_context(run_config, node))
    assert unlisted_fields(reply) == []
    assert "evaluation" not in reply.content.array_records
    assert reply.content["hospital"]["status"] == "withheld"
    assert reply.content["metrics"]["num-examples"] == 0
    own = ledger_file(run_config).parent / "evaluation.jsonl"
    assert json.loads(own.read_text().splitlines()[-1])["examples"] > 0


def test_an_evaluate_request_inside_secagg_is_not_answered_separately(run_config):
    request = secagg_upload_request(run_config)
    request.metadata.message_type = MessageType.EVALUATE
    reply = app(request, make_context(run_config, NODE))
    assert reply.has_error()


# ------------------------------------------------------------------ the message boundary


def guarded(handler):
    test_app = ClientApp(mods=[outbound_guard])
    test_app.train()(handler)
    return test_app


def test_a_reply_smuggling_a_training_statistic_is_not_sent():
    """A handler (a bug, or a patched one) adds a figure computed from the records."""

    def leaky(msg: Message, _ctx: Context) -> Message:
        metrics = MetricRecord({"num-examples": 10, "mean-patient-age": 61.37})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    reply = guarded(leaky)(make_message(RecordDict(), MessageType.TRAIN), make_context({}, {}))
    assert reply.has_error()
    assert "metric:metrics/mean-patient-age" in reply.error.reason
    assert "61.37" not in reply.error.reason


@pytest.mark.parametrize(
    ("error", "told"),
    [
        (
            ValueError("row 7: report 'Jane Doe, 54, HIV+' is too long"),
            "ValueError at the hospital",
        ),
        (ConfigError("config key 'privacy.delta': must be <= 0.1"), "ConfigError: config key"),
    ],
)
def test_an_error_says_only_what_the_hospital_wrote_itself(error, told):
    def failing(_msg: Message, _ctx: Context) -> Message:
        raise error

    own_data = {"data-manifest": "records.csv", "hospital-id": "st-mary", "state-dir": "s"}
    reply = guarded(failing)(
        make_message(RecordDict(), MessageType.TRAIN), make_context({}, own_data)
    )
    assert reply.has_error() and reply.error.reason.startswith(told)
    assert "Jane" not in reply.error.reason
    # a simulated hospital holds public data: it says everything, to help debugging
    simulated = guarded(failing)(
        make_message(RecordDict(), MessageType.TRAIN), make_context({}, NODE)
    )
    assert str(error) in simulated.error.reason


def test_every_field_of_every_reply_is_listed(run_config):
    """Real replies through the handlers, in every mode; the table lists each field."""

    evaluate = plain(run_config, MessageType.EVALUATE)
    replies = [
        app(plain(run_config), make_context(run_config, NODE)),  # trained
        app(
            plain(run_config, server_round=2),
            make_context(run_config, {**NODE, "max-epsilon": 0.1}),
        ),
        app(evaluate, make_context(run_config, NODE)),
        app(evaluate, make_context(run_config, {**NODE, "share-evaluation": False})),
        app(evaluate, make_context(run_config, NOISED)),  # its held-out epsilon too
    ]
    for extra, node in (({}, NODE), ({}, NOISED), ({Request.EVALUATE_ONLY: True}, NODE)):
        upload = as_the_mod_calls(  # what secaggplus_mod gets to mask
            secagg_upload_request(run_config, 3, **extra), make_context(run_config, node)
        )
        for record in upload.content.array_records.values():
            record.clear()  # the mod masks the vector and sends it in its own record
        replies.append(upload)
    seen, statuses = set(), set()
    for reply in replies:
        assert not reply.has_error(), reply.error.reason
        assert unlisted_fields(reply) == []
        for kind in ("array", "metric", "config"):
            for name, record in getattr(reply.content, f"{kind}_records").items():
                seen |= {(kind, name, key) for key in record}
        records = reply.content.config_records
        statuses.add((records.get("hospital") or records["fitres.metrics"])["status"])
    assert statuses == {"trained", "declined", "evaluated", "withheld"}
    # every listed field outside Flower's own protocol came from some reply: no stale rows
    listed = {(f.kind, f.record, f.key) for f in FIELDS if f.kind != "error"}
    protocol = {k for k in listed if k[1] == RECORD_KEY_CONFIGS}
    assert listed - protocol - seen == set()


def test_an_upload_the_secagg_mod_did_not_mask_is_not_sent(run_config):
    """A SecAgg+-format request outside SecAgg+ is refused before training; were a reply
    built anyway, its plaintext vector would not leave: only the masked record is listed."""
    reply = app(secagg_upload_request(run_config), make_context(run_config, NODE))
    assert reply.has_error() and "did not come through SecAgg+" in reply.error.reason
    assert not ledger_file(run_config).exists()  # nothing trained, nothing charged
    unmasked = as_the_mod_calls(secagg_upload_request(run_config), make_context(run_config, NODE))
    assert "array:fitres.parameters/0" in unlisted_fields(unmasked)


def test_the_masked_upload_holds_the_update_weight_loss_and_evaluation(run_config):
    from flwr.common import bytes_to_ndarray

    run = RunConfig.from_run_config(run_config)
    reply = as_the_mod_calls(secagg_upload_request(run_config), make_context(run_config, NODE))
    (upload,) = compat.recorddict_to_fitres(reply.content, keep_input=True).parameters.tensors
    layout = hospital_layout(run.model, run.seed)
    codec = UploadCodec(layout.size, run.model.labels, run.secagg.clipping_range,
                        run.secagg.max_weight)  # fmt: skip
    total = codec.decode_sum(bytes_to_ndarray(upload), 1)
    ledger = json.loads(ledger_file(run_config).read_text())
    assert total.weight * run.secagg.max_weight == pytest.approx(ledger["plan"]["public_records"])
    assert np.abs(total.update).max() > 0 and np.isfinite(total.train_loss)
    own = json.loads((ledger_file(run_config).parent / "evaluation.jsonl").read_text())
    assert total.evaluation.examples == own["examples"]
    assert total.evaluation.metrics()["loss"] == pytest.approx(own["loss"], rel=1e-4)
    metrics = reply.content["fitres.metrics"]
    assert "train-loss" not in metrics and "num-examples" not in metrics
    assert reply.content["fitres.num_examples"]["num_examples"] == codec.flower_weight
    assert isinstance(total.evaluation, EvalStats)


# ------------------------------------------------------------------ a deviating server


def test_a_request_with_no_planned_round_is_refused_before_anything_is_charged(run_config):
    """planned-rounds = 0 would fix a noise plan that declines every later round."""
    with pytest.raises(Exception, match="both must be at least 1"):
        as_the_mod_calls(
            secagg_upload_request(run_config, 1, **{Request.PLANNED_ROUNDS: 0}),
            make_context(run_config, NODE),
        )
    assert not ledger_file(run_config).exists()


def test_the_held_out_count_never_shows_in_an_error(run_config):
    """Probing secagg.max-weight below the held-out count once revealed the count."""

    small = {**run_config, "secagg.max-weight": 5.0}  # fewer than the held-out records
    reply = as_the_mod_calls(
        secagg_upload_request(small, 1, **{Request.EVALUATE_ONLY: True}), make_context(small, NODE)
    )
    assert not reply.has_error()
    (upload,) = compat.recorddict_to_fitres(reply.content, keep_input=True).parameters.tensors
    from flwr.common import bytes_to_ndarray

    run = RunConfig.from_run_config(small)
    layout = hospital_layout(run.model, run.seed)
    codec = UploadCodec(layout.size, run.model.labels, 0.5, 5.0)
    assert codec.decode_sum(bytes_to_ndarray(upload), 1).evaluation.examples == 0  # withheld
    own = json.loads((ledger_file(run_config).parent / "evaluation.jsonl").read_text())
    assert own["examples"] > 5  # the hospital evaluated its whole split, for itself
