"""The best round so far: the trained global model with the highest held-out macro AUROC.

The server keeps it as the run goes, beside the final model, so that a run stopped
at any point still holds its best model, and ``fedfusion export`` can ship it::

    <output-dir>/best.json                {"round": k, "metric": "auroc", "value": ...}
    <output-dir>/best_model.safetensors   the global model after round k (metadata: round)

The metric is the macro AUROC of the summed held-out statistics (``evaluation.json``),
the federation's own evaluation on the split ``data.holdout`` names: nothing here reads
a hospital's records. Only rounds whose statistics pool at least
:data:`MIN_POOLED_HOSPITALS` hospitals are candidates: with fewer, a metric chosen on
them would say too much about one hospital's records. Round 0 (the initial, untrained
model) is the reference, never the best. Ties keep the earlier round. Both files are
rewritten atomically; the model file is written first and carries its round, so a
reader can check that they agree.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.app.run_files import RunDirError, read_run_file
from shared_model.evaluation import EvalStats
from shared_model.files import write_atomic, write_json_atomic

__all__ = ["BEST_FILE", "BEST_MODEL", "MIN_POOLED_HOSPITALS", "best_round", "refresh_best"]

BEST_FILE = "best.json"
BEST_MODEL = "best_model.safetensors"
METRIC = "auroc"
# Pooled figures are chosen on and published only from the sum of at least this many
# hospitals: with two, a hospital receiving them subtracts its own and reads the other's.
MIN_POOLED_HOSPITALS = 3


def best_round(
    evaluation: dict[str, Any], rounds: set[int], min_hospitals: int = MIN_POOLED_HOSPITALS
) -> tuple[int, float] | None:
    """(round, macro AUROC) of the best of ``rounds`` (>= 1) in ``evaluation.json``'s data.

    Only rounds pooling at least ``min_hospitals`` hospitals count. None when no such
    round has a defined AUROC.
    """
    labels = evaluation.get("labels", [])
    best: tuple[int, float] | None = None
    for key, vector in sorted(evaluation.get("rounds", {}).items(), key=lambda kv: int(kv[0])):
        server_round = int(key)
        if server_round < 1 or server_round not in rounds:
            continue
        stats = EvalStats.from_vector(labels, vector).rounded()
        if not stats.hospitals >= min_hospitals:  # NaN (not recorded) never qualifies
            continue
        value = stats.metrics().get(METRIC, math.nan)
        if math.isfinite(value) and (best is None or value > best[1]):
            best = (server_round, value)
    return best


def refresh_best(
    root: Path, checkpoint: Callable[[int], Path], recorded: set[int], holdout: str
) -> None:
    """Point best.json and best_model.safetensors at the best recorded round.

    ``checkpoint`` gives a round's checkpoint path; ``recorded`` the rounds whose records
    are complete. A round without both an evaluation and a checkpoint is not a candidate
    yet; nothing is rewritten when the best did not change.
    """
    evaluation = read_run_file(root / "evaluation.json")
    if evaluation is None:
        return
    candidates = {r for r in recorded if checkpoint(r).exists()}
    found = best_round(evaluation, candidates)
    try:
        current = read_run_file(root / BEST_FILE)
    except RunDirError:  # damaged: rewritten below
        current = None
    if found is None:
        for name in (BEST_FILE, BEST_MODEL):  # a resumed run dropped the rounds they named
            (root / name).unlink(missing_ok=True)
        return
    server_round, value = found
    if current and current.get("round") == server_round and (root / BEST_MODEL).exists():
        return
    source = checkpoint(server_round)
    # mode=None: the copy keeps the umask's permissions, as the checkpoints do
    write_atomic(root / BEST_MODEL, lambda tmp: shutil.copyfile(source, tmp), mode=None)
    write_json_atomic(
        root / BEST_FILE,
        {"round": server_round, "metric": METRIC, "value": value, "split": holdout},
    )
