"""Privacy per patient: which mechanism, at what cost (``python -m benchmarks --suite patients``).

On the embedded data with two to five studies per patient (``data.min-studies`` 2,
``data.max-studies`` 5: each study a phantom drawn anew from the report's labels), with
the frozen pretrained encoders of the README's recipe:

1. **The mechanism, at one hospital.** The same DP-SGD loop (Opacus's per-example
   gradients, the same clipping norm, steps and expected batch) trains the model on one
   hospital holding every record, four ways: per record at epsilon 8 (per patient, by
   group privacy, up to 5 x 8), per record at epsilon 1.6 (per patient up to 8, by
   group privacy), and per patient at epsilon 8 two ways: one record drawn per sampled
   patient (fedfusion's default), or each sampled patient's records' gradients summed
   and that sum clipped (user-level DP-SGD). It reports the held-out macro AUROC and the
   seconds per step, side by side.
2. **The federation.** Five hospitals, the product's own rounds (client.audit.inprocess),
   per patient (the default with patient ids) and per record, at epsilon 8.

Group privacy for a record-level guarantee: a patient with k records has at most k
times the record's epsilon (with delta growing too), so per record at 1.6 is the record
level that promises a 5-study patient what per patient at 8 does.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from benchmarks.report import Measurement
from client.audit.inprocess import federate, site_list
from client.dp.patients import patient_groups
from shared_model.config import RunConfig
from shared_model.config.presets import PRESETS
from shared_model.engine import make_loss, make_optimizer, predict
from shared_model.evaluation import EvalStats
from shared_model.weights import initial_model

__all__ = ["MECHANISMS", "run_patients_bench"]

Echo = Callable[[str], None]
STUDIES = {"data.min-studies": 2, "data.max-studies": 5}
RECIPE: dict[str, Any] = {
    **PRESETS["efficientnet-minilm-concat"],
    **STUDIES,
    "train.learning-rate": 0.1,
    "privacy.max-grad-norm": 2.0,
    "privacy.secure-noise": False,
}
DELTA = 1e-5
CLIP = 2.0
BATCH = 128  # expected units (records or patients) a step
# name -> (unit sampled, how a sampled patient's records enter, epsilon per unit, k for group)
MECHANISMS: dict[str, tuple[str, str, float]] = {
    "per record, eps 8 per record": ("record", "one", 8.0),
    "per record, eps 1.6 per record": ("record", "one", 1.6),
    "per patient, one record per sampled patient, eps 8": ("patient", "one", 8.0),
    "per patient, clipped sum of the patient's records, eps 8": ("patient", "sum", 8.0),
}


def _noise(epsilon: float, rate: float, steps: int) -> float:
    # Opacus loads here, not at import: `python -m benchmarks` imports every suite's module
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=DELTA,
                                      sample_rate=rate, steps=steps, accountant="rdp"))  # fmt: skip


def _train(
    data: Any, unit: str, how: str, epsilon: float, steps: int, seed: int, run: RunConfig
) -> tuple[torch.nn.Module, list[float]]:
    """DP-SGD of one mechanism; the model and each step's seconds."""
    from opacus import GradSampleModule  # loaded here, not at import: as in _noise above

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")

    if unit == "patient":
        groups = patient_groups(data.patient_ids)
    else:
        groups = [[i] for i in range(len(data))]
    rate = min(BATCH / len(groups), 0.5)
    sigma = _noise(epsilon, rate, steps)
    torch.manual_seed(seed)
    model = initial_model(run.model, seed)
    module = GradSampleModule(model)
    optimizer = make_optimizer(model, run)
    loss_fn = make_loss(None)
    params = [p for p in model.parameters() if p.requires_grad]
    rng = np.random.default_rng(seed)
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        chosen = np.flatnonzero(rng.random(len(groups)) < rate)
        rows, owner = [], []
        for u, g in enumerate(chosen):
            picked = groups[g] if how == "sum" else [groups[g][rng.integers(len(groups[g]))]]
            rows += picked
            owner += [u] * len(picked)
        total = [torch.zeros_like(p) for p in params]
        if rows:
            image, ids, present, labels = data[torch.as_tensor(rows)]
            module.zero_grad(set_to_none=True)
            loss_fn.per_example(module(image, ids, present), labels).sum().backward()
            index = torch.as_tensor(owner)
            per_unit = [
                torch.zeros((len(chosen), *p.shape)).index_add_(0, index, p.grad_sample)
                for p in params
            ]  # one gradient per sampled unit: a record, or a patient's summed records
            norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_unit))
            scale = (CLIP / (norms + 1e-6)).clamp(max=1.0)
            total = [(g * scale.view(-1, *[1] * (g.dim() - 1))).sum(0) for g in per_unit]
        for p, t in zip(params, total, strict=True):
            p.grad = (t + sigma * CLIP * torch.randn_like(t)) / (rate * len(groups))
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    module._close()
    return model, seconds


