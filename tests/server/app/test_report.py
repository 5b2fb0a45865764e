"""The run report: privacy per hospital, secure aggregation per round, the threat model."""

import json

from server.app.report import write_report
from server.app.store import HospitalRound, RoundRecord


def hospital(name, status="trained", eps=2.5, nm=1.12, held_out=None, unit="patient"):
    return HospitalRound(
        privacy_unit=unit,
        held_out_epsilon=held_out,
        max_held_out_epsilon=None if held_out is None else 4.0,
        hospital=name,
        node_id=hash(name) % 1000,
        status=status,
        num_examples=500,
        train_loss=0.7,
        epsilon=eps,
        max_epsilon=6.0,
        noise_multiplier=nm,
        sample_rate=0.128,
        steps=16,
        bytes_up=1_521_000,
    )


def test_report_shows_dp_per_hospital_secagg_per_round_and_the_threat_model(tmp_path):
    rounds = [
        RoundRecord(0, None, 0.8, 0.5, {"auroc": 0.5}, [], 3.0),
        RoundRecord(
            1,
            0.7,
            0.6,
            0.7,
            # nodule: too few to read under the hospitals' noise (NaN, written as null)
            {"auroc": 0.7, "auroc.normal": 0.7, "auroc.nodule": float("nan")},
            [
                hospital("st-mary"),
                hospital("county", eps=3.1, nm=0.98, held_out=0.84, unit="record"),
            ],
            10.0,
            failures=1,
            secagg_shares=3,
            secagg_threshold=2,
        ),
    ]
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": [r.to_dict() for r in rounds]}))
    config = {
        "privacy.max-grad-norm": 1.0,
        "privacy.delta": 1e-5,
        "privacy.accountant": "rdp",
        "secagg.enabled": True,
        "secagg.clipping-range": 0.5,
        "secagg.max-weight": 10000.0,
        "secagg.stage-timeout": 120.0,
    }
    text = write_report(tmp_path, config).read_text()
    # both parts of each hospital's split: training and held-out (noised, or exact)
    assert "| county | record | 3.100 | 6 | 0.840 | 4 | 0.9800 | 0.12800 | 16 |" in text
    assert "| st-mary | patient | 2.500 | 6 | - | - | 1.1200 | 0.12800 | 16 |" in text
    assert "epsilon per patient: st-mary; per record: county" in text  # the run table
    assert "3.10/0.84" in text and "eps a/b" in text  # the run table: both, explained
    assert "| 1 | 2 | 0 | 1 | 0 | 3 / 2 | 1.52 MB |" in text  # one hospital dropped out
    assert "clipping range 0.5" in text and "The server may lie" in text
    assert "several hospitals" in " ".join(text.split())  # what record-level DP leaves out
    for png in ("epsilon.png", "training_curves.png", "per_label_auroc.png"):
        assert (tmp_path / png).stat().st_size > 1000
    config["secagg.enabled"] = False
    assert "**Off**" in write_report(tmp_path, config).read_text()
