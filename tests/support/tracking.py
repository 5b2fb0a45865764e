"""Read a run back from the MLflow store it was logged to, through MLflow's own API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from server.app.tracking import TRACKING_FILE

__all__ = ["TrackedRun", "read_tracked_run"]


@dataclass
class TrackedRun:
    """What MLflow holds of one fedfusion run."""

    uri: str
    run_id: str
    status: str
    name: str
    params: dict[str, str]
    tags: dict[str, str]
    history: dict[str, list[tuple[int, float]]]  # metric -> [(step, value)] in step order
    artifacts: dict[str, int]  # path -> size in bytes
    runs_in_experiment: int


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> dict[str, int]:
    found: dict[str, int] = {}
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found.update(_artifacts(client, run_id, item.path))
        else:
            found[item.path] = int(item.file_size or 0)
    return found


def read_tracked_run(run_dir: Path, uri: str = "") -> TrackedRun:
    """The MLflow run that ``run_dir/tracking.json`` names, read through MlflowClient.

    ``uri`` reads it from another address of the same store (a container's store, mounted
    here), instead of the one recorded.
    """
    info: dict[str, Any] = json.loads((Path(run_dir) / TRACKING_FILE).read_text("utf-8"))
    uri = uri or info["uri"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(info["run_id"])
    history = {
        name: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        for name in run.data.metrics
    }
    return TrackedRun(
        uri=uri,
        run_id=run.info.run_id,
        status=run.info.status,
        name=run.info.run_name,
        params=dict(run.data.params),
        tags=dict(run.data.tags),
        history=history,
        artifacts=_artifacts(client, run.info.run_id),
        runs_in_experiment=len(client.search_runs([run.info.experiment_id])),
    )
