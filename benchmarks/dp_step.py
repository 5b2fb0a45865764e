"""One DP step measurement at a hospital: ``python -m benchmarks.dp_step '<spec json>'``.

Run by ``make bench`` (benchmarks/dp.py), each in a fresh process so that its
peak memory is its own. It trains the model the spec names on fixed synthetic batches
shaped like the embedded data (a frozen pretrained backbone's cached features in place
of its input, as a hospital trains), without DP or with one per-example clipping method
(through :func:`client.dp.engine.make_private`, noise included), and prints the step
times and the memory as JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

import client.dp.bookkeeping as bk
import client.dp.secure_noise as secure_noise
from client.app.features import cacheable_encoders
from client.dp.engine import make_private
from client.dp.policy import PrivacyPolicy
from shared_model.config import RunConfig
from shared_model.engine import make_loss, make_optimizer, reuse_freed_memory, train_step
from shared_model.weights import initial_model

__all__ = ["breakdown", "measure"]


def _batches(
    cfg: Any, batch: int, count: int, device: str, model: torch.nn.Module | None = None
) -> list[tuple[Any, ...]]:
    """Fixed synthetic batches shaped like the embedded data: 40 of 64 tokens used.

    With ``model``, each frozen pretrained backbone's input is replaced by features of
    the shape its cache holds (pooled: one position), as a hospital trains on them.
    """
    g = torch.Generator().manual_seed(0)
    frozen = cacheable_encoders(model) if model is not None else {}
    out = []
    for _ in range(count):
        image = torch.rand(batch, 1, cfg.image_size, cfg.image_size, generator=g)
        ids = torch.randint(4, cfg.text_vocab_buckets, (batch, cfg.max_report_tokens), generator=g)
        ids[:, (cfg.max_report_tokens * 5) // 8 :] = 0
        if "image" in frozen:  # EfficientNet's feature map: 1/32 of the side
            enc = frozen["image"]
            where = 1 if enc.pooled_only else (cfg.image_size // 32) ** 2
            image = torch.randn(batch, where, enc.width, generator=g).abs()
        if "text" in frozen:
            enc = frozen["text"]
            where = 1 if enc.pooled_only else cfg.max_report_tokens
            width = int(enc.backbone.config.hidden_size)
            states = torch.randn(batch, where, width, generator=g) * 0.1
            ids = torch.cat([states, torch.ones(batch, where, 1)], dim=-1)  # last: token mask
        present = torch.ones(batch, 2)
        labels = torch.randint(0, 2, (batch, len(cfg.labels)), generator=g).float()
        out.append(tuple(t.to(device) for t in (image, ids, present, labels)))
    return out


def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    clear_refs = Path("/proc/self/clear_refs")
    if clear_refs.exists():
        clear_refs.write_text("5")  # resets VmHWM, the peak resident set, to the current


def _resident_memory(device: str) -> float:
    """Bytes in use now: CUDA allocations on a GPU, the resident set otherwise."""
    if device.startswith("cuda"):
        return float(torch.cuda.memory_allocated())
    return _proc_status("VmRSS:")


def _proc_status(key: str) -> float:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(key):
                return float(line.split()[1]) * 1024
    import resource  # Unix only: the fallback where /proc is missing (macOS)

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _peak_memory(device: str) -> float:
    """Peak bytes: CUDA allocations on a GPU, the process's resident set otherwise."""
    if device.startswith("cuda"):
        return float(torch.cuda.max_memory_allocated())
    return _proc_status("VmHWM:")


