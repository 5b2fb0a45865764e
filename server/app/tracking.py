"""Experiment tracking: every run the coordinator drives, logged to MLflow.

Researchers compare many runs; MLflow lets them do it in its UI or through its API.
What goes to the tracking store is only what the run directory already holds: the run's
config (parameters); per round, the global held-out metrics, the round's bookkeeping and
each hospital's reported cumulative epsilon (``metrics.json``); at the end, the report,
its plots, metrics.json, evaluation.json and the final and best models (artifacts).

Hospitals log nothing here. Where to track is a fact of the coordinator's process, the
environment the fedfusion commands start the Flower processes with
(:func:`tracking_env`), never part of the run config that travels to every hospital:
a tracking URI may carry credentials.

The default store needs no server: ``sqlite:///<the run's parent>/mlflow.db``, its
artifacts beside it in ``mlartifacts/``. ``<run>/tracking.json`` keeps the MLflow run id
and which rounds were logged, so a resumed run continues its MLflow run and logs the
rounds a killed server had saved but not yet logged, each once.

Tracking never fails a federation: the first error is logged as a warning and the run
goes on untracked.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from flwr.common.logger import log

from server.app.best import BEST_FILE, BEST_MODEL
from server.app.run_files import read_run_file
from shared_model.files import write_json_atomic

__all__ = [
    "EXPERIMENT_ENV",
    "TRACKING_ENV",
    "TRACKING_FILE",
    "RunTracker",
    "TrackingSettings",
    "default_store",
    "tracking_env",
]

TRACKING_ENV = "FEDFUSION_TRACKING_URI"  # a URI, "" for the default store, "off" for none
EXPERIMENT_ENV = "FEDFUSION_TRACKING_EXPERIMENT"
TRACKING_FILE = "tracking.json"
DEFAULT_EXPERIMENT = "fedfusion"
OFF = "off"
ARTIFACTS = ("report.md", "metrics.json", "evaluation.json", "run-config.toml", BEST_FILE)
MODELS = ("global_model.safetensors", BEST_MODEL)
# MLflow's defaults retry an unreachable server for minutes; a federation waits on it.
# So these are set before MLflow is first imported, which is late: inside the functions
# that use it, as MLflow takes seconds to import and most runs' commands never need it.
_MLFLOW_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def default_store(run_dir: Path) -> str:
    """The tracking URI of the store beside the run: ``<parent>/mlflow.db``."""
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def tracking_env(uri: str = "", experiment: str = "", enabled: bool = True) -> dict[str, str]:
    """Environment for the coordinator's Flower processes that sets where runs are logged."""
    return {
        TRACKING_ENV: uri if enabled else OFF,
        EXPERIMENT_ENV: experiment or DEFAULT_EXPERIMENT,
        **{k: os.environ.get(k, v) for k, v in _MLFLOW_DEFAULTS.items()},
    }


@dataclass(frozen=True)
class TrackingSettings:
    """Where one run is logged: a tracking URI and an experiment name."""

    uri: str
    experiment: str
    # the artifact location of an experiment fedfusion creates; "": the tracking server's
    artifacts: str

    @classmethod
    def from_env(cls, run_dir: Path, env: dict[str, str] | None = None) -> TrackingSettings | None:
        """The settings the command put in the environment; None when tracking is off.

        No variable at all (a Flower app started by hand) means the default store.
        """
        env = dict(os.environ if env is None else env)
        uri = env.get(TRACKING_ENV, "").strip()
        if uri.lower() == OFF:
            return None
        experiment = env.get(EXPERIMENT_ENV, "").strip() or DEFAULT_EXPERIMENT
        if not uri:
            uri = default_store(run_dir)
        local = _local_store(uri)
        # A local store keeps its artifacts beside it (MLflow's default is ./mlruns in the
        # server's working directory); a tracking server decides for itself.
        return cls(uri, experiment, (local.parent / "mlartifacts").as_uri() if local else "")


