"""What the hospitals' defence against a lying server costs a SecAgg+ round, side by side.

Two protocols run in this process, alternately, on the same hospitals, through the
ServerApp's real SecAgg+ driver and the hospitals' real mods (``tests/support/
loop_grid.py`` delivers every message by calling the hospital's ClientApp):

- **before**: Flower's ``SecAggPlusWorkflow`` with hospitals that check the SecAgg+
  parameters only (the hospital code before signed keys: ``TODAYS_HOSPITAL`` in
  ``tests/support/hostile_server.py``);
- **signed**: ``SignedSecAggPlusWorkflow`` with the hospital code now (signed key
  advertisements, the consistency round, signed survivor sets).

``full``: 3 simulated hospitals train the default model on the embedded data (DP on),
so the round time is what a user waits for; round 1 (data loading) is left out.
``protocol``: hospitals upload vectors of the default model's size without training,
so the time is the protocol alone (key agreement, sharing, masking, signatures,
unmasking), at 3, 10 and 50 hospitals. Bytes are metered per hospital and round by the
ServerApp's own meter (``server/app/grid.py``).

``python -m benchmarks.secagg_protocol sparse 100,1000`` measures the protocol alone at
those sizes (:func:`run_sparse_protocol_bench`; ``benchmarks/results/secagg-sparse.*``).
``python -m benchmarks.secagg_protocol`` prints what sparse shares keep and give up
(:func:`margins`), computed, not measured: for n hospitals sampled, the server's
sparse plan (secagg.sparse) shares each key with k hospitals (k = n up to 7, then
2 * ceil(log2 n) + 1) with threshold t, on Flower's neighbour graph (the hospitals in a
random order, each a neighbour of the (k - 1) / 2 on either side); beside it the
complete graph (k = n). Against a server that follows the protocol, colluding with c
hospitals, with hospitals dropping out at random: ``exposed``, the chance that one
honest hospital's upload can be unmasked alone (at least t of its k - 1 neighbours
collude; an exact hypergeometric tail); ``split``, the chance that the honest
hospitals' sum comes apart (their part of the graph is disconnected; simulated);
``round_fails``, the chance that some hospital keeps fewer than t surviving in its
neighbourhood (simulated). None of it holds against a server that lies: it chooses
the graph (docs/privacy.md).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.clientapp import ClientApp
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.supercore.task_identity import TaskIdentity
from scipy.stats import hypergeom

from benchmarks.report import Echo, Measurement, table, write_results
from client.app import handlers
from shared_model.config import RunConfig, SecAggConfig
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import WeightLayout
from shared_model.weights import base_fingerprint, initial_model, shared_state
from tests.support.hostile_server import NOW, TODAYS_HOSPITAL
from tests.support.loop_grid import loop_federation, secagg_round

__all__ = [
    "exposed",
    "margins",
    "round_fails",
    "run_protocol_bench",
    "run_sparse_protocol_bench",
    "split",
]

PROTOCOLS = ("before", "signed")


def _before(settings: dict[str, Any]) -> SecAggPlusWorkflow:
    return SecAggPlusWorkflow(**settings)


def _grid(protocol: str, tmp: Path, nodes: list[int], run: RunConfig, train: bool) -> Any:
    mods = TODAYS_HOSPITAL if protocol == "before" else NOW
    layout = _layout(run)
    codec = UploadCodec(layout.size, run.model.labels, run.secagg.clipping_range, 10_000.0)
    grid = loop_federation(tmp, nodes, _upload(codec, run), codec, layout, mods)
    if train:  # the real handlers: each hospital trains under DP on its embedded share
        app = ClientApp(mods=list(mods))
        app.train()(handlers.train)
        grid.app = app
    return grid


def _layout(run: RunConfig) -> WeightLayout:
    return WeightLayout.of(shared_state(initial_model(run.model, run.seed)))


def _upload(codec: UploadCodec, run: RunConfig) -> Callable[[int, dict], np.ndarray]:
    labels = run.model.labels

    def upload(node: int, config: dict) -> np.ndarray:
        rng = np.random.default_rng(node)
        stats = EvalStats.from_predictions(
            labels, rng.normal(size=(50, len(labels))), rng.random((50, len(labels))) < 0.3,
            rng.random(50),
        )  # fmt: skip
        return codec.encode(rng.normal(scale=0.001, size=codec.params), 0.1, 0.5, stats)

    return upload


def _measure(
    kind: str,
    hospitals: int,
    rounds: int,
    warm_up: int,
    echo: Echo,
    protocols: Sequence[str] = PROTOCOLS,
    overrides: dict[str, Any] | None = None,
) -> list[Measurement]:
    train = kind == "full"
    seconds: dict[str, list[float]] = {p: [] for p in protocols}
    up: dict[str, list[float]] = {p: [] for p in protocols}
    key_up: dict[str, list[float]] = {p: [] for p in protocols}
    down: dict[str, list[float]] = {p: [] for p in protocols}
    with tempfile.TemporaryDirectory(prefix="fedfusion-protocol-") as tmp:
        grids, runs = {}, {}
        for p in protocols:
            out = Path(tmp) / p
            runs[p] = RunConfig.from_run_config(
                {**(overrides or {}), "num-rounds": rounds + warm_up, "output-dir": str(out)}
            )
            grids[p] = _grid(p, out, [101 + i for i in range(hospitals)], runs[p], train)
        layout = _layout(runs["signed"])
        base = base_fingerprint(initial_model(runs["signed"].model, runs["signed"].seed))
        for r in range(1, rounds + warm_up + 1):
            for p in protocols if r % 2 else reversed(protocols):  # alternate who goes first
                started = time.perf_counter()
                driver = secagg_round(
                    runs[p],
                    grids[p],
                    layout,
                    r,
                    workflow=_before if p == "before" else None,
                    base_hash=base,
                )
                elapsed = time.perf_counter() - started
                record = driver.strategy.round_record()
                if not driver.strategy.aggregated or record.failures:
                    raise RuntimeError(f"{kind} {p} round {r} did not aggregate every hospital")
                if r > warm_up:
                    seconds[p].append(elapsed)
                    for h in record.hospitals:
                        up[p].append(h.bytes_up)
                        key_up[p].append(h.key_bytes_up)
                        down[p].append(h.bytes_down)
            echo(f"  {kind}, {hospitals} hospitals: round {r}/{rounds + warm_up}")
    cfg = {
        "hospitals": hospitals,
        "rounds": rounds,
        "training": train,
        "in-process": True,
        **(overrides or {}),
    }
    out: list[Measurement] = []
    first: dict[str, Measurement] = {}
    for p in protocols:
        t = Measurement.of(f"secagg-{kind}/round-time/{p}/{hospitals}", cfg, seconds[p], "s")
        u = Measurement.of(f"secagg-{kind}/bytes-up/{p}/{hospitals}", cfg, up[p], "B")
        k = Measurement.of(f"secagg-{kind}/bytes-up-keys/{p}/{hospitals}", cfg, key_up[p], "B")
        d = Measurement.of(f"secagg-{kind}/bytes-down/{p}/{hospitals}", cfg, down[p], "B")
        if p == "before" or "before" not in protocols:
            first = {"t": t, "u": u, "k": k, "d": d}
            out += [t, u, k, d]
        else:
            limit = 1.10 if train else None
            out += [
                t.against(first["t"], limit),
                u.against(first["u"]),
                k.against(first["k"]),
                d.against(first["d"]),
            ]
    return out


def run_sparse_protocol_bench(
    hospital_counts: Sequence[int] = (100, 1000), rounds: int = 2, echo: Echo = print
) -> list[Measurement]:
    """The protocol alone, as hospitals run it now, at federation sizes too large to train.

    The embedded data gives each of at most 386 simulated hospitals its 10 reports, so
    1,000 hospitals are measured here: uploads of the default model's size, the
    server's sparse plan (``secagg.sparse``), in one process.
    """
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1  # as a ServerApp
    try:
        out: list[Measurement] = []
        for n in hospital_counts:  # the sparse plan (simulated hospitals accept it)
            out += _measure(
                "protocol", n, rounds, 0, echo, ("signed",), overrides={"secagg.sparse": True}
            )
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
    return out


def run_protocol_bench(
    hospital_counts: Sequence[int] = (3, 10, 50), full_rounds: int = 3, echo: Echo = print
) -> list[Measurement]:
    """Before vs signed: full rounds at 3 hospitals, the protocol alone at each count."""
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1  # as a ServerApp
    try:
        out = _measure("full", 3, full_rounds, 1, echo)
        for n in hospital_counts:
            out += _measure("protocol", n, 3, 0, echo)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
    return out


MARGIN_SIZES = (3, 10, 100, 1000)
DRAWS = 20_000


def exposed(n: int, k: int, t: int, colluders: int) -> float:
    """Chance that an honest hospital has at least t colluders among its k - 1 neighbours."""
    return float(hypergeom.sf(t - 1, n - 1, colluders, k - 1))


def _gaps(alive: np.ndarray, half: int) -> np.ndarray:
    """Per row, how many gaps wider than ``half`` separate consecutive alive positions."""
    out = np.zeros(len(alive), dtype=int)
    n = alive.shape[1]
    for row, mask in enumerate(alive):
        pos = np.flatnonzero(mask)
        if len(pos) < 2:
            continue
        dist = np.diff(np.append(pos, pos[0] + n))
        out[row] = int((dist > half).sum())
    return out


def split(n: int, k: int, colluders: int, rng: np.random.Generator, draws: int = DRAWS) -> float:
    """Chance that the honest hospitals' part of the graph is disconnected.

    On a ring where each is linked to the (k - 1) / 2 on either side, the honest
    hospitals stay connected unless two runs of at least (k - 1) / 2 colluders cut it.
    """
    if k >= n or colluders == 0:
        return 0.0
    alive = np.ones((draws, n), dtype=bool)
    for row in alive:
        row[rng.choice(n, colluders, replace=False)] = False
    return float((_gaps(alive, (k - 1) // 2) >= 2).mean())


def round_fails(
    n: int, k: int, t: int, dropout: float, rng: np.random.Generator, draws: int = DRAWS
) -> float:
    """Chance that some hospital's neighbourhood (itself included) keeps fewer than t."""
    half = (k - 1) // 2
    fails = 0
    for _ in range(draws // 10):
        alive = rng.random((10, n)) >= dropout
        if k >= n:
            counts = alive.sum(axis=1, keepdims=True)
        else:  # closed neighbourhoods on the ring: a circular window of k
            padded = np.concatenate([alive[:, -half:], alive, alive[:, :half]], axis=1)
            csum = np.concatenate([np.zeros((10, 1), int), np.cumsum(padded, axis=1)], axis=1)
            counts = csum[:, k:] - csum[:, :-k]
        fails += int((counts < t).any(axis=1).sum())
    return fails / (draws // 10 * 10)


def margins(n: int, rng: np.random.Generator) -> dict[str, object]:
    """The sparse and the complete plan at ``n`` hospitals, side by side."""
    k, t = SecAggConfig(sparse=True).resolve(n)
    kc, tc = SecAggConfig(num_shares=n).resolve(n)
    out: dict[str, object] = {"n": n, "sparse": (k, t), "complete": (kc, tc)}
    for label, (kk, tt) in (("sparse", (k, t)), ("complete", (kc, tc))):
        for share in (0.1, 1 / 3):
            c = math.floor(share * n)
            out[f"{label}/exposed/{share:.2f}"] = exposed(n, kk, tt, c)
            out[f"{label}/split/{share:.2f}"] = split(n, kk, c, rng) if n > 3 else 0.0
        for drop in (0.05, 0.1, 0.2):
            out[f"{label}/fails/{drop:.2f}"] = round_fails(n, kk, tt, drop, rng)
        out[f"{label}/tolerated"] = kk - tt  # dropouts any neighbourhood survives
    return out


def print_margins() -> None:
    """Print the figures docs/privacy.md quotes on sparse shares."""
    rng = np.random.default_rng(0)
    for n in MARGIN_SIZES:
        m = margins(n, rng)
        print(n, {key: (f"{v:.2e}" if isinstance(v, float) else v) for key, v in m.items()})


def main(argv: Sequence[str]) -> None:
    """Print the margins, or run the protocol-only bench.

    ``margins`` (the default): print them; ``sparse [SIZES]``: run the protocol alone at
    SIZES (default 100,1000) and write ``benchmarks/results/secagg-sparse.*``.
    """
    if not argv or argv[0] == "margins":
        print_margins()
        return
    sizes = [int(part) for part in (argv[1] if len(argv) > 1 else "100,1000").split(",")]
    measured = run_sparse_protocol_bench(sizes, 1)
    print(table(measured))
    write_results(measured, Path(__file__).parent / "results", "secagg-sparse")


if __name__ == "__main__":
    main(sys.argv[1:])
