"""Adversarial tests of export, predict/evaluate and bundle loading (an independent review).

Each test attacks one privacy or safety claim of the export / predict / evaluate feature.
Each was written against a weakness found in review and now guards its fix. The
attacker writes the whole bundle: an edited bundle.json gets a fresh digest (what
anyone who edits a bundle does), so the checks behind the digest are what is tested.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from server.commands.export import export_run, read_run
from shared_model.cli import build_app
from shared_model.datasets.export import write_manifest
from shared_model.inference.bundle import BundleError, bundle_digest, file_sha256, load_bundle
from shared_model.inference.loaded import load_model
from shared_model.inference.local_evaluation import evaluate_bundle
from shared_model.inference.predict import predict_record
from tests.support.manifests import write_csv
from tests.support.runs import fake_run

LABELS = ("normal", "cardiomegaly", "opacity")
SMALL = {"model.labels": "|".join(LABELS), "model.embed-dim": 16, "model.text-heads": 2}


def run_cli(*args: object):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small SecAgg+ run (rounds 0-3, best = 2) and its exported bundle."""
    root = tmp_path_factory.mktemp("attacks")
    fake_run(root / "run", [None, 0.5, 2.5, 1.0], SMALL)
    return root / "run", export_run(root / "run", root / "bundle")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A hospital's labelled test records (PNG + indication), labels restricted to LABELS."""
    root = tmp_path_factory.mktemp("site")
    write_manifest(root, 0, 40)
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = [
            {**r, "labels": "|".join(x for x in r["labels"].split("|") if x in LABELS)}
            for r in csv.DictReader(handle)
        ]
    return write_csv(root / "site.csv", rows)


def _copy(bundle: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(bundle, tmp_path / name))


def _edit_info(bundle: Path, change) -> None:
    info = json.loads((bundle / "bundle.json").read_text())
    change(info)
    info["digest"] = bundle_digest(info)
    (bundle / "bundle.json").write_text(json.dumps(info))


def _rehash(bundle: Path) -> None:
    """What anyone who edits a bundle does: put the new weights' SHA-256 in bundle.json."""
    digest = file_sha256(bundle / "weights.safetensors")
    _edit_info(bundle, lambda i: i["weights"].update(sha256=digest))


# ------------------------------------------------------------------ 1. hostile bundles


def test_a_hostile_text_model_path_never_runs_code(exported, tmp_path):
    # Prepare: a folder with custom model code, and a bundle whose settings point at it
    _, bundle = exported
    evil, marker = tmp_path / "evil-model", tmp_path / "PWNED"
    evil.mkdir()
    (evil / "config.json").write_text(
        json.dumps(
            {
                "model_type": "fedfusion-evil",
                "hidden_size": 8,
                "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
            }
        )
    )
    (evil / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'fedfusion-evil'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"
    )
    hostile = _copy(bundle, tmp_path, "hostile")
    _edit_info(
        hostile,
        lambda i: i["model"].update(
            {
                "model.text-encoder": "pretrained",
                "model.encoder-mode": "frozen",
                "model.text-model": str(evil),
            }
        ),
    )
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "hf-modules"),
        "HF_HOME": str(tmp_path / "hf-home"),
    }

    # Execute: the operator answers the library's prompt (or stdin happens to hold a "y")
    result = subprocess.run(
        [str(Path(sys.executable).parent / "fedfusion"), "predict", str(hostile), "--text", "x"],
        input="y\ny\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )

    # Assert: a clear refusal, no prompt, and above all no code from the bundle ran
    assert not marker.exists(), "code named by a hostile bundle.json ran at the hospital"
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert result.returncode == 2


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda i: i["model"].update({"model.labels": ["cardiomegaly", "normal", "opacity"]}),
            id="labels-swapped",
        ),
        pytest.param(lambda i: i["model"].update({"model.labels": "abc"}), id="labels-a-string"),
        pytest.param(
            lambda i: i["decision"].update({"threshold-logits": [1e300] * 3}),
            id="thresholds-never-positive",
        ),
    ],
)
def test_a_changed_bundle_json_is_not_a_silent_wrong_model(exported, tmp_path, damage):
    _, bundle = exported
    changed = _copy(bundle, tmp_path)
    _edit_info(changed, damage)
    with pytest.raises(BundleError):
        load_model(load_bundle(changed))


def test_non_finite_weights_are_refused(exported, tmp_path):
    # Prepare: NaN in one tensor, the hash updated as the bundle's author would
    _, bundle = exported
    hostile = _copy(bundle, tmp_path)
    state = load_file(str(hostile / "weights.safetensors"))
    name = sorted(state)[-1]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(hostile / "weights.safetensors"))
    _rehash(hostile)

    # Execute + Assert: refused on load, not an all-negative answer for every patient
    try:
        loaded = load_model(load_bundle(hostile))
    except BundleError:
        return
    prediction = predict_record(loaded, None, "Cough and fever.")
    assert all(np.isfinite(list(prediction.probabilities.values()))), prediction