def _local_store(uri: str) -> Path | None:
    """The file of a SQLite tracking URI, or None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def redact(uri: str) -> str:
    """``uri`` fit to print: a user name, password or query string replaced by ``***``."""
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" not in netloc and not parts.query:
        return uri  # (urlunsplit would also drop the empty host of sqlite:////path)
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else ""))


_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")
_HOSPITAL = re.compile(r"[^A-Za-z0-9_\-]")


def metric_name(text: str) -> str:
    """``text`` as an MLflow metric name (letters, digits, ``_-. /``; others become _)."""
    return _NAME.sub("_", text)[:250]


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A round record's training side: loss, bookkeeping, each hospital's epsilons.

    A hospital names itself: the name is reduced to a plain word, an empty one becomes
    its node id, and two hospitals whose names collide both get their node ids.
    """
    hospitals = record.get("hospitals", [])
    out: dict[str, float] = {
        "round/seconds": record.get("seconds"),
        "round/hospitals-trained": sum(h.get("status") == "trained" for h in hospitals),
        "round/failures": record.get("failures", 0),
        "round/declined": record.get("declined", 0),
        "round/rejected": record.get("rejected", 0),
        "round/skipped": float(bool(record.get("skipped"))),
        "train/loss": record.get("train_loss"),
    }
    for key, h in zip(_hospital_keys(hospitals), hospitals, strict=True):
        out[f"epsilon/{key}"] = h.get("epsilon")
        out[f"held-out-epsilon/{key}"] = h.get("held_out_epsilon")
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float)}


