"""``python -m benchmarks --suite gpu`` (``make bench-gpu``): fedfusion on one CUDA GPU.

Three parts, each a measurement and a check that the product runs on the device:

1. **DP step.** An Opacus DP-SGD step (``bk``, CSPRNG noise) against a non-DP one, time
   per step and peak memory (the peak CUDA allocation on a GPU), each in a fresh process
   (``benchmarks/dp.py``): the run config's default model at its default batch size, and
   the pretrained encoders with LoRA (the utility benchmark's ``lora`` model).
2. **Federation.** What ``fedfusion simulate`` runs: 3 simulated hospitals, 2 rounds, DP
   and SecAgg+, every hospital's ``device`` set to the one measured. Round times; on a
   GPU also the most device memory in use beyond this process's own, and the part fails
   if the hospitals used none (they would have fallen back to the CPU).
3. **Predict.** The federation's final model exported as a bundle (``fedfusion
   export``), loaded on the device and run over a manifest of a hospital's records
   (``shared_model/inference``, what ``fedfusion predict`` runs): the load time and the
   time per record, decoding included, cold and warm.

On a CUDA GPU it takes under 5 minutes. ``--device cpu`` runs every part at the smallest
sizes that still check it (a test runs it) and writes ``gpu-cpu.json``/``.md``, never a
GPU's ``gpu.json``.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.dp import run_dp_bench
from benchmarks.report import Echo, Measurement
from benchmarks.utility import UTILITY_MODES
from server.app.tracking import tracking_env
from server.commands.export import export_run
from server.commands.simulate import run_simulation_cli
from shared_model.config import RunConfig
from shared_model.datasets.export import write_manifest
from shared_model.inference.bundle import load_bundle
from shared_model.inference.loaded import load_model
from shared_model.inference.predict import predict_manifest

__all__ = ["HOSPITALS", "ROUNDS", "DeviceMemory", "GpuBench", "GpuPlan", "gpu_plan"]

HOSPITALS, ROUNDS = 3, 2  # the smallest SecAgg+ group, and a round after the first
Part = tuple[str, Callable[[], list[Measurement]]]


@dataclass(frozen=True, kw_only=True)
class GpuPlan:
    """How much each part runs: the defaults on a GPU, the least that checks it on a CPU."""

    default_batch: int  # the default model's DP step
    lora_batch: int
    default_steps: tuple[int, int]  # (warm-up, timed) steps per process
    lora_steps: tuple[int, int]
    reports: int  # per hospital in the federation
    records: int  # predicted, twice
    timeout: float  # seconds the federation may take


def gpu_plan(device: str) -> GpuPlan:
    """The plan for ``device``: the run config's batch size on a GPU, tiny on the CPU."""
    if device.startswith("cuda"):
        batch = RunConfig().train.batch_size
        return GpuPlan(
            default_batch=batch,
            lora_batch=batch,
            default_steps=(3, 10),
            lora_steps=(2, 5),
            reports=300,
            records=256,
            timeout=240,
        )
    return GpuPlan(
        default_batch=32,
        lora_batch=4,
        default_steps=(1, 2),
        lora_steps=(1, 1),
        reports=40,
        records=8,
        timeout=600,
    )


