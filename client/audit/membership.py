"""`fedfusion audit`: an empirical membership-inference test of a trained global model.

DP bounds what anyone can learn about a record from the model; an audit measures what a
concrete attacker does learn. Two attacks score each record, and the attacker guesses
"member" above a threshold:

- **loss-threshold** (Yeom et al., 2018): records the model was trained on tend to have
  lower loss, so the score is the final model's negative loss.
- **calibrated loss** (difficulty calibration, Watson et al., 2022): the score is how much
  training lowered the record's loss, from the initial model (round 0) to the final one.
  It discounts records that are simply easy, and is the stronger attack here.

Over every threshold each attack gives a ROC curve between the members (each simulated
hospital's training split) and the non-members (its held-out split, never trained on):

- **AUC**: 0.5 is a coin toss; 1.0 identifies every member.
- **TPR at low FPR** (1% and 0.1%): how many members the attacker finds while almost
  never accusing a non-member, the regime that matters for privacy (Carlini et al., 2022).

The 95% interval of the AUC comes from a bootstrap over records. Under (epsilon, delta)-DP
the attack's TPR is at most e^epsilon * FPR + delta at every threshold, so at epsilon = 8 the
bound allows a strong attack in principle; the audit shows what a practical one achieves.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_curve
from torch.utils.data import DataLoader

from shared_model.config import ConfigError, RunConfig
from shared_model.datasets import embedded_hospital
from shared_model.engine import MultiLabelBCE, pos_weight_from_config
from shared_model.metrics import bootstrap_aurocs, per_label_auroc, percentile_ci
from shared_model.weights import initial_model, load_shared_state

__all__ = ["AttackResult", "AuditResult", "attack_metrics", "audit_run", "hospital_count"]

LOW_FPRS = (0.01, 0.001)


@dataclass(frozen=True)
class AttackResult:
    """One attack's success against one model."""

    auc: float
    auc_ci95: tuple[float, float]
    tpr_at_fpr: dict[str, float]  # "0.01" -> TPR


@dataclass(frozen=True)
class AuditResult:
    """Every attack's success, and the strongest (highest AUC) as the headline."""

    attacks: dict[str, AttackResult]
    members: int
    non_members: int
    hospitals: int

    @property
    def strongest(self) -> tuple[str, AttackResult]:
        """The attack with the highest AUC."""
        return max(self.attacks.items(), key=lambda kv: kv[1].auc)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        name, best = self.strongest
        return {**asdict(self), "strongest": name, "auc": best.auc}


def attack_metrics(
    member_scores: np.ndarray, non_member_scores: np.ndarray, seed: int = 0, boots: int = 200
) -> AttackResult:
    """AUC, its bootstrap 95% interval, and TPR at each low FPR (higher score = member)."""
    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    s = np.concatenate([member_scores, non_member_scores])
    auc = float(per_label_auroc(y[:, None], s[:, None])[0])
    fpr, tpr, _ = roc_curve(y, s)
    at = {str(f): float(tpr[fpr <= f].max()) if np.any(fpr <= f) else 0.0 for f in LOW_FPRS}
    # members and non-members resampled separately: each keeps its size in every resample
    strata = (np.flatnonzero(y == 1), np.flatnonzero(y == 0))
    draws = bootstrap_aurocs(y[:, None], s[:, None], boots, seed, strata=strata)
    return AttackResult(auc, percentile_ci(draws[:, 0]), at)


@torch.no_grad()
def _negative_losses(model: torch.nn.Module, records: Any, loss_fn: torch.nn.Module) -> np.ndarray:
    model.eval()
    out = []
    for image, report_ids, present, labels in DataLoader(records, batch_size=256):
        out.append(-loss_fn(model(image, report_ids, present), labels))
    return torch.cat(out).numpy()


def hospital_count(run_dir: Path) -> int:
    """How many simulated hospitals a run had, from the names in its metrics (0 if none)."""
    metrics = run_dir / "metrics.json"
    if not metrics.exists():
        return 0
    names = {
        h["hospital"]
        for r in json.loads(metrics.read_text("utf-8"))["rounds"]
        for h in r["hospitals"]
    }
    ids = [int(m.group(1)) for n in names if (m := re.fullmatch(r"hospital-(\d+)", n))]
    return max(ids) + 1 if ids else 0


def audit_run(
    run_dir: Path,
    hospitals: int | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> AuditResult:
    """Attack the final global model of a simulated run with its hospitals' own records.

    The run directory must hold ``run.json`` and ``global_model.safetensors`` of a run on
    the embedded data (`fedfusion simulate`): its members and non-members are rebuilt
    exactly from the run's settings and seed.
    """
    run_dir = Path(run_dir)
    for name in ("run.json", "global_model.safetensors"):
        if not (run_dir / name).exists():
            raise ConfigError(f"{run_dir} has no {name}: audit a finished `fedfusion simulate` run")
    run = RunConfig.from_run_config(json.loads((run_dir / "run.json").read_text())["config"])
    count = hospitals or hospital_count(run_dir)
    if count < 1:
        raise ConfigError(f"cannot tell how many hospitals {run_dir} had: pass --hospitals")
    # Checkpoints hold the trainable parameters; the frozen rest is rebuilt as the
    # server built it (server/app/server_app.py).
    initial = initial_model(run.model, run.seed)
    final = copy.deepcopy(initial)
    load_shared_state(final, load_file(str(run_dir / "global_model.safetensors")))
    loss_fn = MultiLabelBCE(pos_weight_from_config(run.train, run.model.labels), "none")
    scores: dict[str, dict[bool, list[np.ndarray]]] = {
        "loss-threshold": {True: [], False: []},
        "calibrated-loss": {True: [], False: []},
    }
    for k in range(count):
        split = embedded_hospital(k, count, run.model, run.data, run.seed)
        for member, records in ((True, split.train), (False, split.test)):
            after = _negative_losses(final, records, loss_fn)
            before = _negative_losses(initial, records, loss_fn)
            scores["loss-threshold"][member].append(after)
            scores["calibrated-loss"][member].append(after - before)
        if progress is not None:
            progress("scoring hospitals' records", 1)
    attacks = {
        name: attack_metrics(np.concatenate(s[True]), np.concatenate(s[False]), seed=run.seed)
        for name, s in scores.items()
    }
    members = sum(len(x) for x in scores["loss-threshold"][True])
    non_members = sum(len(x) for x in scores["loss-threshold"][False])
    return AuditResult(attacks, members, non_members, count)
