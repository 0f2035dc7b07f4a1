"""The `cosim` command line: parse, call the library, render. No math here.

Every command runs its body through :func:`run`, which turns a :class:`CosimError` (and a
few well-understood OS errors) into one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
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


@app.command()
def transform(
    model: Annotated[Path, typer.Argument(help="A model written by `cosim train`.")],
    src: Annotated[Path, typer.Argument(metavar="IN", help="A .npy array (n, d) of vectors.")],
    out: Annotated[Path, typer.Argument(help="The .npy file to write L·x to, (n, k).")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it exists.")
    ] = False,
    block_rows: Annotated[
        int, typer.Option("--block-rows", min=1, help="Vectors per block (bounds memory).")
    ] = 65536,
) -> None:
    """Write L·x (A = LᵀL) for every vector of IN, so plain cosine similarity downstream
    equals the learned similarity."""

    def body() -> None:
        from .model import load_model
        from .transform import transform_file

        report = transform_file(load_model(model), src, out, overwrite=overwrite,
                                block_rows=block_rows)
        typer.echo(f"wrote {report.rows:,} vectors of {report.out_dim} ({report.dtype}) "
                   f"to {report.path}")

    run(body)


def main() -> None:  # pragma: no cover - console entry point
    app()