class DeviceMemory:
    """The most memory in use on a GPU while it runs, sampled twice a second.

    From the driver (``torch.cuda.mem_get_info``), so it counts every process on the GPU,
    the hospitals' included, less what was in use when sampling began.
    """

    def __init__(self, device: str, interval: float = 0.5) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.start = self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _used(self) -> float:
        free, total = torch.cuda.mem_get_info(self.device)
        return float(total - free)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            self._stop.wait(self.interval)

    @property
    def grown(self) -> float:
        """Bytes in use at the peak beyond those in use at the start."""
        return max(self.peak - self.start, 0.0)

    def __enter__(self) -> DeviceMemory:
        self.start = self.peak = self._used()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class GpuBench:
    """The suite's parts on one device, sharing a work folder (removed by :meth:`close`)."""

    def __init__(self, device: str, echo: Echo = print) -> None:
        self.device = device
        self.on_gpu = device.startswith("cuda")
        self.plan = gpu_plan(device)
        self.echo = echo
        self.work = Path(tempfile.mkdtemp(prefix="fedfusion-gpu-"))
        self.run_dir: Path | None = None  # the federation's, once it has run

    def parts(self) -> list[Part]:
        """The parts in order: each one's name and what runs it."""
        return [
            ("dp step", self.dp_steps),
            ("federation", self.federation),
            ("predict", self.predict),
        ]

    def facts(self) -> dict[str, Any]:
        """The device, for the results' header: the GPU's name, memory and CUDA version."""
        if not self.on_gpu:
            return {"device": "cpu (every part checked, at the smallest sizes: no GPU figures)"}
        props = torch.cuda.get_device_properties(torch.device(self.device))
        return {
            "device": f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA "
            f"{torch.version.cuda} ({self.device})",
            "gpu": props.name,
            "gpu-memory": props.total_memory,
            "cuda": torch.version.cuda,
        }

    def close(self) -> None:
        """Remove the work folder (the run directory, the bundle, the manifest)."""
        shutil.rmtree(self.work, ignore_errors=True)

    def dp_steps(self) -> list[Measurement]:
        """DP (bk) vs non-DP step time and memory: the default model, then LoRA."""
        p = self.plan
        models = (
            ("default", {}, p.default_batch, p.default_steps),
            ("lora", UTILITY_MODES["lora"], p.lora_batch, p.lora_steps),
        )
        out: list[Measurement] = []
        for model, overrides, batch, steps in models:
            out += run_dp_bench(
                (model,),
                ("none", "bk"),
                device=self.device,
                repeats=1,
                echo=self.echo,
                overrides={model: overrides},
                batch=batch,
                steps=steps,
                compare_prng=False,
            )
        return out

    def federation(self) -> list[Measurement]:
        """3 simulated hospitals x 2 rounds, DP and SecAgg+, training on the device."""
        reports = self.plan.reports
        self.echo(
            f"  federation: {HOSPITALS} simulated hospitals x {ROUNDS} rounds, DP + SecAgg+, "
            f"{reports} reports each, hospitals on {self.device} ..."
        )
        out = self.work / "run"
        overrides = {
            "privacy.enabled": True,
            "secagg.enabled": True,
            "data.max-reports": reports * HOSPITALS,
            "server.min-hospitals": HOSPITALS,
        }
        memory = DeviceMemory(self.device) if self.on_gpu else None
        started = time.monotonic()
        with memory or nullcontext():
            result = run_simulation_cli(
                hospitals=HOSPITALS,
                rounds=ROUNDS,
                overrides=overrides,
                out=out,
                timeout=self.plan.timeout,
                verbose=False,
                tolerate_failures=False,
                echo=lambda _line: None,
                tracking=tracking_env(enabled=False),
                hospital_device=self.device,
            )
        wall = time.monotonic() - started
        if not result.ok:
            raise RuntimeError(f"the simulated run in {out} failed: {'; '.join(result.problems)}")
        trained = [r for r in result.rounds if r["round"] > 0]
        idle = [
            f"round {r['round']} {h['hospital']}: {h['status']}"
            for r in trained
            for h in r["hospitals"]
            if h["status"] != "trained"
        ]
        if len(trained) != ROUNDS or idle:
            raise RuntimeError(f"not every hospital trained every round: {idle or trained}")
        if memory is not None and memory.grown < 64 * 2**20:
            raise RuntimeError(
                f"the GPU's memory in use grew by {memory.grown / 2**20:.0f} MiB during the "
                "federation: the hospitals did not train on it (see the hospitals' warnings "
                f"in {out / 'flwr-run.log'})"
            )
        self.run_dir = out
        cfg = {
            "hospitals": HOSPITALS,
            "rounds": ROUNDS,
            "reports": reports,
            "device": self.device,
            "model": "the run config's default",
        }
        measured = [
            Measurement.of(f"federation/round-{r['round']}", cfg, [float(r["seconds"])], "s")
            for r in trained
        ]
        measured.append(Measurement.of("federation/whole-run", cfg, [wall], "s"))
        if memory is not None:
            measured.append(Measurement.of("federation/gpu-memory", cfg, [memory.grown], "B"))
        return measured

    def predict(self) -> list[Measurement]:
        """The federation's final model, exported, loaded and run over a manifest."""
        if self.run_dir is None:
            raise RuntimeError("no trained model to predict with: the federation part failed")
        records = self.plan.records
        self.echo(f"  predict: export, load on {self.device}, {records} records twice ...")
        bundle = export_run(self.run_dir, self.work / "bundle", which="final")
        manifest = write_manifest(self.work / "site", 0, records)
        started = time.perf_counter()
        loaded = load_model(load_bundle(bundle), device=self.device)
        loaded_in = time.perf_counter() - started
        where = next(loaded.model.parameters()).device
        if where.type != torch.device(self.device).type:
            raise RuntimeError(f"the bundle's model was loaded on {where}, not {self.device}")
        per_record = []
        for _ in range(2):  # the first pass also warms the device up
            started = time.perf_counter()
            predictions, _report = predict_manifest(loaded, manifest)
            per_record.append((time.perf_counter() - started) / max(len(predictions), 1))
        failed = [p.error for p in predictions if p.error]
        if len(predictions) != records or failed:
            raise RuntimeError(
                f"{len(predictions)} of {records} records predicted; errors: {failed[:3]}"
            )
        cfg = {"records": records, "device": self.device, "round": "final"}
        return [
            Measurement.of("predict/load", cfg, [loaded_in], "s"),
            Measurement.of("predict/per-record-cold", cfg, per_record[:1], "s"),
            Measurement.of("predict/per-record-warm", cfg, per_record[1:], "s"),
        ]
