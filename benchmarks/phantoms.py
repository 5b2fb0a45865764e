"""``python -m benchmarks --suite phantoms``: how hard the synthetic radiographs are.

The embedded images are phantoms drawn from each report's labels. They must carry real
but imperfect signal: as hard as real radiographs, no harder, no easier. The anchor is
external, never a fusion or federation result: a centralized, non-private, image-only
model of the default architecture should reach a held-out macro AUROC between 0.80 and
0.90, the range CheXNet-class models reach per finding on real chest radiographs
(Rajpurkar et al., 2017; Irvin et al., 2019).

The suite trains exactly that model (one site holding all 3,860 records, no DP, no
SecAgg+, ``model.branches = image``) for a fixed budget of epochs, over 3 seeds, and
reports the macro AUROC of the final model with its per-label AUROC. The phantoms'
parameters (``shared_model/datasets/phantoms.py``) are set so that this figure falls
inside the band, and are never tuned toward anything else.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.federation import simulate_run
from benchmarks.report import Echo, Measurement

__all__ = ["ANCHOR", "run_phantom_calibration"]

ANCHOR = (0.80, 0.90)  # centralized image-only macro AUROC on real radiographs
IMAGE_ONLY_CENTRALIZED = {
    "privacy.enabled": False,
    "secagg.enabled": False,
    "model.branches": "image",
}


def run_phantom_calibration(
    seeds: Sequence[int] = (0, 1, 2), rounds: int = 10, echo: Echo = print
) -> list[Measurement]:
    """Macro and per-label AUROC of a centralized image-only model, over ``seeds``.

    ``rounds`` rounds of ``train.local-epochs`` (2) epochs each at one site: the same
    budget for every seed, long enough that the held-out AUROC has levelled off.
    """
    finals = []
    with tempfile.TemporaryDirectory(prefix="fedfusion-phantoms-") as tmp:
        for seed in seeds:
            echo(f"  centralized image-only, non-private, {rounds} rounds, seed {seed} ...")
            rounds_done = simulate_run(
                Path(tmp) / f"seed-{seed}", 1, rounds, {**IMAGE_ONLY_CENTRALIZED, "seed": seed}
            )
            finals.append(rounds_done[-1]["eval_metrics"])
    config = {"seeds": list(seeds), "rounds": rounds, **IMAGE_ONLY_CENTRALIZED}
    macro = Measurement.of(
        "phantoms/image-only-centralized/macro-auroc",
        config,
        [float(m["auroc"]) for m in finals],
        "AUROC",
    )
    low, high = ANCHOR
    macro.target = f"{low:.2f} to {high:.2f}"
    macro.met = low <= macro.median <= high
    labels = sorted(k.split(".", 1)[1] for k in finals[0] if k.startswith("auroc."))
    per_label = [
        Measurement.of(
            f"phantoms/image-only-centralized/auroc/{label}",
            config,
            [v for m in finals if not np.isnan(v := float(m.get(f"auroc.{label}", np.nan)))],
            "AUROC",
        )
        for label in labels
    ]
    return [macro, *per_label]
