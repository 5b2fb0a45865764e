"""What DP-SGD costs a hospital per training step: time and memory, DP vs non-DP.

The headline is the default configuration: the run config's default model (a CNN and a
transformer trained from scratch, concatenated) at its default batch size
(``train.batch-size``), clipped by book-keeping with the noise and sampling from the OS
CSPRNG (``privacy.secure-noise``), against a DP step of at most 1.2 non-DP steps. Beside
it: the head ``make simulate`` trains by default (frozen pretrained encoders, their
features cached; fixed per-step costs dominate its small step), and, as extras, every
clipping method at batch 64 on the default model and with LoRA on a pretrained text
encoder.

Each measurement runs in a fresh process (``python -m benchmarks.dp_step '<spec>'``), so
that its peak memory is its own: the same model, the same fixed batches and the same
optimizer, stepped without DP and with each per-example clipping method (book-keeping,
and Opacus's hooks, ghost, functorch and ew), noise included. Repeats go round-robin
over the methods, so that the machine's noise falls on all of them alike; each figure
is the median over every timed step of every repeat, and its ratio is taken against the
non-DP step measured in the same sitting.

Memory is the process's peak resident set (VmHWM, reset once the model and batches are
built) and what training added to it (the peak minus the resident set before the first
step), or the peak CUDA allocation on a GPU. Large batches split into physical chunks
(``train.max-physical-batch-size``, Opacus's BatchMemoryManager protocol) are measured
the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from benchmarks.federation import WIRE_MODES
from benchmarks.report import Measurement
from shared_model.config import SIMULATE_DEFAULTS, RunConfig

__all__ = ["DP_MODELS", "DP_MODES", "run_dp_bench", "run_dp_suite", "run_memory_bench"]

Echo = Callable[[str], None]
# The models measured: the run config's default one; the frozen-feature head `make
# simulate` trains without --preset; pretrained encoders with LoRA on the text encoder
# (its 22.7M-parameter backbone runs forward and backward at every step).
DP_MODELS: dict[str, dict[str, Any]] = {
    "default": {},
    "simulate": dict(SIMULATE_DEFAULTS),
    "lora": WIRE_MODES["pretrained/lora"],
}
DP_MODES = ("none", "bk", "hooks", "ghost", "functorch", "ew")
_TARGET = 1.2  # DP step time / non-DP step time: the default model at the default batch
_EXTRA_BATCH = 64  # the extras: every clipping method, at the batch measured before


def _threads(device: str) -> int:
    """Torch threads for a measurement: every core on the CPU, one to feed a GPU."""
    return max(1, os.cpu_count() or 1) if device == "cpu" else 1


def _run_one(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.dp_step", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        # Waiting OpenMP threads sleep instead of spinning: on a machine shared with other
        # work, a spinning thread holds the core its sibling needs, and a step of 15 ms
        # was measured at 1 s. Both sides of every ratio run this way.
        env={"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"DP step measurement {spec['model']}/{spec['mode']} failed: {proc.stderr[-1500:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_dp_bench(
    models: Sequence[str] = tuple(DP_MODELS),
    modes: Sequence[str] = DP_MODES,
    *,
    device: str = "cpu",
    repeats: int = 3,
    echo: Echo = print,
    overrides: Mapping[str, Mapping[str, Any]] = DP_MODELS,
    batch: int = 64,
    steps: tuple[int, int] | None = None,
    compare_prng: bool = True,
    suffix: str = "",
    target: bool = True,
) -> list[Measurement]:
    """DP vs non-DP step time and peak memory per model and clipping method.

    ``overrides``: each model's run-config keys; ``batch``: examples per step; ``steps``:
    (warm-up, timed) steps per process (default: 3 and 10, LoRA 1 and 3);
    ``compare_prng``: also step bk with torch's PRNG for the noise (the default model);
    ``suffix``: added to the model's name in the figures' names; ``target``: hold the
    default model's bk step to the target.
    """
    threads = _threads(device)
    out: list[Measurement] = []
    for model in models:
        heavy = model == "lora"  # a pretrained backbone trains: fewer, longer steps
        warmup, timed = steps or ((1, 3) if heavy else (3, 10))
        common = {
            "model": model,
            "overrides": dict(overrides[model]),
            "device": device,
            "threads": threads,
            "batch": batch,
            "warmup": warmup,
            "steps": timed,
            "secure_noise": True,
        }
        variants = [{**common, "mode": m} for m in modes]
        if compare_prng and model == "default" and "bk" in modes:  # the OS-CSPRNG's cost
            variants.append({**common, "mode": "bk", "secure_noise": False, "name": "bk-prng"})
        samples: dict[str, list[float]] = {}
        memory: dict[str, list[dict[str, Any]]] = {}
        for r in range(repeats if not heavy else max(1, repeats - 1)):
            for spec in variants:
                name = spec.get("name", spec["mode"])
                echo(f"  DP step, {model}, {name}, repeat {r + 1} ...")
                got = _run_one(spec)
                samples.setdefault(name, []).extend(got["times"])
                memory.setdefault(name, []).append(got)
        label = f"{model}{suffix}"
        base: dict[str, Measurement] = {}
        for name, times in samples.items():
            spec = next(v for v in variants if v.get("name", v["mode"]) == name)
            cfg = {k: v for k, v in spec.items() if k not in ("mode", "name")}
            step = Measurement.of(f"dp-step/{label}/{name}", cfg, times, "s")
            peak = Measurement.of(
                f"peak-memory/{label}/{name}", cfg, [g["peak_memory"] for g in memory[name]], "B"
            )
            grown = Measurement.of(
                f"train-memory/{label}/{name}", cfg, [g["train_memory"] for g in memory[name]], "B"
            )
            if name == "none":
                base = {"step": step, "peak": peak, "grown": grown}
            else:
                limit = _TARGET if target and model == "default" and name == "bk" else None
                step.against(base["step"], limit)
                peak.against(base["peak"])
                grown.against(base["grown"])
            out += [step, peak, grown]
    return out


def run_dp_suite(device: str = "cpu", echo: Echo = print, repeats: int = 3) -> list[Measurement]:
    """The DP part of the perf suite: the defaults first, then the extras.

    1. The default model at the default batch size, none vs bk (and bk with torch's PRNG
       for the noise, to show the CSPRNG's share), held to DP <= 1.2x non-DP.
    2. ``make simulate``'s frozen-feature head at the same batch, none vs bk (reported).
    3. Every clipping method at batch 64, on the default model and with LoRA.
    """
    batch = RunConfig().train.batch_size
    out = run_dp_bench(
        ("default",), ("none", "bk"), device=device, repeats=repeats, echo=echo, batch=batch
    )
    out += run_dp_bench(
        ("simulate",), ("none", "bk"), device=device, repeats=repeats, echo=echo, batch=batch
    )
    out += run_dp_bench(
        ("default", "lora"),
        device=device,
        repeats=repeats,
        echo=echo,
        batch=_EXTRA_BATCH,
        suffix=f"-batch-{_EXTRA_BATCH}",
        target=False,
        compare_prng=False,
    )
    return out


def run_memory_bench(device: str = "cpu", echo: Echo = print) -> list[Measurement]:
    """Memory of training on batches of 512, whole or in physical chunks of 64.

    The chunks follow Opacus's BatchMemoryManager protocol: one noised step per batch.
    """
    threads = _threads(device)
    out: list[Measurement] = []
    base: dict[int, Measurement] = {}
    for mode in ("none", "bk", "hooks"):
        for physical in (0, 64):
            spec = {
                "model": "default",
                "overrides": {},
                "device": device,
                "threads": threads,
                "batch": 512,
                "physical": physical,
                "warmup": 1,
                "steps": 2,
                "secure_noise": True,
                "mode": mode,
            }
            split = f"physical-{physical}" if physical else "whole"
            echo(f"  memory, logical batch 512, {mode}, {split} ...")
            got = _run_one(spec)
            cfg = {k: v for k, v in spec.items() if k != "mode"}
            m = Measurement.of(
                f"train-memory/default/{mode}/batch-512-{split}", cfg, [got["train_memory"]], "B"
            )
            if mode == "none":
                base[physical] = m
            else:
                m.against(base[physical])
            out.append(m)
    return out
