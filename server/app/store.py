"""The coordinator's run directory: global model checkpoints and the metrics log.

Layout (one directory per run, all written atomically)::

    <output-dir>/
      run.json                          config, status, start/end time, error if any,
                                        and every attempt (a restart resumes the run)
      metrics.json                      one record per completed round
      evaluation.json                   per round, the summed held-out statistics
      checkpoints/round-0001.safetensors  global model after round 1 (metadata: round)
      checkpoints/round-0001.server-optimizer.safetensors  server momentum after round 1
                                        (only with server.momentum or learning-rate set)
      checkpoints/latest.json           {"round": k, "file": ...}: the resume point
      global_model.safetensors          the final model (exported when the run completes)
      best.json, best_model.safetensors the best trained round so far (server/app/best.py)
      .lock                             held by the server process writing the run

Weights are stored with safetensors, never pickled. A round is complete once its record
is in metrics.json; its checkpoint is written first. A server killed at any moment
(``kill -9``) therefore leaves a directory from which ``RunStore.begin`` resumes after
the last complete round, with that round's model and the metrics history before it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from server.app.best import refresh_best
from server.app.run_files import RunDirError, read_run_file
from shared_model.evaluation import EvalStats
from shared_model.files import write_atomic, write_json_atomic
from shared_model.server_optimizer import OptimizerStateError, ServerOptimizer

__all__ = [
    "HospitalRound",
    "ResumePoint",
    "RoundRecord",
    "RunDirError",
    "RunFinishedError",
    "RunStore",
    "evaluation_fields",
    "fitting_state",
    "read_run_file",
    "restore_optimizer",
]

EVALUATION_FILE = "evaluation.json"
FINISHED = ("completed", "stopped-early")  # run.json statuses a restart does not resume


class RunFinishedError(RunDirError):
    """The output directory holds a finished run: it is never resumed or overwritten."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a restarted run continues: after ``round``, from that round's global model."""

    round: int
    state: dict[str, torch.Tensor]
    attempt: int  # 2 for the first restart
    # the server optimizer's state after that round (momentum); empty for plain FedAvg
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class HospitalRound:
    """What one hospital did in one round, as the server saw it."""

    hospital: str
    node_id: int
    status: str  # trained | declined | failed | rejected (its update refused) | evaluated
    num_examples: int = 0
    train_loss: float | None = None
    epsilon: float | None = None  # cumulative, reported by the hospital
    max_epsilon: float | None = None
    delta: float | None = None  # the delta its epsilon is stated for (its own policy)
    # its held-out records' cumulative epsilon and cap (None: it released exact statistics)
    held_out_epsilon: float | None = None
    max_held_out_epsilon: float | None = None
    privacy_unit: str | None = None  # whom its epsilon protects: patient or record
    eval_loss: float | None = None
    eval_auroc: float | None = None
    reason: str = ""
    noise_multiplier: float | None = None  # the DP-SGD parameters it reported (public)
    sample_rate: float | None = None
    steps: int | None = None
    bytes_up: int = 0  # serialized bytes this hospital sent in the round (all messages)
    bytes_down: int = 0  # serialized bytes the server sent it
    key_bytes_up: int = 0  # of bytes_up: SecAgg+ key material (keys, shares), no update


