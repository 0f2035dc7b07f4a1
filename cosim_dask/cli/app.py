"""The `cosim` command line: the Typer app, its commands by group, and the console entry
point :func:`main`. No math here; each command parses, calls the library, renders.

Commands, registered (and so listed by ``cosim --help``) in the order of a workflow:
``generate``, ``ingest``, ``info`` (:mod:`cosim_dask.cli.store`); ``train``, ``evaluate``
(:mod:`cosim_dask.cli.train`); ``transform``, ``report`` (:mod:`cosim_dask.cli.tools`); then
``version``. The root takes ``--version``/``-V``, ``--debug`` and Typer's shell-completion
options; ``-h`` is ``--help`` on every command.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Annotated, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from cosim_dask import __version__
from cosim_dask.cli import store, tools, train
from cosim_dask.cli.options import on_off
from cosim_dask.cli.output import Terminated, debugging, echo, set_debug, set_mode


class _Command(TyperCommand):
    """A command whose ``--help`` shows no ``<bool>``: a flag takes no value (as our own
    flags show, :func:`~cosim_dask.cli.options.on_off`)."""

    def get_help_option(self, ctx):
        return _without_metavar(super().get_help_option(ctx))


class _Group(TyperGroup):
    """The root: ``--help`` and Typer's completion flags without ``<bool>`` too."""

    def get_help_option(self, ctx):
        return _without_metavar(super().get_help_option(ctx))

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if param.name in ("install_completion", "show_completion"):
                _without_metavar(param)
        return params


def _without_metavar(option):
    if option is not None:
        option.metavar = ""
    return option


app = typer.Typer(
    name="cosim",
    cls=_Group,
    help="Learn a cosine-similarity metric from labelled pairs of vectors, at any scale.",
    # `cosim --install-completion` / `--show-completion SHELL`: the completion script calls
    # `cosim` back with _COSIM_COMPLETE set, which Typer answers before any command runs.
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    debug: Annotated[
        bool, on_off("--debug", help="Show full tracebacks instead of one-line errors.")
    ] = False,
    _version: Annotated[bool, on_off(
        "--version", "-V", is_eager=True, callback=_print_version,
        help="Print the installed cosim-dask version and exit.")] = False,
) -> None:
    """Learn a cosine-similarity metric from labelled pairs of vectors, at any scale."""
    if ctx.invoked_subcommand is None:  # bare `cosim`: the help, as a usage error
        typer.echo(ctx.get_help())
        raise typer.Exit(code=2)
    set_debug(debug)
    # Back to text for every command; its --quiet / --json set the mode as they are parsed.
    set_mode(quiet=False, as_json=False)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def version() -> None:
    """Print the installed cosim-dask version (as `cosim --version` does)."""
    typer.echo(__version__)


# Typer lists commands in the order they are registered: the order of a workflow.
def short_help(command: Callable) -> str:
    """A command's summary for `cosim --help`: its docstring's first paragraph on one line
    (the docstring's own line breaks would otherwise break the listing mid-sentence)."""
    return " ".join((command.__doc__ or "").strip().split("\n\n")[0].split())


for command in (store.generate, store.ingest, store.info, train.train, train.evaluate,
                tools.transform, tools.report, version):
    app.command(short_help=short_help(command), cls=_Command)(command)


def main(args: Sequence[str] | None = None) -> NoReturn:
    """The ``cosim`` console command: run ``app`` on ``args`` (default: the command line) and
    exit. A usage error (unknown option, value out of range, missing argument) is one line
    ``error: ...`` and exit code 2, like every other error, instead of Typer's boxed usage
    text; ``--debug`` raises it."""
    try:
        code = app(args, prog_name="cosim", standalone_mode=False)
    except typer.TyperException as exc:  # click's UsageError and the other ClickExceptions
        if debugging():
            raise
        context = getattr(exc, "ctx", None)
        where = f" (see `{context.command_path} --help`)" if context is not None else ""
        echo(f"error: {' '.join(exc.format_message().split())}{where}", err=True)
        code = getattr(exc, "exit_code", 2)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
