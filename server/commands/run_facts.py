"""What a run directory says about its model: settings, rounds, pooled evaluation.

Read by ``fedfusion export`` (server/commands/export.py) and written into the model
card (server/commands/model_card.py); both read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.app.run_files import RunDirError, read_run_file
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.inference.bundle import BundleError

__all__ = ["RunFacts", "read_run", "read_run_json"]


@dataclass(frozen=True, kw_only=True)
class RunFacts:
    """What a run directory says about its model, for the bundle and its card."""

    root: Path
    info: dict[str, Any]  # run.json
    run: RunConfig
    rounds: list[dict[str, Any]]  # metrics.json
    evaluation: dict[str, Any]  # evaluation.json ({} if the run evaluated nothing)
    simulated_hospitals: int | None  # simulation.json: a `fedfusion simulate` run

    def stats(self, server_round: int) -> EvalStats | None:
        """The pooled held-out statistics of the model after ``server_round``, if kept."""
        vector = self.evaluation.get("rounds", {}).get(str(server_round))
        if vector is None:
            return None
        return EvalStats.from_vector(self.evaluation["labels"], vector).rounded()


def read_run_json(path: Path, required: bool = True) -> dict[str, Any]:
    """A run file as a dict ({} if absent and not ``required``); BundleError if unusable."""
    try:
        data = read_run_file(path)
    except RunDirError as err:
        raise BundleError(str(err)) from err
    if data is None and required:
        raise BundleError(f"{path.parent} has no {path.name}: it is not a fedfusion run")
    return data or {}


def read_run(run_dir: Path) -> RunFacts:
    """The run's settings, rounds and pooled evaluation; BundleError if it is not a run."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise BundleError(f"{root} is not a directory (a run directory, e.g. runs/latest)")
    info = read_run_json(root / "run.json")
    sim = read_run_json(root / "simulation.json", required=False)
    return RunFacts(
        root=root,
        info=info,
        run=RunConfig.from_run_config(info.get("config", {})),
        rounds=read_run_json(root / "metrics.json").get("rounds", []),
        evaluation=read_run_json(root / "evaluation.json", required=False),
        simulated_hospitals=sim.get("hospitals"),
    )
