"""Coordinator-side subcommands of the ``fedfusion`` CLI (registered via entry points)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from server.bench import Measurement

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the coordinator's subcommands to the CLI."""
    app.command("simulate")(simulate)
    app.command("server")(server)
    app.command("bench")(bench)
    app.command("audit")(audit)
    certs = typer.Typer(
        help="Create the CA, the server's TLS certificate and the hospitals' key pairs.",
        no_args_is_help=True,
    )
    certs.command("init")(certs_init)
    certs.command("server")(certs_server)
    certs.command("hospital")(certs_hospital)
    app.add_typer(certs, name="certs")


_OUT = typer.Option("--out", "-o", help="Directory for the certificates and keys.")
_SANS = typer.Option(
    "--server-name",
    "-s",
    help="A DNS name or IP address hospitals use to reach the server (repeatable).",
)


def _run_certs(action: object) -> None:
    from server.certs import CertError

    try:
        created = action()  # type: ignore[operator]
    except CertError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    for role, paths in created.items():
        typer.echo(f"  {role:14s} {paths.key}  {paths.cert_or_public}")


def certs_init(
    out: Annotated[Path, _OUT] = Path("certs"),
    server_name: Annotated[list[str] | None, _SANS] = None,
    hospitals: Annotated[int, typer.Option(min=0, help="Key pairs hospital-0..N-1.")] = 3,
    hospital: Annotated[
        list[str] | None, typer.Option(help="Name a hospital's key pair instead (repeatable).")
    ] = None,
) -> None:
    """Create a CA, the SuperLink's certificate and one key pair per hospital.

    Private keys are written 0600 in 0700 directories; nothing is overwritten. Register
    each hospital's public key on the SuperLink with `flwr supernode register
    hospitals/NAME/NAME.pub CONNECTION`; give the hospital its NAME.key and ca.crt.
    """
    from server.certs import create_deployment

    names = hospital or [f"hospital-{i}" for i in range(hospitals)]
    sans = server_name or ["127.0.0.1", "localhost"]
    _run_certs(lambda: create_deployment(out, sans, names))
    typer.echo(f"created under {out} (server names: {', '.join(sans)})")


def certs_server(
    out: Annotated[Path, _OUT] = Path("certs"),
    server_name: Annotated[list[str] | None, _SANS] = None,
) -> None:
    """Create the SuperLink's TLS key and certificate, signed by the CA in OUT/ca."""
    from server.certs import create_server_cert

    sans = server_name or ["127.0.0.1", "localhost"]
    _run_certs(lambda: {"server": create_server_cert(out, sans)})


def certs_hospital(
    name: Annotated[str, typer.Argument(help="The hospital's name, e.g. st-mary.")],
    out: Annotated[Path, _OUT] = Path("certs"),
) -> None:
    """Create one hospital's key pair (run it at the hospital; send only the .pub)."""
    from server.certs import create_hospital_key

    _run_certs(lambda: {name: create_hospital_key(out, name)})


