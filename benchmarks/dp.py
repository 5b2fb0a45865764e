"""What DP-SGD costs a hospital per training step: time and memory, DP vs non-DP.

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

__all__ = ["DP_MODELS", "DP_MODES", "run_dp_bench", "run_memory_bench"]

Echo = Callable[[str], None]
# The models measured: the default one, and pretrained encoders with LoRA on the text
# encoder (its 22.7M-parameter backbone runs forward and backward at every step).
DP_MODELS: dict[str, dict[str, Any]] = {"default": {}, "lora": WIRE_MODES["pretrained/lora"]}
DP_MODES = ("none", "bk", "hooks", "ghost", "functorch", "ew")
_TARGET = 1.3  # DP step time / non-DP step time, on the default model


def _threads(device: str) -> int:
    """Torch threads for a measurement: every core on the CPU, one to feed a GPU."""
    return max(1, os.cpu_count() or 1) if device == "cpu" else 1


def _run_one(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.dp_step", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
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
) -> list[Measurement]:
    """DP vs non-DP step time and peak memory per model and clipping method.

    ``overrides``: each model's run-config keys; ``batch``: examples per step; ``steps``:
    (warm-up, timed) steps per process (default: 3 and 10, a pretrained model 1 and 3);
    ``compare_prng``: also step bk with torch's PRNG for the noise (the default model).
    """
    threads = _threads(device)
    out: list[Measurement] = []
    for model in models:
        heavy = model != "default"  # a pretrained backbone: fewer, longer steps
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
        cfg = {k: v for k, v in common.items() if k != "mode"}
        base: dict[str, Measurement] = {}
        for name, times in samples.items():
            step = Measurement.of(f"dp-step/{model}/{name}", cfg, times, "s")
            peak = Measurement.of(
                f"peak-memory/{model}/{name}", cfg, [g["peak_memory"] for g in memory[name]], "B"
            )
            grown = Measurement.of(
                f"train-memory/{model}/{name}", cfg, [g["train_memory"] for g in memory[name]], "B"
            )
            if name == "none":
                base = {"step": step, "peak": peak, "grown": grown}
            else:
                limit = _TARGET if model == "default" and name == "bk" else None
                step.against(base["step"], limit)
                peak.against(base["peak"])
                grown.against(base["grown"])
            out += [step, peak, grown]
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
