"""The `cosim` command line: parse, call the library, render. No math here.

Every command runs its body through :func:`run`, which turns a :class:`CosimError` (and a
few well-understood OS errors) into one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from . import __version__
from .errors import CosimError

T = TypeVar("T")

app = typer.Typer(
    name="cosim",
    help="Learn a cosine-similarity metric from labelled pairs of vectors, at any scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def run(body: Callable[[], T]) -> T:
    """Call ``body``; a CosimError becomes a one-line message and exit code 2."""
    try:
        return body()
    except (CosimError, FileNotFoundError, PermissionError, OSError) as exc:
        if _state["debug"]:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(code=130) from None


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
) -> None:
    """Learn a cosine-similarity metric from labelled pairs of vectors, at any scale."""
    _state["debug"] = debug


@app.command()
def version() -> None:
    """Print the installed cosim-dask version."""
    typer.echo(__version__)


def main() -> None:  # pragma: no cover - console entry point
    app()
