"""Coordinator-side subcommands of the ``fedfusion`` CLI (registered via entry points)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from server.app.report import summary_table
from server.commands.config import ServerDeployConfig
from server.commands.superlink import failed_replies
from shared_model.config import PRESETS, SIMULATE_DEFAULTS, ConfigError, parse_overrides

# Every `fedfusion` call imports this module to list its commands: what loads torch,
# Flower, MLflow or cryptography is imported inside the command that needs it.

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the coordinator's subcommands to the CLI."""
    app.command("simulate")(simulate)
    app.command("server")(server)
    app.command("export")(export)
    certs = typer.Typer(
        help="Create the CA, the server's TLS certificate and the hospitals' key pairs.",
        no_args_is_help=True,
    )
    certs.command("init")(certs_init)
    certs.command("server")(certs_server)
    certs.command("hospital")(certs_hospital)
    certs.command("members")(certs_members)
    app.add_typer(certs, name="certs")


_OUT = typer.Option("--out", "-o", help="Directory for the certificates and keys.")
_SANS = typer.Option(
    "--server-name",
    "-s",
    help="A DNS name or IP address hospitals use to reach the server (repeatable).",
)


def _run_certs(action: object) -> None:
    from server.commands.certs import CertError  # cryptography: the certs commands only

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
    from server.commands.certs import create_deployment  # cryptography: the certs commands only

    names = hospital or [f"hospital-{i}" for i in range(hospitals)]
    sans = server_name or ["127.0.0.1", "localhost"]
    _run_certs(lambda: create_deployment(out, sans, names))
    typer.echo(f"created under {out} (server names: {', '.join(sans)})")


def certs_server(
    out: Annotated[Path, _OUT] = Path("certs"),
    server_name: Annotated[list[str] | None, _SANS] = None,
) -> None:
    """Create the SuperLink's TLS key and certificate, signed by the CA in OUT/ca."""
    from server.commands.certs import create_server_cert  # cryptography: the certs commands only

    sans = server_name or ["127.0.0.1", "localhost"]
    _run_certs(lambda: {"server": create_server_cert(out, sans)})


def certs_hospital(
    name: Annotated[str, typer.Argument(help="The hospital's name, e.g. st-mary.")],
    out: Annotated[Path, _OUT] = Path("certs"),
) -> None:
    """Create one hospital's key pair (run it at the hospital; send only the .pub)."""
    from server.commands.certs import create_hospital_key  # cryptography: the certs commands only

    _run_certs(lambda: {name: create_hospital_key(out, name)})


