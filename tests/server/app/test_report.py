"""The run report: privacy per hospital, secure aggregation per round, the threat model."""

import json

from server.app.report import write_report
from server.app.store import HospitalRound, RoundRecord


def hospital(name, status="trained", eps=2.5, nm=1.12):
    return HospitalRound(
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
            {"auroc": 0.7, "auroc.normal": 0.7},
            [hospital("st-mary"), hospital("county", eps=3.1, nm=0.98)],
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
    assert "| county | 3.100 | 6 | 0.9800 | 0.12800 | 16 |" in text
    assert "| st-mary | 2.500 | 6 | 1.1200 | 0.12800 | 16 |" in text
    assert "| 1 | 2 | 0 | 1 | 0 | 3 / 2 | 1.52 MB |" in text  # one hospital dropped out
    assert "clipping range 0.5" in text and "honest but curious" in text
    assert "several\n  hospitals" in text  # what record-level DP does not cover
    for png in ("epsilon.png", "training_curves.png", "per_label_auroc.png"):
        assert (tmp_path / png).stat().st_size > 1000
    config["secagg.enabled"] = False
    assert "**Off**" in write_report(tmp_path, config).read_text()
