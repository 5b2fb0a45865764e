"""``python -m benchmarks``: the measurements of ``make bench``, ``bench-utility`` and ``audit``.

Never installed with fedfusion: it runs from a source checkout, against the installed
product.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from client.node.audit_cli import audit_simulated
from shared_model.progress import progress

if TYPE_CHECKING:
    from benchmarks.report import Measurement

__all__ = ["app", "bench"]


NO_GPU = (
    "bench gpu: no CUDA GPU here (torch {torch} sees none); to run every part on the CPU "
    "instead: python -m benchmarks --suite gpu --device cpu --out DIR"
)


def _device(device: str, suite: str) -> str:
    """The device the suite runs on: ``--device`` resolved, or the suite's default.

    --suite gpu without --device ends here, exit code 0 and one line, where there is no
    GPU. A GPU asked for where there is none falls back to the CPU with a warning; a
    device that cannot be (``gpu``, ``cuda:7`` on a machine of 2) exits with code 2.
    """
    if suite == "gpu" and not device:
        # torch alone, before the suites load: without a GPU this suite ends at once
        import torch

        if not torch.cuda.is_available():
            typer.echo(NO_GPU.format(torch=torch.__version__))
            raise typer.Exit(0)
        device = "cuda"
    if not device or device == "cpu":
        return "cpu"
    # torch loads only for a GPU; the suites load it anyway
    from shared_model.config import ConfigError
    from shared_model.devices import resolve_device

    try:
        return str(resolve_device(device, "--device"))
    except ConfigError as err:
        typer.secho(f"error: {err}", err=True)
        raise typer.Exit(2) from err


def bench(
    suite: Annotated[
        str,
        typer.Option(
            help="perf: DP step cost, SecAgg+ and deployment cost, scale, then bytes per "
            "encoder mode. dp: only the DP step cost (time and memory per clipping method). "
            "secagg: only SecAgg+ and deployment cost (plain vs SecAgg+, simulated vs "
            "deployed). scale: only the large simulated federations. first: only the time "
            "to a first result. phantoms: how hard "
            "the synthetic radiographs are (a centralized image-only model, 3 seeds). "
            "bytes: only bytes per encoder mode. audit: the one-run privacy audit, an "
            "epsilon lower bound beside the accounted one (make audit). mia: membership "
            "inference, non-private vs DP. utility: AUROC of centralized, DP + SecAgg+ "
            "and single-branch models at convergence, over 5 seeds, fusion compared seed by "
            "seed (make bench-utility). held-out: the pooled AUROC's error when hospitals noise "
            "their held-out statistics (the pretrained recipe, 100 noise draws). patients: "
            "privacy per patient vs per record on data of 2 to 5 studies a patient "
            "(mechanisms at one hospital, then a federation). gpu: on one CUDA GPU, the DP "
            "step of the default model and of LoRA, 3 hospitals x 2 rounds of DP + SecAgg+ "
            "training on it, and predict on the exported model (make bench-gpu; with "
            "--device cpu, every part at the smallest sizes)."
        ),
    ] = "perf",
    hospitals: Annotated[
        str,
        typer.Option(
            help="Simulated vs deployed federation sizes (plain vs SecAgg+), comma-separated."
        ),
    ] = "3",
    rounds: Annotated[
        int, typer.Option(min=2, help="Rounds per run; round 1 is warm-up and not counted.")
    ] = 4,
    reports: Annotated[
        int, typer.Option(min=50, help="Reports (records) per hospital, simulated and deployed.")
    ] = 300,
    deploy: Annotated[
        bool, typer.Option(help="Also run a loopback TLS deployment of the smallest size.")
    ] = True,
    out: Annotated[Path, typer.Option("--out", "-o", help="Results directory.")] = Path(
        "benchmarks/results"
    ),
    modes: Annotated[
        str,
        typer.Option(
            help="--suite utility: the models to compare, comma-separated: frozen (pretrained "
            "encoders, frozen, features cached, concatenated), frozen-late (the same, fused "
            "late), small (the run config's default model, trained from scratch, at fixed "
            "settings) and lora."
        ),
    ] = "frozen,small",
    configs: Annotated[
        str,
        typer.Option(
            help="--suite utility: which configurations, comma-separated: central, "
            "federated, dp1, dp3, dp8, dp8-secagg, image, text, or all (default: central, "
            "dp8-secagg, image, text; the small model: central, dp8-secagg)."
        ),
    ] = "",
    grid: Annotated[
        str,
        typer.Option(
            help="--suite utility: the search, e.g. 'train.learning-rate=0.1/0.4 "
            "privacy.max-grad-norm=1' (keys not given keep the default grid)."
        ),
    ] = "",
    quick: Annotated[
        bool,
        typer.Option(
            help="--suite utility: a smoke run (3 rounds, 1 seed, 600 reports, one search "
            "point, four configurations), to check the pipeline, not to read its numbers."
        ),
    ] = False,
    device: Annotated[
        str,
        typer.Option(
            help="Where the DP step measurements (--suite gpu: every part) run: cpu, cuda, "
            "cuda:N or auto; without a GPU, cpu. Default: cpu; --suite gpu: cuda, and "
            "without a GPU it says so and ends."
        ),
    ] = "",
    scale: Annotated[
        str,
        typer.Option(
            help="--suite perf or scale: the large simulated federations (DP and SecAgg+ "
            "on, all embedded data), comma-separated; empty to skip."
        ),
    ] = "10,50,100",
) -> None:
    """Measure what SecAgg+ and a real deployment cost: round time and bytes per hospital.

    ``python -m benchmarks`` (``make bench``). Plain and SecAgg+ federations of the same
    hospitals and data run side by side (simulated at each size, and deployed on loopback
    with TLS at the smallest), and every figure is reported as a median over rounds with
    its ratio to the baseline measured in the same run. Writes
    benchmarks/results/perf.json and perf.md (the latest
    run only; earlier runs are in git history).

    --suite audit runs the one-run privacy audit as `fedfusion audit --simulated` does
    (client/audit/one_run.py) and writes audit.json, audit.md and audit.png; exit status
    4 if a correct DP run is flagged, 3 if a control is not caught. --suite mia trains a
    deliberately overfitted non-private federation and the default DP one and runs the
    membership-inference attacks against both (mia.json, mia.md).

    --suite gpu (make bench-gpu) checks and measures fedfusion on one CUDA GPU in under 5
    minutes (benchmarks/gpu.py): gpu.json and gpu.md.
    """
    suites = (
        "perf",
        "dp",
        "secagg",
        "scale",
        "first",
        "bytes",
        "phantoms",
        "audit",
        "mia",
        "utility",
        "held-out",
        "patients",
        "gpu",
    )
    if suite not in suites:
        typer.secho(f"error: --suite: {suite!r} is not one of {', '.join(suites)}", err=True)
        raise typer.Exit(2)
    device = _device(device, suite)
    # The suites load here, not at import: --help and a bad option answer without torch
    # and Flower.
    from benchmarks.dp import run_dp_suite, run_memory_bench
    from benchmarks.federation import (
        run_audit_bench,
        run_first_result_bench,
        run_mode_bytes_bench,
        run_scale_bench,
        run_wire_bench,
    )
    from benchmarks.gpu import GpuBench
    from benchmarks.held_out import run_held_out_bench
    from benchmarks.patients import run_patients_bench
    from benchmarks.phantoms import run_phantom_calibration
    from benchmarks.report import table, write_results
    from benchmarks.secagg_protocol import run_protocol_bench
    from benchmarks.utility import (
        CONFIG_KEYS,
        SEEDS,
        SMALL_PRIVATE_SEEDS,
        UTILITY_CONFIGS,
        UTILITY_MODES,
        parse_grid,
        quick_plan,
        run_utility_bench,
        utility_settings,
        wanted,
        write_utility,
    )

    if suite == "utility":
        chosen = [m.strip() for m in modes.split(",") if m.strip()]
        if not chosen or any(m not in UTILITY_MODES for m in chosen):
            typer.secho(
                f"error: --modes: {modes!r}; choose from {', '.join(UTILITY_MODES)}", err=True
            )
            raise typer.Exit(2)
        plan = quick_plan() if quick else {}
        try:
            if grid:
                plan["grid"] = parse_grid(grid)
            if configs == "all":
                plan["names"] = None
            elif configs:
                keys = {v: k for k, v in CONFIG_KEYS.items()}
                asked = [c.strip() for c in configs.split(",") if c.strip()]
                unknown = [c for c in asked if c not in keys]
                if unknown:
                    raise ValueError(f"unknown {unknown}; choose from {', '.join(keys)}")
                plan["names"] = [keys[c] for c in asked]
        except ValueError as err:
            typer.secho(f"error: --grid/--configs: {err}", err=True)
            raise typer.Exit(2) from err
        count = sum(c.mode in chosen and wanted(c, plan.get("names", ())) for c in UTILITY_CONFIGS)
        typer.echo(
            f"bench: utility, {count} configurations of {', '.join(chosen)}: each searched on "
            "a validation split (the small model: fixed settings), then trained over "
            f"{len(plan.get('seeds') or SEEDS)} seeds (the small model's private ones: "
            f"{len(SMALL_PRIVATE_SEEDS)})"
        )
        started = time.monotonic()
        try:
            entries = run_utility_bench(echo=typer.echo, modes=chosen, **plan)
        except RuntimeError as err:
            typer.secho(f"FAILED: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from err
        paths = write_utility(entries, out, settings=utility_settings(plan))
        typer.echo("\n" + paths[1].read_text())
        typer.echo(f"{time.monotonic() - started:.0f}s; results: {', '.join(map(str, paths))}")
        return

    try:
        sizes = [int(part) for part in hospitals.split(",") if part.strip()]
    except ValueError as err:
        typer.secho(f"error: --hospitals: {hospitals!r} is not a list of numbers", err=True)
        raise typer.Exit(2) from err
    try:
        scale_sizes = [int(part) for part in scale.split(",") if part.strip()]
    except ValueError as err:
        typer.secho(f"error: --scale: {scale!r} is not a list of numbers", err=True)
        raise typer.Exit(2) from err
    if not sizes or min(sizes + scale_sizes) < 3:
        typer.secho(
            "error: --hospitals/--scale: SecAgg+ needs at least 3 hospitals per run", err=True
        )
        raise typer.Exit(2)
    if suite == "audit":  # what `fedfusion audit --simulated` runs: progress, table, exit status
        audit_simulated(out)
        return
    started = time.monotonic()
    gpu = GpuBench(device, echo=typer.echo) if suite == "gpu" else None
    parts: list[tuple[str, Callable[[], list[Measurement]]]]
    wire = (
        "secagg and deployment",
        lambda: run_wire_bench(sizes, rounds, deploy, echo=typer.echo, reports=reports),
    )
    protocol = ("secagg protocol", lambda: run_protocol_bench(echo=typer.echo))
    if suite == "mia":
        typer.echo("bench: membership-inference audit, non-private vs DP")
        parts = [("mia", lambda: run_audit_bench(min(sizes), echo=typer.echo))]
    elif suite == "secagg":
        typer.echo(
            f"bench: plain vs SecAgg+ at {sizes} hospitals, simulated and deployed; SecAgg+ "
            "before and with the defence against a lying server"
        )
        parts = [wire, protocol]
    elif suite == "held-out":
        typer.echo("bench: pooled AUROC under hospitals' held-out noise, 100 draws")
        parts = [("held-out", lambda: run_held_out_bench(echo=typer.echo))]
    elif suite == "patients":
        typer.echo("bench: privacy per patient vs per record, 2 to 5 studies a patient")
        parts = [("patients", lambda: run_patients_bench(echo=typer.echo))]
    elif suite == "phantoms":
        typer.echo("bench: phantom difficulty, a centralized image-only model over 3 seeds")
        parts = [("phantoms", lambda: run_phantom_calibration(echo=typer.echo))]
    elif suite == "scale":
        typer.echo(f"bench: {scale_sizes} simulated hospitals, plain vs SecAgg+")
        parts = [("scale", lambda: run_scale_bench(scale_sizes, echo=typer.echo))]
    elif suite == "first":
        typer.echo("bench: time to first result (fedfusion simulate with its defaults)")
        parts = [("first result", lambda: run_first_result_bench(echo=typer.echo))]
    elif suite == "bytes":
        typer.echo("bench: bytes per round for each encoder mode")
        parts = [("bytes", lambda: run_mode_bytes_bench(min(sizes), echo=typer.echo))]
    elif gpu is not None:
        typer.echo(
            f"bench: on {device}: the DP step (default model, LoRA), 3 hospitals x 2 rounds "
            "of DP + SecAgg+ training there, predict with the exported model"
        )
        parts = gpu.parts()
    else:
        parts = [
            ("dp", lambda: run_dp_suite(device=device, echo=typer.echo)),
            ("memory", lambda: run_memory_bench(device=device, echo=typer.echo)),
        ]
        if suite == "dp":
            typer.echo("bench: DP step time and memory per clipping method")
        else:
            typer.echo(
                f"bench: DP step cost; plain vs SecAgg+ at {sizes} hospitals, "
                f"{rounds} rounds each, {reports} reports per hospital, simulated and "
                f"deployed; {scale_sizes} simulated hospitals; bytes per encoder mode"
            )
            parts += [wire, protocol]
            if scale_sizes:
                parts.append(("scale", lambda: run_scale_bench(scale_sizes, echo=typer.echo)))
            parts.append(("first result", lambda: run_first_result_bench(echo=typer.echo)))
            parts.append(("bytes", lambda: run_mode_bytes_bench(min(sizes), echo=typer.echo)))
    # Each part's figures are written as soon as it ends, and a part that fails is
    # reported and recorded while the others still run: a late failure loses nothing.
    measurements: list[Measurement] = []
    failures: list[str] = []
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    # a CPU run of the GPU suite is a check, never written over a GPU's figures
    name = "gpu-cpu" if gpu is not None and not gpu.on_gpu else suite
    facts = gpu.facts() if gpu is not None else None
    try:
        with progress(len(parts), "parts") as advance:
            for part_name, part in parts:
                try:
                    measurements += part()
                except RuntimeError as err:
                    failures.append(f"{part_name}: {err}")
                    typer.secho(f"FAILED ({part_name}): {err}", fg=typer.colors.RED, err=True)
                json_path, md_path = write_results(measurements, out, name, stamp, failures, facts)
                advance(f"bench {suite}", 1)
    finally:
        if gpu is not None:
            gpu.close()
    # the GPU suite's file names its device and versions: printed whole
    typer.echo("\n" + (md_path.read_text() if gpu is not None else table(measurements)))
    typer.echo(f"\n{time.monotonic() - started:.0f}s; results: {json_path} and {md_path}")
    if failures:
        typer.secho(f"{len(failures)} part(s) failed: see above", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


app = typer.Typer(add_completion=False)
app.command()(bench)
