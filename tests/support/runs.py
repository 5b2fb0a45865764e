"""A run directory written by the server's own RunStore, without running a federation.

Each round's model is the initial model moved by a seeded step, and each round's
pooled held-out statistics are built from synthetic scores whose separation (and so
AUROC) the test chooses. Export reads it exactly as it reads a real run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from client.dp.held_out import coarse_layout
from server.app.store import HospitalRound, RoundRecord, RunStore
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.weights import base_fingerprint, initial_model, shared_state

__all__ = ["fake_run", "round_stats"]


def round_stats(
    labels: Sequence[str],
    separation: float,
    n: int = 400,
    seed: int = 0,
    hospitals: int = 3,
    noise_std: float = 0.0,
) -> EvalStats:
    """Statistics of ``n`` synthetic records pooled over ``hospitals``.

    Positives score ``separation`` higher than negatives. With ``noise_std``, each
    hospital releases its statistics as a hospital with its own data does: in the
    coarse bins, every count with Gaussian noise of that std.
    """
    rng = np.random.default_rng(seed)
    targets = rng.random((n, len(labels))) < 0.3
    logits = rng.normal(-1.0, 1.0, (n, len(labels))) + separation * targets
    parts = np.array_split(np.arange(n), hospitals)
    stats = [
        EvalStats.from_predictions(labels, logits[i], targets[i].astype(float), np.zeros(len(i)))
        for i in parts
    ]
    if noise_std:
        stats = [_noised(s, noise_std, rng) for s in stats]
    return sum(stats[1:], stats[0])


def _noised(stats: EvalStats, std: float, rng: np.random.Generator) -> EvalStats:
    """``stats`` released in the coarse bins with Gaussian noise (as client/dp/held_out.py)."""
    layout = coarse_layout()
    cells = np.unique(layout)
    out = []
    for counts in (stats.positives, stats.negatives):
        coarse = np.zeros_like(counts)
        for j in range(len(counts)):
            np.add.at(coarse[j], layout, counts[j])
        coarse[:, cells] += rng.normal(0.0, std, (len(counts), len(cells)))
        out.append(coarse)
    return dataclasses.replace(
        stats,
        examples=stats.examples + rng.normal(0.0, std),
        positives=out[0],
        negatives=out[1],
        noised=1.0,
        noise_variance=std**2,
    )


def fake_run(
    root: Path,
    separations: Sequence[float | None],
    overrides: dict[str, object] | None = None,
    hospitals: int = 3,
    pooled: int | Sequence[int] | None = None,
    noise_std: float = 0.0,
) -> RunConfig:
    """A completed simulated run of rounds 0..len-1; round r evaluated at ``separations[r]``.

    A separation of None leaves that round without a pooled evaluation; ``pooled``
    hospitals' statistics are in each sum (one number, or one per round; default: all).
    ``noise_std``: the hospitals release them noised (round_stats), and report a held-out
    epsilon.
    """
    config = {"num-rounds": len(separations) - 1, "output-dir": str(root), **(overrides or {})}
    run = RunConfig.from_run_config(config)
    model = initial_model(run.model, run.seed)
    store = RunStore(root)
    store.start(run.to_run_config(), base_fingerprint(model))
    generator = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in shared_state(model).items()}
    for r, separation in enumerate(separations):
        if r:
            state = {
                k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in state.items()
            }
        names = [f"hospital-{i}" for i in range(hospitals)]
        record = RoundRecord(
            round=r,
            train_loss=None,
            eval_loss=None,
            eval_auroc=None,
            eval_metrics={},
            hospitals=[
                HospitalRound(
                    hospital=name,
                    node_id=i,
                    status="trained" if r else "evaluated",
                    epsilon=float(r) + i / 10 if r else None,
                    max_epsilon=8.0,
                    delta=1e-5 if i == 0 else 1e-6,
                    held_out_epsilon=r / 4 if noise_std else None,
                    privacy_unit="patient",
                    max_held_out_epsilon=4.0 if noise_std else None,
                )
                for i, name in enumerate(names)
            ],
            seconds=1.0,
        )
        store.save_round(record, state)
        if separation is not None:
            count = pooled[r] if isinstance(pooled, Sequence) else pooled
            stats = round_stats(
                run.model.labels,
                separation,
                seed=r,
                hospitals=count or hospitals,
                noise_std=noise_std,
            )
            store.save_evaluation(r, stats)
    store.finish("completed", state)
    (root / "simulation.json").write_text(json.dumps({"hospitals": hospitals}), "utf-8")
    return run