def test_weights_are_never_unpickled_even_with_a_matching_hash(exported, tmp_path):
    """Guard: a pickle in place of the safetensors file is refused without running it."""
    _, bundle = exported
    hostile = _copy(bundle, tmp_path)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    (hostile / "weights.safetensors").write_bytes(pickle.dumps(Payload()))
    _rehash(hostile)
    with pytest.raises(BundleError):
        load_model(load_bundle(hostile))
    torch.save({"x": Payload()}, hostile / "weights.safetensors")
    _rehash(hostile)
    with pytest.raises(BundleError):
        load_model(load_bundle(hostile))
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda i: i["weights"].update(sha256=5), id="sha256-a-number"),
        pytest.param(lambda i: i.update(source=[]), id="source-a-list"),
        pytest.param(lambda i: i["decision"].pop("rule"), id="no-decision-rule"),
    ],
)
def test_a_malformed_bundle_json_gets_a_clear_error_not_a_traceback(
    exported, site, tmp_path, damage
):
    _, bundle = exported
    changed = _copy(bundle, tmp_path)
    _edit_info(changed, damage)
    result = run_cli("evaluate", changed, site, "-o", tmp_path / "ev", "--bootstrap", "0")
    assert result.exit_code == 2, repr(result.exception)


# ------------------------------------------------------------ 2. predict / evaluate


def test_predict_and_evaluate_open_no_network_connection(exported, site, tmp_path, monkeypatch):
    """Guard: 'nothing is sent' holds for the code paths of both commands."""
    _, bundle = exported
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if len(args) > 1 else args)
        raise OSError("network access during predict/evaluate")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    out = tmp_path / "ev"
    assert run_cli("predict", bundle, "--manifest", site, "-o", tmp_path / "p.csv").exit_code == 0
    result = run_cli("evaluate", bundle, site, "-o", out, "--recalibrate", "--bootstrap", "20")
    assert result.exit_code == 0, result.output
    assert attempts == []


def test_the_recalibrated_bundle_says_it_must_not_leave_the_hospital(exported, site, tmp_path):
    _, bundle = exported
    out = tmp_path / "ev"
    result = run_cli("evaluate", bundle, site, "-o", out, "--recalibrate", "--bootstrap", "20")
    assert result.exit_code == 0, result.output
    card = (out / "recalibrated-bundle" / "MODEL_CARD.md").read_text()
    assert re.search(r"not (differentially private|DP[- ]protected|covered by)", card, re.I)
    assert re.search(r"(do not|must not|never) (share|send|distribute|publish)", card, re.I)


def test_recalibrated_temperatures_depend_on_single_records(exported, site, tmp_path):
    """Evidence for the finding above: changing one record's labels moves the temperatures.

    The temperatures (and the record count in ``fitted-on``) are an exact, non-noised
    function of the hospital's test records, so a recalibrated bundle that leaves the
    hospital is a release of them that no epsilon accounts for.
    """
    _, bundle = exported
    loaded = load_model(load_bundle(bundle))
    rows = list(csv.DictReader(site.open(newline="", encoding="utf-8")))
    flipped = [dict(r) for r in rows]
    mine = set(filter(None, flipped[0]["labels"].split("|")))
    flipped[0]["labels"] = "|".join(x for x in LABELS if x not in mine)  # all three flipped
    other = write_csv(site.parent / "one-record-changed.csv", flipped)
    a = evaluate_bundle(loaded, site, tmp_path / "a", bootstrap=0, recalibrate=True)
    b = evaluate_bundle(loaded, other, tmp_path / "b", bootstrap=0, recalibrate=True)
    assert a.evaluation.n == b.evaluation.n == len(rows)
    assert not np.allclose(a.temperatures, b.temperatures, rtol=0, atol=1e-4)
    info = json.loads((tmp_path / "b" / "recalibrated-bundle" / "bundle.json").read_text())
    assert info["calibration"]["fitted-on"] == f"{len(rows)} labelled records at this hospital"