def _setup(spec: dict[str, Any]) -> tuple[Any, Any, Any, list[tuple[Any, ...]], dict[str, Any]]:
    """The spec's model, optimizer, loss and batches, made private unless mode is none."""
    device, mode = spec["device"], spec["mode"]
    torch.manual_seed(0)
    run = RunConfig.from_run_config(spec["overrides"])
    model = initial_model(run.model, run.seed).to(device).train()
    optimizer = make_optimizer(model, run)
    loss_fn = make_loss(None).to(device)
    logical = int(spec["batch"])
    count = int(spec["warmup"]) + int(spec["steps"])
    batches = _batches(run.model, logical, count, device, model)
    result: dict[str, Any] = {"mode": mode}
    if mode != "none":
        policy = PrivacyPolicy(
            enabled=True,
            target_epsilon=8.0,
            max_epsilon=8.0,
            delta=1e-5,
            max_grad_norm=1.0,
            accountant="rdp",
            grad_sample_mode=mode,
            secure_noise=bool(spec["secure_noise"]),
        )
        data = TensorDataset(*(torch.cat(parts) for parts in zip(*batches, strict=True)))
        private = make_private(
            model,
            optimizer,
            loss_fn,
            data,
            logical,
            policy,
            noise_multiplier=1.0,
            noise_generator=None
            if spec["secure_noise"]
            else torch.Generator(device).manual_seed(0),
        )
        result["resolved"] = private.grad_sample_mode
        model, optimizer, loss_fn = private.model, private.optimizer, private.loss_fn
    return model, optimizer, loss_fn, batches, result


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement (run in its own process): step times and peak memory."""
    warnings.filterwarnings("ignore")
    reuse_freed_memory()  # as a hospital's training does, with and without DP
    torch.set_num_threads(int(spec["threads"]))
    device, physical = spec["device"], int(spec.get("physical") or 0)
    model, optimizer, loss_fn, batches, result = _setup(spec)

    def step(batch: tuple[Any, ...]) -> None:
        train_step(model, optimizer, loss_fn, batch, physical)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    _reset_peak_memory(device)  # the peak of training alone, from what is resident now
    resident = _resident_memory(device)
    for batch in batches[: int(spec["warmup"])]:
        step(batch)
    times = []
    for batch in batches[int(spec["warmup"]) :]:
        started = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - started)
    peak = _peak_memory(device)
    result.update(times=times, peak_memory=peak, train_memory=max(peak - resident, 0.0))
    return result


# book-keeping's per-layer functions, by what they compute
_LAYER_PARTS = {
    "_conv2d_per_example": "convolutions, per-example gradients",
    "_conv2d_bounded": "convolutions, ghost norm + clipped sum",
    "_linear": "linear layers",
    "_embedding": "embeddings",
    "_normalization": "normalization layers",
    "_materialized": "other layers (Opacus's functions)",
}


def breakdown(spec: dict[str, Any], steps: int = 12) -> dict[str, Any]:
    """Where a bk step's time goes: the median milliseconds of each part per step.

    The non-DP and the DP step alternate in one process (``spec["mode"]`` is ignored);
    the first two of each are warm-up. Parts: the forward pass, the backward pass to the
    layers' outputs, each layer type's norms and clipped sums, the CSPRNG noise, and the
    rest of the optimizer step (Opacus's accumulate, scale, accountant and SGD).
    """
    warnings.filterwarnings("ignore")
    reuse_freed_memory()
    torch.set_num_threads(int(spec["threads"]))
    spent: dict[str, float] = {}

    def timed(part: str, fn: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] = spent.get(part, 0.0) + time.perf_counter() - started

        return run

    def layer(part: str, fn: Any) -> Any:  # (norms, finish): both count for the layer
        def run(*args: Any) -> Any:
            sq, finish = timed(part, fn)(*args)
            return sq, timed(part, finish)

        return run

    saved = {name: getattr(bk, name) for name in _LAYER_PARTS}, secure_noise._gaussian
    for name, part in _LAYER_PARTS.items():
        setattr(bk, name, layer(part, getattr(bk, name)))
    secure_noise._gaussian = timed("noise from the CSPRNG", secure_noise._gaussian)
    try:
        per_step = _alternate(spec, steps, timed, spent)
    finally:  # the library as it was (this runs inside tests too)
        for name, fn in saved[0].items():
            setattr(bk, name, fn)
        secure_noise._gaussian = saved[1]
    ms = {part: 1e3 * statistics.median(v) for part, v in per_step.items()}
    if "optimizer step" in ms:  # the noise is drawn inside the step: counted once
        ms["optimizer step"] -= ms.get("noise from the CSPRNG", 0.0)
    parts = sum(v for k, v in ms.items() if not k.startswith("step, "))
    ms["rest (loss, clipping factors, hooks)"] = ms["step, bk"] - parts
    return {"threads": spec["threads"], "batch": spec["batch"], "ms": ms}


def _alternate(
    spec: dict[str, Any], steps: int, timed: Any, spent: dict[str, float]
) -> dict[str, list[float]]:
    """Non-DP and bk steps in turn: each step's time, and the bk steps' parts."""
    plain = _setup({**spec, "mode": "none"})
    private = _setup({**spec, "mode": "bk"})
    model, optimizer = private[0], private[1]
    model.forward = timed("forward", model.forward)
    optimizer.step = timed("optimizer step", optimizer.step)
    grad = torch.autograd.grad
    per_step: dict[str, list[float]] = {}
    for i in range(steps):
        for name, (m, opt, loss_fn, batches, _) in (("none", plain), ("bk", private)):
            torch.autograd.grad = timed("backward to the layer outputs", grad)
            spent.clear()
            started = time.perf_counter()
            try:
                train_step(m, opt, loss_fn, batches[i % len(batches)], 0)
            finally:
                torch.autograd.grad = grad
            if i >= 2:
                per_step.setdefault(f"step, {name}", []).append(time.perf_counter() - started)
                for part, seconds in spent.items() if name == "bk" else ():
                    per_step.setdefault(part, []).append(seconds)
    return per_step


if __name__ == "__main__":
    if sys.argv[1] == "--breakdown":
        print(json.dumps(breakdown(json.loads(sys.argv[2])), indent=1))
    else:
        print(json.dumps(measure(json.loads(sys.argv[1]))))
