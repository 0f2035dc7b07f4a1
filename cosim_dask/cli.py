"""The `cosim` command line: parse, call the library, render. No math here."""

from __future__ import annotations

import typer

from . import __version__

app = typer.Typer(
    name="cosim",
    help="Learn a cosine-similarity metric from labelled pairs of vectors, at any scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Learn a cosine-similarity metric from labelled pairs of vectors, at any scale."""


@app.command()
def version() -> None:
    """Print the installed cosim-dask version."""
    typer.echo(__version__)


def main() -> None:  # pragma: no cover - console entry point
    app()