def test_the_recalibrated_bundle_holds_the_weights_that_were_evaluated(exported, site, tmp_path):
    # Prepare: load and check the bundle, then its weights change on disk (a re-export
    # over a shared folder, a tamperer) while the evaluation runs
    run, bundle = exported
    copy = _copy(bundle, tmp_path)
    loaded = load_model(load_bundle(copy))
    # cloned: load_file maps the file, and the copy below overwrites it in place
    evaluated = {k: v.clone() for k, v in load_file(str(copy / "weights.safetensors")).items()}
    shutil.copy(run / "checkpoints" / "round-0001.safetensors", copy / "weights.safetensors")

    # Execute
    try:
        result = evaluate_bundle(loaded, site, tmp_path / "ev", bootstrap=0, recalibrate=True)
    except BundleError:
        return  # refusing is a fine answer

    # Assert: the new bundle ships the model its temperatures were fitted for
    shipped = load_file(str(result.recalibrated / "weights.safetensors"))
    assert all(torch.equal(shipped[k], evaluated[k]) for k in evaluated)


# ----------------------------------------------------------------------- 3. export


def _plain_run_one_hospital_shares(root: Path) -> Path:
    """A run without SecAgg+ in which hospital-1 withheld its evaluation every round.

    Written as the server records it: the pooled statistics are hospital-0's alone, and
    metrics.json holds hospital-0's own eval AUROC (server/app/strategy.py
    aggregate_evaluate) and none for hospital-1.
    """
    fake_run(root, [None, 0.5, 2.5, 1.0], {**SMALL, "secagg.enabled": False}, pooled=1)
    facts = read_run(root)
    metrics = json.loads((root / "metrics.json").read_text())
    for record in metrics["rounds"]:
        stats = facts.stats(int(record["round"]))
        own = stats.metrics() if stats is not None else {}
        for h in record["hospitals"]:
            shared = h["hospital"] == "hospital-0" and stats is not None
            h["eval_auroc"] = own.get("auroc") if shared else None
            h["eval_loss"] = own.get("loss") if shared else None
    (root / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_a_single_hospitals_evaluation_is_not_published_as_pooled(tmp_path):
    # Prepare: the pooled statistics are hospital-0's alone (the sum counts 1 hospital)
    run = _plain_run_one_hospital_shares(tmp_path / "run")
    record = next(
        r for r in json.loads((run / "metrics.json").read_text())["rounds"] if r["round"] == 2
    )
    own_auroc = next(h["eval_auroc"] for h in record["hospitals"] if h["hospital"] == "hospital-0")

    # Execute
    bundle = export_run(run, tmp_path / "b", "2")
    card = (bundle / "MODEL_CARD.md").read_text()

    # Assert: hospital-0's own figure is not published, thresholds are not fitted on it,
    # and the card says why
    assert f"{own_auroc:.3f}" not in card
    assert load_bundle(bundle).threshold_logits.tolist() == [0.0] * len(LABELS)
    evaluation = card.split("## Evaluation", 1)[1].split("## Known limits", 1)[0]
    assert re.search(r"\b(only|single|one|1) hospital\b", evaluation, re.I), evaluation


def test_the_card_of_a_plain_run_does_not_claim_secure_aggregation(tmp_path):
    run = _plain_run_one_hospital_shares(tmp_path / "run")
    card = (export_run(run, tmp_path / "b") / "MODEL_CARD.md").read_text()
    assert "sent in the clear" in card  # the Training section knows
    assert "secure aggregation summed" not in card


def test_best_export_checks_that_best_json_and_the_best_model_agree(tmp_path):
    # Prepare: the state a kill between refresh_best's two writes leaves
    run = tmp_path / "run"
    fake_run(run, [None, 0.5, 2.5, 1.0], SMALL)
    assert json.loads((run / "best.json").read_text())["round"] == 2
    shutil.copy(run / "checkpoints" / "round-0003.safetensors", run / "best_model.safetensors")

    # Execute
    try:
        bundle = export_run(run, tmp_path / "b")
    except BundleError:
        return
    # Assert: the weights are the model of the round the bundle names
    info = json.loads((bundle / "bundle.json").read_text())
    named = load_file(str(run / "checkpoints" / f"round-{info['source']['round']:04d}.safetensors"))
    shipped = load_file(str(bundle / "weights.safetensors"))
    assert all(torch.equal(shipped[k], named[k]) for k in named)


def test_the_bundle_holds_no_per_hospital_record_of_metrics_json(tmp_path):
    """Guard: per-hospital figures in metrics.json (plain runs) never reach the bundle."""
    run = _plain_run_one_hospital_shares(tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    for record in metrics["rounds"]:
        for h in record["hospitals"]:
            h["eval_auroc"] = 0.123456789 if h["eval_auroc"] is not None else None
            h["train_loss"], h["num_examples"] = 9.87654321, 424242
    (run / "metrics.json").write_text(json.dumps(metrics))
    bundle = export_run(run, tmp_path / "b")
    text = (bundle / "bundle.json").read_text() + (bundle / "MODEL_CARD.md").read_text()
    for value in ("0.123", "9.87", "424242", "424,242"):
        assert value not in text
