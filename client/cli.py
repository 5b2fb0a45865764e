"""Hospital-side subcommands of the ``fedfusion`` CLI (registered via entry points)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the hospital's subcommands to the CLI."""
    app.command("hospital")(hospital)


def hospital(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The hospital's TOML file (see deploy/).")
    ],
    check: Annotated[
        bool, typer.Option(help="Only check the file and print the SuperNode command.")
    ] = False,
) -> None:
    """Join the federation as one hospital: run its SuperNode from its config file.

    The file's [hospital] table holds the hospital's facts and privacy policy
    (hospital-id, data-manifest, state-dir, max-epsilon, delta): its limits override
    whatever the server asks. The [connection] table says how to reach the server
    (server, root-certificates, private-key, port; insecure only for development).
    """
    from client.launch import explain_exit, plan_supernode, run_supernode
    from shared_model.config import ConfigError

    try:
        launch = plan_supernode(config)
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    if launch.warning:
        typer.secho(launch.warning, fg=typer.colors.RED, err=True)
    typer.echo(
        f"{launch.hospital.hospital_id}: max-epsilon {launch.hospital.max_epsilon:g}, "
        f"delta {launch.hospital.delta:g}, ledger in {launch.hospital.state_dir}"
    )
    if check:
        typer.echo(" ".join(launch.command))
        return
    code, output = run_supernode(launch)
    reason = explain_exit(code, output, launch)
    if reason:
        typer.secho(f"error: {reason}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