def _auroc(model: torch.nn.Module, data: Any, run: RunConfig) -> float:
    """Held-out macro AUROC as the server reads it, from score histograms.

    Read like the federation's figures, so that the two compare.
    """
    out = predict(model, DataLoader(data, batch_size=512), make_loss(None))
    stats = EvalStats.from_predictions(run.model.labels, out.logits, out.targets, out.losses)
    return float(stats.metrics()["auroc"])


def run_patients_bench(
    *, seeds: Sequence[int] = (0, 1), steps: int = 400, reports: int = 1500,
    rounds: int = 15, echo: Echo = print,
) -> list[Measurement]:  # fmt: skip
    """The mechanism comparison at one hospital, then the federation per patient and record."""
    out: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="fedfusion-patients-") as folder:
        tmp = Path(folder)
        config = {**RECIPE, "data.max-reports": reports, "steps": steps, "batch": BATCH}
        for seed in seeds:
            settings = {**RECIPE, "data.max-reports": reports, "seed": seed}
            run = RunConfig.from_run_config({**settings, "output-dir": str(tmp / "one")})
            site = site_list(run, 1)[0]
            data = site.data.train
            sizes = [len(g) for g in patient_groups(data.patient_ids)]
            echo(f"  seed {seed}: one hospital, {len(sizes)} patients, {len(data)} records "
                 f"(median {statistics.median(sizes):g}, max {max(sizes)} a patient)")  # fmt: skip
            for name, (unit, how, epsilon) in MECHANISMS.items():
                model, seconds = _train(data, unit, how, epsilon, steps, seed, run)
                auroc = _auroc(model, site.data.test, run)
                per_patient = epsilon * (1 if unit == "patient" else max(sizes))
                step = statistics.median(seconds) * 1e3
                echo(f"    {name}: held-out macro AUROC {auroc:.3f}, epsilon per patient "
                     f"<= {per_patient:g}, {step:.1f} ms a step")  # fmt: skip
                key, facts = f"patients/one-hospital/{name}", {**config, "seed": seed}
                out.append(Measurement.of(f"{key}/auroc", facts, [auroc], "AUROC"))
                out.append(Measurement.of(f"{key}/step", facts, seconds, "s"))
        baseline = next(m for m in out if m.name.endswith("eps 8 per record/step"))
        for m in out:
            if m.name.endswith("/step") and m.config["seed"] == baseline.config["seed"]:
                m.baseline, m.ratio = baseline.name, m.median / baseline.median
        for unit, hospital in (("patient", {}), ("record", {"privacy_unit": "record"})):
            echo(f"  federation: 5 hospitals, {rounds} rounds, epsilon 8 per {unit} ...")
            history = federate(
                {**RECIPE, "data.max-reports": reports},
                5,
                rounds,
                tmp / f"federation-{unit}",
                hospital=hospital,
            )
            auroc = float(history[-1]["eval_metrics"]["auroc"])
            echo(f"    held-out macro AUROC {auroc:.3f}")
            out.append(
                Measurement.of(
                    f"patients/federation/eps 8 per {unit}/auroc",
                    {**config, "rounds": rounds, "hospitals": 5},
                    [auroc],
                    "AUROC",
                )
            )
    return out
