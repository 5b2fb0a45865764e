"""The ``fedfusion`` command line: one entry point whose subcommands register themselves.

Subcommands live with the code they drive (``server/commands/cli.py``, ``client/node/cli.py``)
and are declared in ``pyproject.toml`` under ``[project.entry-points."fedfusion.commands"]``.
Each entry point is a ``register(app: typer.Typer) -> None`` function. This root never
imports ``server`` or ``client``, so the import direction server -> shared_model <- client
holds, and a hospital's install can omit the coordinator's commands.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

__all__ = ["build_app", "main"]


def build_app() -> typer.Typer:
    """The CLI with every installed subcommand registered."""
    app = typer.Typer(
        name="fedfusion",
        help=(
            "Federated, differentially private image-text fusion models for hospitals. "
            "Run a local federation with `fedfusion simulate`."
        ),
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="markdown",
    )

    @app.callback()
    def _root() -> None:
        """Federated, differentially private image-text fusion models for hospitals."""

    for ep in sorted(entry_points(group="fedfusion.commands"), key=lambda e: e.name):
        ep.load()(app)
    return app


def main() -> None:
    """Console-script entry point."""
    build_app()()