@dataclass
class RoundRecord:
    """One completed round: global metrics and each hospital's part in it."""

    round: int
    train_loss: float | None
    eval_loss: float | None
    eval_auroc: float | None
    eval_metrics: dict[str, float]
    hospitals: list[HospitalRound]
    seconds: float
    failures: int = 0
    declined: int = 0
    eval_failures: int = 0
    rejected: int = 0  # updates the server refused (server/app/validation.py)
    skipped: bool = False  # too few updates (server.min-update-fraction): model unchanged
    secagg_shares: int | None = None  # SecAgg+ rounds: key shares and threshold used
    secagg_threshold: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN and infinity become null)."""
        return _finite(asdict(self))


def evaluation_fields(metrics: dict[str, float]) -> dict[str, Any]:
    """A round record's evaluation fields from global held-out metrics."""
    return {
        "eval_loss": metrics.get("loss"),
        "eval_auroc": metrics.get("auroc"),
        "eval_metrics": dict(metrics),
    }


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@dataclass
class RunStore:
    """Reads and writes one run's directory."""

    root: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)
    _lock: Any = field(default=None, repr=False)

    @property
    def checkpoints(self) -> Path:
        """Directory of per-round global model checkpoints."""
        return self.root / "checkpoints"

    def begin(self, run_config: dict[str, Any], base_hash: str = "") -> ResumePoint | None:
        """Start a new run here, or resume the unfinished one; None means start afresh.

        A run that completed no round starts again from round 0, its earlier attempt
        kept in run.json. What may be resumed is ``unfinished``'s decision.
        """
        self.lock()
        info = self.unfinished(run_config, base_hash)
        if info is None:
            self.start(run_config, base_hash)
            return None
        status = info.get("status")
        point = self._resume_point(len(info.get("attempts", [])) + 2)
        attempts = info.get("attempts", [])
        attempts.append(
            {
                "started": time.time(),
                "after_status": status,
                "after_error": info.get("error", ""),
                "resumed_after_round": None if point is None else point.round,
            }
        )
        info.update({"status": "running", "attempts": attempts})
        for key in ("finished", "error", "rounds_completed"):
            info.pop(key, None)
        write_json_atomic(self.root / "run.json", info)
        return point

    def unfinished(self, run_config: dict[str, Any], base_hash: str = "") -> dict[str, Any] | None:
        """The run.json of the run here that a restart resumes; None if there is none.

        A run whose run.json says ``running`` (its server was killed) or ``failed`` is
        resumed after its last complete round, if the configuration and frozen weights
        are the same; otherwise RunDirError names what differs. A run that finished is
        never overwritten. Read-only.
        """
        info = self._read_json("run.json")
        if info is None:
            return None
        status = info.get("status")
        if status in FINISHED:
            raise RunFinishedError(
                f"{self.root} holds a run that already {status} ({info.get('rounds_completed')} "
                "rounds): choose a new output-dir (with hospitals' ledgers kept in their "
                "hospital.state-dir, so their privacy budgets carry over)"
            )
        old = info.get("config", {})
        changed = sorted(
            k for k in old.keys() | run_config.keys() if old.get(k) != run_config.get(k)
        )
        if changed:
            shown = ", ".join(f"{k} ({old.get(k)!r} -> {run_config.get(k)!r})" for k in changed)
            raise RunDirError(
                f"{self.root} holds an unfinished run with other settings, so it cannot be "
                f"resumed: {shown}. Restart with the same settings, or choose a new output-dir"
            )
        if info.get("base_hash", "") != base_hash:
            raise RunDirError(
                f"{self.root} holds an unfinished run over other frozen weights (sha256 "
                f"{str(info.get('base_hash'))[:12]}, now {base_hash[:12]}): the pretrained "
                "files changed, so it cannot be resumed"
            )
        return info

    def _resume_point(self, attempt: int) -> ResumePoint | None:
        """The last round whose record and checkpoint both exist; drops anything later."""
        metrics = self._read_json("metrics.json") or {"rounds": []}
        kept: list[dict[str, Any]] = []
        for record in metrics.get("rounds", []):
            if not self._checkpoint(int(record["round"])).exists():
                break
            kept.append(record)
        self.rounds = kept
        write_json_atomic(self.root / "metrics.json", {"rounds": kept})
        self._refresh_best()
        if not kept:
            (self.checkpoints / "latest.json").unlink(missing_ok=True)
            return None
        last = int(kept[-1]["round"])
        path = self._checkpoint(last)
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise RunDirError(
                f"checkpoint {path} of the last complete round cannot be read ({err}): "
                "restore it from a backup or choose a new output-dir"
            ) from err
        optimizer_path = self._optimizer_checkpoint(last)
        optimizer = load_file(str(optimizer_path)) if optimizer_path.exists() else {}
        write_json_atomic(self.checkpoints / "latest.json", {"round": last, "file": path.name})
        return ResumePoint(round=last, state=state, attempt=attempt, optimizer=optimizer)

    def _checkpoint(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:04d}.safetensors"

    def _optimizer_checkpoint(self, server_round: int) -> Path:
        return self.checkpoints / f"round-{server_round:04d}.server-optimizer.safetensors"

    def _read_json(self, name: str) -> dict[str, Any] | None:
        return read_run_file(self.root / name)

    def lock(self, wait: float = 30.0) -> None:
        """Hold this run's lock for the life of the process; refuse if another holds it.

        Two server processes writing one run would interleave its rounds. The kernel
        drops the lock when its process dies, ``kill -9`` included; a server process
        orphaned by a killed SuperLink exits within seconds, so this waits ``wait``
        seconds before refusing.
        """
        if self._lock is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        handle = (self.root / ".lock").open("a+", encoding="utf-8")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise RunDirError(
                    f"{self.root} is in use by another server process (pid {holder}): stop "
                    "it before restarting the run"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def start(self, run_config: dict[str, Any], base_hash: str = "") -> None:
        """Record that the run started, with its full configuration.

        ``base_hash`` identifies the frozen weights, which checkpoints leave out: a
        checkpoint holds the trainable parameters only (server.commands.export checks it).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            self.root / "run.json",
            {
                "status": "running",
                "started": time.time(),
                "config": run_config,
                "base_hash": base_hash,
            },
        )
        write_json_atomic(self.root / "metrics.json", {"rounds": []})

    def save_round(
        self,
        record: RoundRecord,
        state_dict: dict[str, torch.Tensor],
        optimizer: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Checkpoint the global model after a round, then append the round's metrics.

        ``optimizer``: the server optimizer's state after the round (momentum), kept
        beside the model so that a resumed run steps on as an uninterrupted one would.
        """
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if optimizer:
            self._write(self._optimizer_checkpoint(record.round), optimizer, record.round)
        path = self._checkpoint(record.round)
        name = path.name
        self._write(path, state_dict, record.round)
        self.rounds.append(record.to_dict())
        write_json_atomic(self.root / "metrics.json", {"rounds": self.rounds})
        write_json_atomic(self.checkpoints / "latest.json", {"round": record.round, "file": name})
        self._refresh_best()
        return self.checkpoints / name

    def save_evaluation(self, server_round: int, stats: EvalStats) -> None:
        """Keep the summed held-out statistics of the model after ``server_round``.

        ``evaluation.json`` maps each round to the statistics vector (the score
        histograms the report's ROC curves and decision thresholds are computed from).
        """
        data = self._read_json(EVALUATION_FILE) or {"labels": list(stats.labels), "rounds": {}}
        data["rounds"][str(server_round)] = [float(v) for v in stats.to_vector()]
        write_json_atomic(self.root / EVALUATION_FILE, data)
        self._refresh_best()

    def _refresh_best(self) -> None:
        """Keep best.json and best_model.safetensors on the best complete round."""
        config = (self._read_json("run.json") or {}).get("config", {})
        refresh_best(
            self.root,
            self._checkpoint,
            {int(r["round"]) for r in self.rounds},
            str(config.get("data.holdout", "test")),
        )

    def amend_evaluation(self, server_round: int, metrics: dict[str, float]) -> None:
        """Add the global evaluation of the model after ``server_round`` to its record.

        Under SecAgg+ a model's evaluation arrives with the next round's upload, after
        its round was recorded.
        """
        for record in self.rounds:
            if int(record["round"]) == server_round:
                record.update(_finite(evaluation_fields(metrics)))
                write_json_atomic(self.root / "metrics.json", {"rounds": self.rounds})
                return
        raise RunDirError(f"no record of round {server_round} in {self.root} to add its evaluation")

    def _write(self, path: Path, tensors: dict[str, torch.Tensor], server_round: int) -> None:
        """Write ``tensors`` to ``path`` atomically, on disk before this returns."""
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        metadata = {"round": str(server_round)}
        # mode=None: model files keep the umask's permissions, as before (not 0600)
        write_atomic(path, lambda tmp: save_file(contiguous, str(tmp), metadata), mode=None)

    def latest_checkpoint(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The last completed round and its global model, or None."""
        pointer = self.checkpoints / "latest.json"
        if not pointer.exists():
            return None
        latest = json.loads(pointer.read_text(encoding="utf-8"))
        return int(latest["round"]), load_file(str(self.checkpoints / latest["file"]))

    def note_retry(self, server_round: int, reason: str) -> None:
        """Record in run.json that a round ended short and is being tried again."""
        info = self._read_json("run.json") or {}
        info.setdefault("retried_rounds", []).append(
            {"round": server_round, "at": time.time(), "reason": reason}
        )
        write_json_atomic(self.root / "run.json", info)

    def finish(
        self, status: str, state_dict: dict[str, torch.Tensor] | None = None, error: str = ""
    ) -> None:
        """Export the final model (if any) and record how the run ended."""
        if state_dict is not None:
            contiguous = {k: v.contiguous() for k, v in state_dict.items()}
            metadata = {"rounds": str(len(self.rounds))}
            write_atomic(
                self.root / "global_model.safetensors",
                lambda tmp: save_file(contiguous, str(tmp), metadata),
                mode=None,
            )
        info = json.loads((self.root / "run.json").read_text(encoding="utf-8"))
        info.update(
            {
                "status": status,
                "finished": time.time(),
                "error": error,
                "rounds_completed": len(self.rounds),
            }
        )
        write_json_atomic(self.root / "run.json", info)
        self.release()

    def release(self) -> None:
        """Let another server process write this run (done by ``finish``, or by dying)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def fitting_state(
    saved: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], root: Path
) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, refused unless they fit the model this run builds."""
    mismatch = [k for k in fresh if k not in saved or saved[k].shape != fresh[k].shape] + [
        k for k in saved if k not in fresh
    ]
    if mismatch:
        raise RunDirError(
            f"the checkpoint in {root} does not fit this model ({len(mismatch)} tensors differ, "
            f"e.g. {mismatch[0]}): it was written by another fedfusion version"
        )
    return {k: saved[k].to(fresh[k].dtype) for k in fresh}


def restore_optimizer(
    optimizer: ServerOptimizer, saved: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> None:
    """Give ``optimizer`` a checkpoint's velocity; RunDirError unless it fits ``state``.

    The error every unresumable checkpoint raises (as :func:`fitting_state` for its
    weights), so the server reports it as a run it cannot continue.
    """
    try:
        optimizer.restore(saved, state)
    except OptimizerStateError as err:
        raise RunDirError(str(err)) from err
