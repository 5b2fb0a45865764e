"""The coordinator's run directory: global model checkpoints and the metrics log.

Layout (one directory per run, all written atomically)::

    <output-dir>/
      run.json                          config, status, start/end time, error if any
      metrics.json                      one record per completed round
      checkpoints/round-0001.safetensors  global model after round 1 (metadata: round)
      checkpoints/latest.json           {"round": k, "file": ...}: the resume point
      global_model.safetensors          the final model (exported when the run completes)

Weights are stored with safetensors, never pickled.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["HospitalRound", "RoundRecord", "RunStore", "write_json_atomic"]


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
    rejected: int = 0  # updates the server refused (server/validation.py)
    skipped: bool = False  # too few updates (server.min-update-fraction): model unchanged
    secagg_shares: int | None = None  # SecAgg+ rounds: key shares and threshold used
    secagg_threshold: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN and infinity become null)."""
        return _finite(asdict(self))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@dataclass
class RunStore:
    """Reads and writes one run's directory."""

    root: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def checkpoints(self) -> Path:
        """Directory of per-round global model checkpoints."""
        return self.root / "checkpoints"

    def start(self, run_config: dict[str, Any], base_hash: str = "") -> None:
        """Record that the run started, with its full configuration.

        ``base_hash`` identifies the frozen weights, which checkpoints leave out: a
        checkpoint holds the trainable parameters only (server.audit.load_run_model).
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

    def save_round(self, record: RoundRecord, state_dict: dict[str, torch.Tensor]) -> Path:
        """Checkpoint the global model after a round, then append the round's metrics."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        name = f"round-{record.round:04d}.safetensors"
        tmp = self.checkpoints / f".{name}.tmp"
        save_file(
            {k: v.contiguous() for k, v in state_dict.items()},
            str(tmp),
            metadata={"round": str(record.round)},
        )
        tmp.replace(self.checkpoints / name)
        self.rounds.append(record.to_dict())
        write_json_atomic(self.root / "metrics.json", {"rounds": self.rounds})
        write_json_atomic(self.checkpoints / "latest.json", {"round": record.round, "file": name})
        return self.checkpoints / name

    def latest_checkpoint(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The last completed round and its global model, or None."""
        pointer = self.checkpoints / "latest.json"
        if not pointer.exists():
            return None
        latest = json.loads(pointer.read_text(encoding="utf-8"))
        return int(latest["round"]), load_file(str(self.checkpoints / latest["file"]))

    def finish(
        self, status: str, state_dict: dict[str, torch.Tensor] | None = None, error: str = ""
    ) -> None:
        """Export the final model (if any) and record how the run ended."""
        if state_dict is not None:
            save_file(
                {k: v.contiguous() for k, v in state_dict.items()},
                str(self.root / "global_model.safetensors"),
                metadata={"rounds": str(len(self.rounds))},
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