def server(
    config: Annotated[Path, typer.Option("--config", "-c", help="The server's TOML file.")],
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Flower's full log.")
    ] = False,
    new_run: Annotated[
        bool,
        typer.Option(
            "--new-run", help="Start a new run even if the latest one is unfinished (not resumed)."
        ),
    ] = False,
) -> None:
    """Run the federation for real: SuperLink, hospital registration, the rounds.

    The file's [server] table gives the address, the state directory, the TLS files
    from `fedfusion certs` and the hospitals' public keys to register; [run] holds run
    settings (the keys of `fedfusion simulate -c`). If the state directory's latest run
    is unfinished (the server was killed, or the run failed), it is resumed after its
    last complete round. Exits non-zero if the run failed.
    """
    from server.deploy import INSECURE_WARNING, run_server
    from server.report import summary_table
    from server.simulation import failed_replies
    from shared_model.config import ConfigError, ServerDeployConfig
    from shared_model.model import base_fingerprint, initial_model

    try:
        cfg, run, settings = ServerDeployConfig.from_file(config)
        # weight files: fail before anything starts
        base_hash = base_fingerprint(initial_model(run.model, run.seed))
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    if cfg.insecure:
        typer.secho(INSECURE_WARNING, fg=typer.colors.RED, err=True)
    try:
        result = run_server(
            cfg,
            run,
            settings,
            echo=typer.echo,
            verbose=verbose,
            base_hash=base_hash,
            new_run=new_run,
        )
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    if result.rounds:
        typer.echo("\n" + summary_table(result.rounds))
        lost = failed_replies(result.rounds)
        if lost:
            typer.secho(f"note: {lost}", fg=typer.colors.YELLOW)
    typer.echo(f"\nrun directory: {result.run_dir}")
    if not result.ok:
        for problem in result.problems:
            typer.secho(f"FAILED: {problem}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def simulate(
    hospitals: Annotated[
        int, typer.Option("--hospitals", "-n", min=1, help="Simulated hospitals (SuperNodes).")
    ] = 3,
    rounds: Annotated[int, typer.Option("--rounds", "-r", min=1, help="Federated rounds.")] = 3,
    run_config: Annotated[
        list[str] | None,
        typer.Option(
            "--run-config",
            "-c",
            help="Override run settings: 'key=value key2=value2' (TOML values; repeatable). "
            "Keys are those of [tool.flwr.app.config] in pyproject.toml, e.g. "
            "'model.fusion=\"cross_attention\" privacy.target-epsilon=3'.",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="A seed system's model: cnn-lstm-concat, cross-attention or gated "
            "(settings given with -c win).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Run directory (default: runs/YYYYmmdd-HHMMSS, in UTC). New or empty, or "
            "holding an unfinished run (killed or failed), which is then resumed.",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Stop the run after this many seconds.")] = 1800,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Flower's full log, not just progress.")
    ] = False,
    tolerate_failures: Annotated[
        bool, typer.Option(help="Count a run as successful even if some hospital replies failed.")
    ] = False,
) -> None:
    """Simulate a federation of hospitals on this machine, on the embedded default data.

    Each simulated hospital holds a non-IID share of 3,860 real Indiana University chest
    X-ray reports, paired with synthetic phantom radiographs drawn from each report's
    labels, and trains the shared fusion model under DP-SGD (Opacus) against its own
    privacy budget. The server averages the updates (FedAvg). Progress is printed per
    round; at the end comes a summary table (global loss, macro AUROC, each hospital's
    cumulative epsilon) and the paths of the report, plots and final model. Exits
    non-zero if the run failed.
    """
    from server.report import summary_table
    from server.simulation import parse_overrides, run_simulation_cli
    from shared_model.config import PRESETS, ConfigError

    if preset is not None and preset not in PRESETS:
        typer.secho(f"error: --preset {preset!r} is not one of {', '.join(PRESETS)}", err=True)
        raise typer.Exit(2)
    out = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    try:
        overrides = {**PRESETS.get(preset or "", {}), **parse_overrides(run_config or [])}
        result = run_simulation_cli(
            hospitals=hospitals,
            rounds=rounds,
            overrides=overrides,
            out=out,
            timeout=timeout,
            verbose=verbose,
            tolerate_failures=tolerate_failures,
            echo=typer.echo,
        )
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    if result.rounds:
        typer.echo("\n" + summary_table(result.rounds))
    typer.echo(f"\nfinished in {result.seconds:.0f}s; run directory: {result.run_dir}")
    for name in ("report.md", "global_model.safetensors"):
        if (result.run_dir / name).exists():
            typer.echo(f"  {name:26s} {result.run_dir / name}")
    if (result.run_dir / "hospitals").exists():
        typer.echo(
            f"  {'privacy ledgers':26s} {result.run_dir / 'hospitals'}/*/privacy_ledger.json"
        )
    if not result.ok:
        for problem in result.problems:
            typer.secho(f"FAILED: {problem}", fg=typer.colors.RED, err=True)
        typer.echo(f"full log: {result.run_dir / 'simulation.log'}", err=True)
        raise typer.Exit(1)