def certs_members(
    public_keys: Annotated[list[Path], typer.Argument(help="Each hospital's NAME.pub file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The members file.")] = Path(
        "members.toml"
    ),
) -> None:
    """Write the federation's members file from the hospitals' public keys.

    Every hospital keeps a copy (its file's secagg-members, or members.toml beside its
    key): SecAgg+ key shares go only to hospitals it lists. Compare the fingerprints
    printed here with each hospital directly, not through the coordinator.
    """
    from server.commands.certs import create_members  # cryptography: the certs commands only

    prints: dict[str, str] = {}
    _run_certs(lambda: prints.update(create_members(out, public_keys)) or {})
    for name, value in sorted(prints.items()):
        typer.echo(f"  {name:<24} {value}")
    typer.echo(f"wrote {out} ({len(prints)} hospitals)")


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
    tracking: Annotated[
        bool | None,
        typer.Option(
            "--tracking/--no-tracking",
            help="Log the run to MLflow (default: server.tracking in the file, on).",
            show_default=False,
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI (default: server.tracking-uri in the file)."),
    ] = None,
) -> None:
    """Run the federation for real: SuperLink, hospital registration, the rounds.

    The file's [server] table gives the address, the state directory, the TLS files
    from `fedfusion certs` and the hospitals' public keys to register; [run] holds run
    settings (the keys of `fedfusion simulate -c`). If the state directory's latest run
    is unfinished (the server was killed, or the run failed), it is resumed after its
    last complete round. Exits non-zero if the run failed.
    """
    # Flower and torch load with the command (see the note at the top)
    from server.app.tracking import tracking_env
    from server.commands.serve import INSECURE_WARNING, run_server
    from shared_model.weights import base_fingerprint, initial_model

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
            server_file=config,
            tracking=tracking_env(
                cfg.tracking_uri if tracking_uri is None else tracking_uri,
                cfg.tracking_experiment,
                cfg.tracking if tracking is None else tracking,
            ),
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
    _show_tracking(result.run_dir)
    if not result.ok:
        for problem in result.problems:
            typer.secho(f"FAILED: {problem}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


_TRACKING = typer.Option(
    "--tracking/--no-tracking", help="Log the run to MLflow (parameters, rounds, artifacts)."
)
_TRACKING_URI = typer.Option(
    help="MLflow tracking URI; default: the SQLite store mlflow.db beside the run directory."
)
_EXPERIMENT = typer.Option(help="MLflow experiment the run is logged under.")


def _show_tracking(run_dir: Path) -> None:
    """Where the run was logged, and how to look at it."""
    from server.app.tracking import TRACKING_FILE  # imports Flower: a run's commands only

    path = run_dir / TRACKING_FILE
    try:
        info = json.loads(path.read_text("utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        info = None
    if info:
        typer.echo(f"  {'MLflow run':26s} {info.get('run_id')} in {info.get('uri')}")


def simulate(
    hospitals: Annotated[
        int, typer.Option("--hospitals", "-n", min=1, help="Simulated hospitals (SuperNodes).")
    ] = 3,
    rounds: Annotated[int, typer.Option("--rounds", "-r", min=1, help="Federated rounds.")] = 15,
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
            help="Named model settings: efficientnet-minilm-concat, cnn-transformer-concat "
            "(the run config's default model), cnn-transformer-gated, "
            "cnn-transformer-cross-attention or cnn-lstm-concat (settings given with -c "
            "win). Without it: efficientnet-minilm-concat with train.learning-rate=0.1 "
            "privacy.max-grad-norm=2.0, which learns in a short run.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Run directory (default: runs/YYYYmmdd-HHMMSS, in UTC, with runs/latest "
            "pointing at it). New or empty, or "
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
    tracking: Annotated[bool, _TRACKING] = True,
    tracking_uri: Annotated[str, _TRACKING_URI] = "",
    experiment: Annotated[str, _EXPERIMENT] = "fedfusion",
) -> None:
    """Simulate a federation of hospitals on this machine, on the embedded default data.

    Each simulated hospital holds a non-IID share of 3,860 real Indiana University chest
    X-ray reports, paired with synthetic phantom radiographs drawn from each report's
    labels, and trains the shared fusion model under DP-SGD (Opacus) against its own
    privacy budget; without --preset, the frozen pretrained encoders of
    efficientnet-minilm-concat, whose features are computed once and cached beside the
    run directory. The server averages the updates and steps with server momentum
    (FedAvgM). Progress is printed per round; at the end comes a summary table (global
    loss, macro AUROC, each hospital's cumulative epsilon) and the paths of the report,
    plots and final model. Exits non-zero if the run failed.
    """
    # Flower and torch load with the command (see the note at the top)
    from server.app.tracking import tracking_env
    from server.commands.simulate import run_simulation_cli

    if preset is not None and preset not in PRESETS:
        typer.secho(f"error: --preset {preset!r} is not one of {', '.join(PRESETS)}", err=True)
        raise typer.Exit(2)
    shown = out
    if out is None:
        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        _point_latest_at(out)
        shown = out.parent / "latest"
    try:
        chosen = SIMULATE_DEFAULTS if preset is None else PRESETS[preset]
        overrides = {**chosen, **parse_overrides(run_config or [])}
        result = run_simulation_cli(
            hospitals=hospitals,
            rounds=rounds,
            overrides=overrides,
            out=out,
            timeout=timeout,
            verbose=verbose,
            tolerate_failures=tolerate_failures,
            echo=typer.echo,
            tracking=tracking_env(tracking_uri, experiment, tracking),
            live=True,
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
    _show_tracking(result.run_dir)
    if not result.ok:
        for problem in result.problems:
            typer.secho(f"FAILED: {problem}", fg=typer.colors.RED, err=True)
        typer.echo(f"full log: {result.run_dir / 'flwr-run.log'}", err=True)
        raise typer.Exit(1)
    if (result.run_dir / "global_model.safetensors").exists():
        typer.echo(f"use the model: fedfusion export {shown} --out model (then predict, evaluate)")


def _point_latest_at(run_dir: Path) -> None:
    """Make ``runs/latest`` a link to the newest default run directory (atomically).

    A real folder of that name (not the link this keeps) is left alone, with a note.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    link, tmp = run_dir.parent / "latest", run_dir.parent / ".latest.tmp"
    if link.is_dir() and not link.is_symlink():
        typer.secho(
            f"note: {link} is a folder, not the link to the newest run that simulate keeps; "
            "left as it is",
            fg=typer.colors.YELLOW,
            err=True,
        )
        return
    # Not shared_model.files: that writes a file's bytes; this swaps a link to a folder.
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    tmp.replace(link)


def export(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (`fedfusion simulate` or `fedfusion server`).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The bundle folder to create.")],
    round_: Annotated[
        str,
        typer.Option(
            "--round",
            help="best (the highest pooled held-out macro AUROC), final, or a round number.",
        ),
    ] = "best",
    operating_point: Annotated[
        str,
        typer.Option(
            help="Decision thresholds: youden, sensitivity=X, specificity=X or probability=X "
            "(X between 0 and 1)."
        ),
    ] = "youden",
    min_hospitals: Annotated[
        int,
        typer.Option(
            min=3,
            help="Publish pooled figures and thresholds, and choose the best round, only "
            "from at least this many hospitals' held-out statistics (3 at least: with two, "
            "each could subtract its own).",
        ),
    ] = 3,
) -> None:
    """Export a trained model as a bundle a hospital can use: weights, settings, model card.

    The bundle holds the trained weights, the model settings, label names, the
    tokenizer's identity and the preprocessing, per-label decision thresholds chosen on
    the federation's pooled held-out statistics (youden: maximise sensitivity +
    specificity - 1; or sensitivity=X, specificity=X, probability=X), and MODEL_CARD.md.
    Frozen pretrained parts are named by their SHA-256, checked when the bundle loads.
    Prints the bundle's digest: hospitals can check it with --expect-digest.
    """
    # torch loads with the command (see the note at the top)
    from server.commands.export import export_run
    from shared_model.inference.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(export_run(run_dir, out, round_, operating_point, min_hospitals))
    except (BundleError, ConfigError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    decision = bundle.info["decision"]
    typer.echo(f"exported {bundle.describe()}")
    typer.echo(f"  digest: {bundle.digest}")
    pooled = bundle.info.get("pooled-evaluation")
    if pooled:
        low, high = pooled["macro-auroc-ci95"]
        typer.echo(
            f"  pooled held-out macro AUROC {pooled['macro-auroc']:.3f} ({low:.3f}-{high:.3f}), "
            f"{pooled['records']} records of {pooled['hospitals']} hospitals "
            f"({bundle.info['source']['selection-metric']['split']} split)"
        )
    typer.echo(f"  thresholds ({decision['rule']}):")
    for label, t in zip(bundle.labels, decision["thresholds"], strict=True):
        typer.echo(f"    {label:14s} {t:.3f}")
    for note in decision["notes"]:
        typer.echo(f"  note: {note}")
    typer.echo(f"  model card: {bundle.root / 'MODEL_CARD.md'}")