def privacy_units(rounds: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Per hospital metric key, whom its epsilon protects (patient or record), as last said."""
    out = {}
    for record in rounds:
        hospitals = record.get("hospitals", [])
        for key, h in zip(_hospital_keys(hospitals), hospitals, strict=True):
            if h.get("privacy_unit"):
                out[key] = str(h["privacy_unit"])
    return out


def _hospital_keys(hospitals: list[dict[str, Any]]) -> list[str]:
    """Each hospital's name as a metric-name word, unique: its node id where needed."""
    keys = [_HOSPITAL.sub("_", str(h.get("hospital", "")))[:100] for h in hospitals]
    unique = []
    for key, h in zip(keys, hospitals, strict=True):
        node = f"node-{h.get('node_id')}"
        if not key.strip("_"):
            key = node
        elif keys.count(key) > 1:
            key = f"{key}-{node}"
        unique.append(key)
    return unique


def evaluation_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A round record's global held-out metrics (``eval/auroc`` is the macro AUROC)."""
    values = record.get("eval_metrics") or {}
    return {
        metric_name(f"eval/{k}"): float(v) for k, v in values.items() if isinstance(v, int | float)
    }


class RunTracker:
    """Logs one run directory's records to MLflow, idempotently, across restarts."""

    def __init__(
        self,
        settings: TrackingSettings,
        run_dir: Path,
        client_factory: Callable[[str], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.run_dir = Path(run_dir)
        self._factory = client_factory
        self._client: Any = None
        self.run_id = ""
        self._logged: dict[str, set[int]] = {"train": set(), "eval": set()}
        self.failed = ""  # why tracking stopped, once it did

    @property
    def active(self) -> bool:
        """Whether the run is being logged (started, and no error since)."""
        return bool(self.run_id) and not self.failed

    def _stop(self, what: str, err: Exception) -> None:
        first = (str(err).splitlines() or [""])[0][:300]
        self.failed = f"{what}: {type(err).__name__}" + (f": {first}" if first else "")
        log(
            WARNING,
            "[fedfusion] experiment tracking (%s) stopped, the run goes on untracked: %s",
            redact(self.settings.uri),
            self.failed,
        )

    def start(self, config: dict[str, Any], tags: dict[str, str]) -> None:
        """Open the run's MLflow run: a new one with the config, or the one it had."""
        try:
            self._start(config, tags)
            _private(_local_store(self.settings.uri), self.settings.artifacts)
        except Exception as err:  # tracking must never stop a federation
            self._stop("start", err)

    def _start(self, config: dict[str, Any], tags: dict[str, str]) -> None:
        for key, value in _MLFLOW_DEFAULTS.items():  # before MLflow is imported
            os.environ.setdefault(key, value)
        from mlflow.entities import Param, RunStatus  # late: see _MLFLOW_DEFAULTS

        factory = self._factory or _mlflow_client
        self._client = factory(self.settings.uri)
        known = read_run_file(self.run_dir / TRACKING_FILE) or {}
        if known.get("run_id") and known.get("uri_sha256") == _digest(self.settings.uri):
            self.run_id = str(known["run_id"])
            self._logged = {k: set(known.get(k, [])) for k in self._logged}
            self._client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return
        experiment = self._client.get_experiment_by_name(self.settings.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = self._client.create_experiment(
                self.settings.experiment, artifact_location=self.settings.artifacts or None
            )
        run = self._client.create_run(experiment_id, run_name=self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(config.items())]
        self._client.log_batch(self.run_id, params=params)
        self._save()

    def _save(self) -> None:
        """Record the MLflow run and the rounds logged in ``tracking.json``."""
        write_json_atomic(
            self.run_dir / TRACKING_FILE,
            {
                "uri": redact(self.settings.uri),  # credentials never on disk here
                "uri_sha256": _digest(self.settings.uri),
                "experiment": self.settings.experiment,
                "run_id": self.run_id,
                **{kind: sorted(steps) for kind, steps in self._logged.items()},
            },
        )

    def sync(self, rounds: Iterable[dict[str, Any]]) -> None:
        """Log what the round records hold that is not logged yet (step = round)."""
        if not self.active:
            return
        try:
            self._sync(list(rounds))
        except Exception as err:  # tracking must never stop a federation
            self._stop("logging a round", err)

    def _sync(self, rounds: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric  # late: see _MLFLOW_DEFAULTS

        now = int(time.time() * 1000)
        batch: list[Metric] = []
        for record in rounds:
            step = int(record["round"])
            for kind, values in (
                ("train", round_metrics(record)),
                ("eval", evaluation_metrics(record)),
            ):
                if step in self._logged[kind] or (kind == "train" and step == 0):
                    continue
                if kind == "eval" and not values:
                    continue  # evaluated later (SecAgg+ rounds): logged once it is
                batch += [Metric(k, v, now, step) for k, v in sorted(values.items())]
                self._logged[kind].add(step)
        if not batch:
            return
        for start in range(0, len(batch), 1000):  # MLflow's limit per batch
            self._client.log_batch(self.run_id, metrics=batch[start : start + 1000])
        for key, unit in privacy_units(rounds).items():  # whom each epsilon/<key> protects
            self._client.set_tag(self.run_id, f"fedfusion.privacy-unit.{key}", unit)
        self._save()

    def finish(self, status: str, rounds: Iterable[dict[str, Any]]) -> None:
        """Log the last rounds, the report, plots, metrics files and models; close the run."""
        self.sync(rounds)
        if not self.active:
            return
        try:
            self._finish(status)
        except Exception as err:  # tracking must never stop a federation
            self._stop("closing the run", err)

    def _finish(self, status: str) -> None:
        from mlflow.entities import RunStatus  # late: see _MLFLOW_DEFAULTS

        root = self.run_dir
        for name in ARTIFACTS:
            if (root / name).is_file():
                self._client.log_artifact(self.run_id, str(root / name))
        for plot in sorted(root.glob("*.png")):
            self._client.log_artifact(self.run_id, str(plot), "plots")
        for name in MODELS:
            if (root / name).is_file():
                self._client.log_artifact(self.run_id, str(root / name), "model")
        best = read_run_file(root / BEST_FILE)
        if best and isinstance(best.get("value"), int | float):
            self._client.set_tag(self.run_id, "fedfusion.best-round", str(best["round"]))
            self._client.log_metric(self.run_id, "best/auroc", float(best["value"]))
        self._client.set_tag(self.run_id, "fedfusion.status", status)
        final = RunStatus.FAILED if status == "failed" else RunStatus.FINISHED
        self._client.set_terminated(self.run_id, RunStatus.to_string(final))


def _digest(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()


def _private(store: Path | None, artifacts: str) -> None:
    """A local store and its artifacts readable by this user only (0600 / 0700)."""
    if store is not None and store.exists():
        store.chmod(0o600)
    if artifacts.startswith("file://"):
        folder = Path(artifacts.removeprefix("file://"))
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.chmod(0o700)


def _mlflow_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient  # late: see _MLFLOW_DEFAULTS

    return MlflowClient(tracking_uri=uri)
