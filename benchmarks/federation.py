"""``make bench``: what secure aggregation, scale and a deployment cost; the audit runs.

The DP step suite lives in ``benchmarks/dp.py`` and utility in ``benchmarks/utility.py``;
this module holds the federation suites (SecAgg+ and deployment at 3 hospitals, 10/50/100
simulated hospitals, time to first result, bytes per encoder mode) and the audit.

Every figure comes from real runs on this machine, in one sitting, side by side: plain
and SecAgg+ federations of the same hospitals on the same data, simulated and deployed
on loopback with TLS. A round's time is the server's wall time for it (training,
aggregation, evaluation); bytes are what each hospital sent and received, metered
message by message (``server/app/grid.py``). Round 0 (the untrained baseline evaluation)
and round 1 (warm-up: a simulation's workers load their data once) are left out. Each
figure is the median over the remaining rounds (and hospitals), with min and max;
ratios are taken against the baseline measured in the same sitting, because the machine
is shared and noisy.

Results go to ``benchmarks/results/perf.json`` (one entry per measurement: name,
config, median, min, max, unit, baseline, ratio, target) and ``benchmarks/results/perf.md``
(the printed table, with the machine it came from).

The ``mia`` suite trains two federations on the embedded data, a deliberately overfitted
non-private one and the default DP one (epsilon = 8), and runs the membership-inference
audit (``client/audit/membership.py``) against each: ``benchmarks/results/mia.json`` and
``mia.md``. (`make audit` runs the one-run audit of ``client/audit/one_run.py``.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.report import Echo, Measurement
from server.commands.simulate import run_simulation_cli
from shared_model.config import PRESETS, RunConfig
from shared_model.datasets.export import write_manifest
from shared_model.weights import initial_model, shared_state
from tests.support.loopback import HOSPITALS, LoopbackDeployment

__all__ = [
    "REPORTS_PER_HOSPITAL",
    "WIRE_MODES",
    "TreeMemory",
    "run_audit_bench",
    "run_first_result_bench",
    "run_mode_bytes_bench",
    "run_scale_bench",
    "run_wire_bench",
    "simulate_run",
]

# Simulated and deployed federations hold the same number of reports per hospital, so
# that their rounds train on the same amount of data.
REPORTS_PER_HOSPITAL = 300
_WARM_UP_ROUNDS = 1


@dataclass
class _Run:
    """The per-round figures of one federation."""

    seconds: list[float] = field(default_factory=list)
    up: list[float] = field(default_factory=list)  # per hospital and round
    down: list[float] = field(default_factory=list)
    key_up: list[float] = field(default_factory=list)

    @classmethod
    def from_rounds(cls, rounds: list[dict[str, Any]]) -> _Run:
        run = cls()
        for r in rounds:
            if r["round"] <= _WARM_UP_ROUNDS:
                continue
            run.seconds.append(float(r["seconds"]))
            for h in r["hospitals"]:
                run.up.append(float(h.get("bytes_up", 0)))
                run.down.append(float(h.get("bytes_down", 0)))
                run.key_up.append(float(h.get("key_bytes_up", 0)))
        if not run.seconds:
            declined = {
                h.get("reason", "")
                for r in rounds
                for h in r["hospitals"]
                if h.get("status") == "declined"
            }
            why = f": every hospital declined ({'; '.join(sorted(declined))})" if declined else ""
            raise RuntimeError(f"the run recorded no training round after warm-up{why}")
        return run


def simulate_run(
    out: Path, hospitals: int, rounds: int, overrides: dict[str, Any], timeout: float = 1800
) -> list[dict[str, Any]]:
    """Run a simulated federation to the end; its rounds (RuntimeError if it failed)."""
    result = run_simulation_cli(
        hospitals=hospitals,
        rounds=rounds,
        overrides={**overrides, "server.min-hospitals": hospitals},
        out=out,
        timeout=timeout,
        verbose=False,
        tolerate_failures=False,
        echo=lambda _line: None,
    )
    if not result.ok:
        raise RuntimeError(f"simulated run in {out} failed: {'; '.join(result.problems)}")
    return result.rounds


def _simulate(
    hospitals: int, rounds: int, secagg: bool, work: Path, echo: Echo, reports: int
) -> _Run:
    out = work / f"sim-{'secagg' if secagg else 'plain'}-{hospitals}"
    secagg_state = "on" if secagg else "off"
    echo(f"  simulated, {hospitals} hospitals, SecAgg+ {secagg_state} ...")
    overrides = {"secagg.enabled": secagg, "data.max-reports": reports * hospitals}
    return _Run.from_rounds(simulate_run(out, hospitals, rounds, overrides))


def _deploy(
    hospitals: int, rounds: int, secagg: bool, work: Path, echo: Echo, reports: int
) -> _Run:
    tmp = work / f"deployed-{'secagg' if secagg else 'plain'}-{hospitals}"
    tmp.mkdir(parents=True)
    secagg_state = "on" if secagg else "off"
    echo(f"  deployed on loopback (TLS), {hospitals} hospitals, SecAgg+ {secagg_state} ...")
    d = LoopbackDeployment(tmp)
    try:
        manifests = {
            name: write_manifest(tmp / f"{name}-data", i, reports)
            for i, name in enumerate(HOSPITALS[:hospitals])
        }
        code, log, out = d.federate(
            manifests,
            f"num-rounds = {rounds}\nsecagg.enabled = {str(secagg).lower()}\n"
            f"server.min-hospitals = {hospitals}\nserver.wait-for-hospitals-timeout = 120.0\n",
            timeout=1800,
            # a hospital with its own data sends plain updates only if its file allows it
            policy="" if secagg else "require-secagg = false",
        )
    finally:
        leftover = d.stop_all()
    if code != 0 or out is None:
        raise RuntimeError(f"deployed run in {tmp} failed (exit {code}): {log[-1500:]}")
    if leftover:
        raise RuntimeError(f"processes left running after the deployed run: {leftover}")
    return _Run.from_rounds(json.loads((out / "metrics.json").read_text("utf-8"))["rounds"])


def run_wire_bench(
    hospital_counts: Sequence[int] = (3, 10),
    rounds: int = 4,
    deployed: bool = True,
    echo: Echo = print,
    reports: int = REPORTS_PER_HOSPITAL,
) -> list[Measurement]:
    """Round time and bytes per hospital, plain vs SecAgg+, simulated and deployed."""
    if rounds <= _WARM_UP_ROUNDS:
        raise ValueError(f"rounds must exceed the {_WARM_UP_ROUNDS} warm-up round(s)")
    out: list[Measurement] = []
    sim_time: dict[tuple[int, bool], Measurement] = {}
    with tempfile.TemporaryDirectory(prefix="fedfusion-bench-") as tmp:
        work = Path(tmp)
        for n in hospital_counts:
            plain = _simulate(n, rounds, False, work, echo, reports)
            masked = _simulate(n, rounds, True, work, echo, reports)
            cfg = {"hospitals": n, "rounds": rounds, "reports": reports, "mode": "simulated"}
            t_plain = Measurement.of(f"round-time/sim/plain/{n}", cfg, plain.seconds, "s")
            t_masked = Measurement.of(f"round-time/sim/secagg/{n}", cfg, masked.seconds, "s")
            sim_time[n, False], sim_time[n, True] = t_plain, t_masked
            up_plain = Measurement.of(f"bytes-up/sim/plain/{n}", cfg, plain.up, "B")
            update = [u - k for u, k in zip(masked.up, masked.key_up, strict=True)]
            down_plain = Measurement.of(f"bytes-down/sim/plain/{n}", cfg, plain.down, "B")
            out += [
                t_plain,
                t_masked.against(t_plain, 1.2),
                up_plain,
                Measurement.of(f"bytes-up-update/sim/secagg/{n}", cfg, update, "B").against(
                    up_plain, 1.1
                ),
                Measurement.of(f"bytes-up-keys/sim/secagg/{n}", cfg, masked.key_up, "B"),
                down_plain,
                Measurement.of(f"bytes-down/sim/secagg/{n}", cfg, masked.down, "B").against(
                    down_plain
                ),
            ]
        if deployed:
            n = min(hospital_counts)
            cfg = {"hospitals": n, "rounds": rounds, "reports": reports, "mode": "deployed, TLS"}
            for secagg in (False, True):
                run = _deploy(n, rounds, secagg, work, echo, reports)
                name = f"round-time/deployed/{'secagg' if secagg else 'plain'}/{n}"
                out.append(
                    Measurement.of(name, cfg, run.seconds, "s").against(sim_time[n, secagg], 2.0)
                )
    return out


class TreeMemory:
    """Peak resident memory of this process and all its descendants, sampled twice a second.

    The sum of resident sets counts pages shared between processes (the torch libraries
    every Ray worker maps) once per process, so it is an upper bound.
    """

    def __init__(self, interval: float = 0.5, root: int | None = None) -> None:
        self.interval = interval
        self.root = root  # a process id; this process by default
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _total(self) -> float:
        try:
            me = psutil.Process(self.root)
            tree = [me, *me.children(recursive=True)]
        except psutil.Error:  # the root has ended
            return 0.0
        total = 0.0
        for proc in tree:
            try:
                total += proc.memory_info().rss
            except psutil.Error:  # ended between listing and reading
                continue
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_first_result_bench(repeats: int = 2, echo: Echo = print) -> list[Measurement]:
    """Time to first result, each in a fresh process.

    ``fedfusion simulate``'s defaults (3 hospitals x 15 rounds, frozen pretrained
    encoders) end to end, as ``make simulate`` runs them once .venv exists: each run in
    its own folder, so its feature cache starts empty, as on a fresh clone. And the CLI's
    import time (``--help``).
    """
    fedfusion = str(Path(sys.executable).parent / "fedfusion")
    cfg = {"command": "fedfusion simulate", "hospitals": 3, "rounds": 15, "feature-cache": "empty"}
    imports, runs = [], []
    with tempfile.TemporaryDirectory(prefix="fedfusion-first-") as tmp:
        for r in range(repeats):
            started = time.monotonic()
            subprocess.run([fedfusion, "--help"], capture_output=True, check=True)
            imports.append(time.monotonic() - started)
            echo(f"  time to first result: fedfusion simulate, run {r + 1} ...")
            started = time.monotonic()
            proc = subprocess.run(
                [fedfusion, "simulate", "--out", str(Path(tmp) / f"try-{r}" / "run")],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"fedfusion simulate failed: {proc.stderr[-1500:]}")
            runs.append(time.monotonic() - started)
    run = Measurement.of("first-result/simulate", cfg, runs, "s")
    run.target, run.met = "<= 120 s", run.median <= 120
    return [run, Measurement.of("first-result/cli-import", cfg, imports, "s")]


SCALE_SIZES = (10, 50, 100)


def run_scale_bench(
    sizes: Sequence[int] = SCALE_SIZES,
    rounds: int = 2,
    echo: Echo = print,
    overrides: dict[str, Any] | None = None,
    timeout: float = 1800,
) -> list[Measurement]:
    """Round time, peak memory and bytes of large simulated federations, DP on.

    SecAgg+ on and off, on all of the embedded data (3,860 reports: the total stays the
    same, each hospital's share shrinks as the federation grows), with sparse shares
    (``secagg.sparse``) unless ``overrides`` says otherwise. ``overrides``: more
    run settings for both runs (e.g. longer timeouts for 1,000 hospitals); ``timeout``:
    seconds per run.

    Round 1 (each worker loads its data) is reported on its own; the round time is the
    median of the later rounds, as in :func:`run_wire_bench`.
    """
    out: list[Measurement] = []
    first: dict[bool, Measurement] = {}
    with tempfile.TemporaryDirectory(prefix="fedfusion-scale-") as tmp:
        for n in sizes:
            plain: dict[str, Any] = {}
            for secagg in (False, True):
                kind = "secagg" if secagg else "plain"
                echo(
                    f"  scale: {n} simulated hospitals, DP on, SecAgg+ {'on' if secagg else 'off'}"
                )
                started = time.monotonic()
                with TreeMemory() as memory:
                    rounds_done = simulate_run(
                        Path(tmp) / f"{kind}-{n}",
                        n,
                        rounds,
                        {"secagg.sparse": True, **(overrides or {}), "secagg.enabled": secagg},
                        timeout,
                    )
                wall = time.monotonic() - started
                run = _Run.from_rounds(rounds_done)
                cfg = {"hospitals": n, "rounds": rounds, "reports": "all (3,860)", "dp": True}
                one = [float(r["seconds"]) for r in rounds_done if r["round"] == 1]
                t = Measurement.of(f"round-time/scale/{kind}/{n}", cfg, run.seconds, "s")
                t1 = Measurement.of(f"first-round-time/scale/{kind}/{n}", cfg, one, "s")
                mem = Measurement.of(f"peak-memory/scale/{kind}/{n}", cfg, [memory.peak], "B")
                whole = Measurement.of(f"run-time/scale/{kind}/{n}", cfg, [wall], "s")
                if n == max(sizes) and secagg:
                    t1.target, t1.met = "<= 600 s", t1.median <= 600
                    mem.target, mem.met = "<= 24 GiB", mem.median <= 24 * 2**30
                if secagg:
                    t.against(plain["time"], 1.2)
                    update = [u - k for u, k in zip(run.up, run.key_up, strict=True)]
                    up = Measurement.of(f"bytes-up-update/scale/secagg/{n}", cfg, update, "B")
                    keys = Measurement.of(f"bytes-up-keys/scale/secagg/{n}", cfg, run.key_up, "B")
                    extra = [up.against(plain["up"], 1.1), keys]
                else:
                    up = Measurement.of(f"bytes-up/scale/plain/{n}", cfg, run.up, "B")
                    plain = {"time": t, "up": up}
                    extra = [up]
                if n != min(sizes):  # growth with the federation's size, same total data
                    whole.against(first[secagg])
                else:
                    first[secagg] = whole
                out += [t, t1, whole, mem, *extra]
    return out


# What crosses the network per model (encoder-mode): the same 3 hospitals and data, with
# SecAgg+. Full training of the 22.7M-parameter text encoder keeps per-example gradients
# of every weight, so it runs with batches of 8 to fit in memory.
WIRE_MODES: dict[str, dict[str, Any]] = {
    "small/full": {},
    "pretrained/frozen": dict(PRESETS["efficientnet-minilm-concat"]),
    "pretrained/lora": {**PRESETS["efficientnet-minilm-concat"], "model.encoder-mode": "lora"},
    "pretrained-text/full": {
        "model.text-encoder": "pretrained",
        "model.fusion": "concat",
        "train.batch-size": 8,
    },
}


def _parameter_counts(overrides: dict[str, Any]) -> tuple[int, int]:
    """(trainable parameters, all parameters) of the model these settings build."""
    run = RunConfig.from_run_config(overrides)
    model = initial_model(run.model, run.seed)
    sent = sum(t.numel() for t in shared_state(model).values())
    return sent, sum(p.numel() for p in model.parameters())


def run_mode_bytes_bench(
    hospitals: int = 3, rounds: int = 2, reports: int = 100, echo: Echo = print
) -> list[Measurement]:
    """Bytes per hospital and round for each encoder mode, measured on the wire (SecAgg+)."""
    out: list[Measurement] = []
    baseline: dict[str, Measurement] = {}
    with tempfile.TemporaryDirectory(prefix="fedfusion-bench-modes-") as tmp:
        for mode, overrides in WIRE_MODES.items():
            echo(f"  bytes per round, {mode}, {hospitals} hospitals, SecAgg+ ...")
            settings = {**overrides, "data.max-reports": reports * hospitals}
            rounds_done = simulate_run(
                Path(tmp) / mode.replace("/", "-"), hospitals, rounds, settings
            )
            run = _Run.from_rounds(rounds_done)
            sent, total = _parameter_counts(settings)
            cfg = {
                **overrides,
                "hospitals": hospitals,
                "reports": reports,
                "trainable_parameters": sent,
                "all_parameters": total,
            }
            update = [u - k for u, k in zip(run.up, run.key_up, strict=True)]
            up = Measurement.of(f"bytes-up-update/{mode}", cfg, update, "B")
            down = Measurement.of(f"bytes-down/{mode}", cfg, run.down, "B")
            if baseline:
                up.against(baseline["up"])
                down.against(baseline["down"])
            else:
                baseline.update(up=up, down=down)
            out += [up, down]
    return out


# The audit's two models. The non-private one is overfitted on purpose (few records,
# many local epochs, no modality dropout) to show that the attack works at all.
AUDIT_MODELS: dict[str, dict[str, Any]] = {
    "non-private-overfit": {
        "privacy.enabled": False,
        "secagg.enabled": False,
        "train.local-epochs": 30,
        "train.modality-dropout": 0.0,
        "data.max-reports": 600,
    },
    "dp-eps8": {"privacy.target-epsilon": 8.0},  # the default run (make simulate)
}


def run_audit_bench(hospitals: int = 3, rounds: int = 3, echo: Echo = print) -> list[Measurement]:
    """Membership-inference AUC (and TPR at 1% FPR) against a non-private and a DP model."""
    # scikit-learn (about 80 MB) loads with this suite only: the scale suite's peak
    # memory counts this process.
    from client.audit.membership import audit_run

    out: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="fedfusion-audit-") as tmp:
        for name, overrides in AUDIT_MODELS.items():
            echo(f"  training {name} ({hospitals} hospitals x {rounds} rounds) ...")
            run_dir = Path(tmp) / name
            rounds_done = simulate_run(run_dir, hospitals, rounds, overrides)
            echo(f"  auditing {name} ...")
            result = audit_run(run_dir, hospitals)
            attack, best = result.strongest
            cfg = {
                **overrides,
                "hospitals": hospitals,
                "rounds": rounds,
                "attack": attack,
                "members": result.members,
                "non_members": result.non_members,
                "model_macro_auroc": rounds_done[-1]["eval_auroc"],
                "all_attacks": {k: asdict(v) for k, v in result.attacks.items()},
            }
            low, high = best.auc_ci95
            auc = Measurement(
                name=f"mia-auc/{name}",
                config=cfg,
                median=best.auc,
                min=low,
                max=high,
                unit="AUC",
                samples=result.members,
            )
            if name == "non-private-overfit":
                auc.target, auc.met = "95% CI above 0.5 (the attack works)", low > 0.5
            else:
                auc.target, auc.met = "<= 0.55", best.auc <= 0.55
            tpr = best.tpr_at_fpr["0.01"]
            out += [
                auc,
                Measurement(
                    name=f"mia-tpr@1%fpr/{name}",
                    config=cfg,
                    median=tpr,
                    min=tpr,
                    max=tpr,
                    unit="TPR",
                    samples=1,
                ),
            ]
    return out
