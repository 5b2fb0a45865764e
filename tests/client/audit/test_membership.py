"""The membership-inference audit: its statistics, and a run rebuilt from its settings."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.stats import norm
from typer.testing import CliRunner

from client.audit.membership import attack_metrics, audit_run
from shared_model.cli import build_app
from shared_model.config import ConfigError, RunConfig
from shared_model.model import FusionModel


def test_attack_metrics_measure_a_known_separation():
    rng = np.random.default_rng(0)
    members, others = rng.normal(1.0, 1.0, 4000), rng.normal(0.0, 1.0, 4000)
    r = attack_metrics(members, others)
    assert r.auc == pytest.approx(norm.cdf(1 / np.sqrt(2)), abs=0.015)  # 0.760
    assert r.auc_ci95[0] < r.auc < r.auc_ci95[1]
    assert 0.05 < r.tpr_at_fpr["0.01"] < 0.25  # the theory says 0.092
    same = attack_metrics(rng.normal(0, 1, 2000), rng.normal(0, 1, 2000))
    assert same.auc_ci95[0] < 0.5 < same.auc_ci95[1]


def fake_run(tmp_path, hospitals=2):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {"output-dir": str(tmp_path), "data.max-reports": 80, "num-rounds": 1}
    run = RunConfig.from_run_config(config)
    (tmp_path / "run.json").write_text(json.dumps({"config": run.to_run_config()}))
    torch.manual_seed(0)
    save_file(FusionModel(run.model).state_dict(), str(tmp_path / "global_model.safetensors"))
    rounds = [{"round": 0, "hospitals": [{"hospital": f"hospital-{k}"} for k in range(hospitals)]}]
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": rounds}))
    return tmp_path


def test_audit_rebuilds_the_runs_members_and_non_members(tmp_path):
    result = audit_run(fake_run(tmp_path))
    assert result.hospitals == 2 and result.members + result.non_members == 80
    # test-fraction 0.2: each patient held out on its own, with probability 0.2
    assert 2 * result.non_members < result.members < 8 * result.non_members
    # the final model is the initial one here: training lowered no loss, no attack works
    _name, best = result.strongest
    assert set(result.attacks) == {"loss-threshold", "calibrated-loss"}
    assert result.attacks["calibrated-loss"].auc == pytest.approx(0.5)
    assert 0.0 <= best.auc <= 1.0 and json.dumps(result.to_dict())


def test_audit_command_writes_audit_json_and_refuses_an_unfinished_run(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    out = CliRunner().invoke(build_app(), ["audit", str(run_dir)])
    assert out.exit_code == 0, out.output
    assert json.loads((run_dir / "audit.json").read_text())["members"] > 0
    (run_dir / "global_model.safetensors").unlink()
    refused = CliRunner().invoke(build_app(), ["audit", str(run_dir)])
    assert refused.exit_code == 2 and "global_model.safetensors" in refused.output
    with pytest.raises(ConfigError):
        audit_run(tmp_path / "nowhere")