def bench(
    suite: Annotated[
        str,
        typer.Option(
            help="perf: DP step cost, SecAgg+ and deployment cost, scale, then bytes per "
            "encoder mode. dp: only the DP step cost (time and memory per clipping method). "
            "bytes: only bytes per encoder mode. audit: membership inference, "
            "non-private vs DP (make audit). utility: AUROC of centralized, federated, DP, "
            "SecAgg+ and single-branch models over 3 seeds (make bench-utility)."
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
        "bench-results"
    ),
    modes: Annotated[
        str,
        typer.Option(
            help="--suite utility: the models to compare, comma-separated: small (the "
            "default model), frozen and lora (pretrained encoders)."
        ),
    ] = "small,frozen,lora",
    device: Annotated[
        str, typer.Option(help="Where the DP step measurements train: cpu, or cuda[:N].")
    ] = "cpu",
    scale: Annotated[
        str,
        typer.Option(
            help="--suite perf or scale: the large simulated federations (DP and SecAgg+ "
            "on, all embedded data), comma-separated; empty to skip."
        ),
    ] = "10,50,100",
) -> None:
    """Measure what SecAgg+ and a real deployment cost: round time and bytes per hospital.

    Plain and SecAgg+ federations of the same hospitals and data run side by side
    (simulated at each size, and deployed on loopback with TLS at the smallest), and
    every figure is reported as a median over rounds with its ratio to the baseline
    measured in the same run. Writes bench-results/perf-<time>.json and latest-perf.md.

    --suite audit trains a deliberately overfitted non-private federation and the default
    DP one (epsilon = 8) and runs the membership-inference audit against both; it writes
    audit-<time>.json and latest-audit.md.
    """
    from server.bench import (
        UTILITY_CONFIGS,
        UTILITY_MODES,
        run_audit_bench,
        run_first_result_bench,
        run_mode_bytes_bench,
        run_scale_bench,
        run_utility_bench,
        run_wire_bench,
        table,
        write_results,
        write_utility,
    )
    from server.bench_dp import run_dp_bench, run_memory_bench

    if suite not in {"perf", "dp", "scale", "bytes", "audit", "utility"}:
        typer.secho(
            f"error: --suite: {suite!r} is not perf, dp, scale, bytes, audit or utility",
            err=True,
        )
        raise typer.Exit(2)
    if device != "cpu":
        import torch

        if not device.startswith("cuda") or not torch.cuda.is_available():
            typer.secho(f"error: --device {device!r}: no CUDA device here; use cpu", err=True)
            raise typer.Exit(2)
    if suite == "utility":
        chosen = [m.strip() for m in modes.split(",") if m.strip()]
        if not chosen or any(m not in UTILITY_MODES for m in chosen):
            typer.secho(
                f"error: --modes: {modes!r}; choose from {', '.join(UTILITY_MODES)}", err=True
            )
            raise typer.Exit(2)
        count = sum(c.mode in chosen for c in UTILITY_CONFIGS)
        typer.echo(f"fedfusion bench: utility, {count} configurations x 3 seeds")
        started = time.monotonic()
        try:
            entries = run_utility_bench(echo=typer.echo, modes=chosen)
        except RuntimeError as err:
            typer.secho(f"FAILED: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from err
        paths = write_utility(entries, out)
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
    started = time.monotonic()
    parts: list[tuple[str, Callable[[], list[Measurement]]]]
    if suite == "audit":
        typer.echo("fedfusion bench: membership-inference audit, non-private vs DP")
        parts = [("audit", lambda: run_audit_bench(min(sizes), echo=typer.echo))]
    elif suite == "scale":
        typer.echo(f"fedfusion bench: {scale_sizes} simulated hospitals, plain vs SecAgg+")
        parts = [("scale", lambda: run_scale_bench(scale_sizes, echo=typer.echo))]
    elif suite == "bytes":
        typer.echo("fedfusion bench: bytes per round for each encoder mode")
        parts = [("bytes", lambda: run_mode_bytes_bench(min(sizes), echo=typer.echo))]
    else:
        parts = [
            ("dp", lambda: run_dp_bench(device=device, echo=typer.echo)),
            ("memory", lambda: run_memory_bench(device=device, echo=typer.echo)),
        ]
        if suite == "dp":
            typer.echo("fedfusion bench: DP step time and memory per clipping method")
        else:
            typer.echo(
                f"fedfusion bench: DP step cost; plain vs SecAgg+ at {sizes} hospitals, "
                f"{rounds} rounds each, {reports} reports per hospital, simulated and "
                f"deployed; {scale_sizes} simulated hospitals; bytes per encoder mode"
            )
            parts.append(
                (
                    "secagg and deployment",
                    lambda: run_wire_bench(sizes, rounds, deploy, echo=typer.echo, reports=reports),
                )
            )
            if scale_sizes:
                parts.append(("scale", lambda: run_scale_bench(scale_sizes, echo=typer.echo)))
            parts.append(("first result", lambda: run_first_result_bench(echo=typer.echo)))
            parts.append(("bytes", lambda: run_mode_bytes_bench(min(sizes), echo=typer.echo)))
    # Each part's figures are written as soon as it ends, and a part that fails is
    # reported and recorded while the others still run: a late failure loses nothing.
    measurements: list[Measurement] = []
    failures: list[str] = []
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for name, part in parts:
        try:
            measurements += part()
        except RuntimeError as err:
            failures.append(f"{name}: {err}")
            typer.secho(f"FAILED ({name}): {err}", fg=typer.colors.RED, err=True)
        json_path, md_path = write_results(measurements, out, suite, stamp, failures)
    typer.echo("\n" + table(measurements))
    typer.echo(f"\n{time.monotonic() - started:.0f}s; results: {json_path} and {md_path}")
    if failures:
        typer.secho(f"{len(failures)} part(s) failed: see above", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


def audit(
    run_dir: Annotated[Path, typer.Argument(help="A finished `fedfusion simulate` run.")],
    hospitals: Annotated[
        int | None, typer.Option(min=1, help="Hospitals of the run (default: from its metrics).")
    ] = None,
) -> None:
    """Membership-inference audit of a run's final model: attack AUC and TPR at low FPR.

    Each simulated hospital's training records are the members, its held-out records the
    non-members. Two attacks score every record: its loss under the final model, and how
    much training lowered that loss since round 0. The result goes to RUN_DIR/audit.json.
    """
    import json

    from server.audit import audit_run
    from shared_model.config import ConfigError

    try:
        result = audit_run(run_dir, hospitals)
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    typer.echo(
        f"{result.members} members, {result.non_members} non-members, {result.hospitals} hospitals"
    )
    typer.echo("attack            AUC (95% CI)           TPR@1%FPR  TPR@0.1%FPR")
    for name, r in result.attacks.items():
        low, high = r.auc_ci95
        typer.echo(
            f"{name:16s}  {r.auc:.3f} ({low:.3f}-{high:.3f})    "
            f"{r.tpr_at_fpr['0.01']:9.3f}  {r.tpr_at_fpr['0.001']:11.3f}"
        )
    path = Path(run_dir) / "audit.json"
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    typer.echo(f"0.5 is a coin toss. Written to {path}")
