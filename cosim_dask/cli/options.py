"""Options shared by several commands, each defined once, and the choices they offer.

Choices come from the library's own registries (losses, solvers, parameterisations,
codecs, target kinds, cache modes, evaluation splits), so the CLI cannot offer a name the
library does not know. Defaults come from the library's configuration classes. Also here:
what those options lead to before a command's work starts (the cluster configuration and
its client, the hint for swapped MODEL and STORE arguments).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from distributed import Client

from cosim_dask.cli.output import debugging, run, set_mode
from cosim_dask.core.forms import PARAMETERISATIONS
from cosim_dask.core.losses import LOSSES
from cosim_dask.core.solvers import SOLVERS
from cosim_dask.data.store import CODECS, TARGET_KINDS, open_store
from cosim_dask.dist.cluster import ClusterConfig, close, connect, scheduler_address
from cosim_dask.errors import ClusterError, CosimError
from cosim_dask.fit.config import CACHE_MODES
from cosim_dask.fit.evaluate import SPLITS
from cosim_dask.fit.model import load_model


def choice(name: str, values: Iterable[str]) -> type[StrEnum]:
    """A StrEnum whose members are ``values``, for typer to offer as choices."""
    return StrEnum(name, {value: value for value in values})


Loss = choice("Loss", LOSSES)
Solver = choice("Solver", SOLVERS)
Parameterisation = choice("Parameterisation", PARAMETERISATIONS)
Codec = choice("Codec", CODECS)
TargetKind = choice("TargetKind", TARGET_KINDS)
CacheMode = choice("CacheMode", CACHE_MODES)
Split = choice("Split", ("auto", *SPLITS))

#: Seeds feed NumPy's generators, which take [0, 2**32 - 1] here (train checks its own
#: seed in TrainConfig.check).
MAX_SEED = 2**32 - 1



def on_off(*decls: str, help: str, **kwargs: object) -> typer.models.OptionInfo:
    """A ``bool`` option given as a bare flag (``--overwrite``: on; absent: off).

    Typer's help prints a type column for every option, flags included, which reads as if
    the flag took a value (``--overwrite <bool>``, and ``--overwrite true`` is an error);
    an empty metavar leaves that column blank."""
    return typer.Option(*decls, metavar="", help=help, **kwargs)


def overwrite_option(what: str) -> object:
    """The ``--overwrite`` flag of a command whose output is ``what``."""
    return Annotated[bool, on_off("--overwrite", help=f"Replace {what}.")]


def _quiet(value: bool) -> bool:
    set_mode(quiet=value)
    return value


def _json(value: bool) -> bool:
    set_mode(as_json=value)
    return value


OverwriteStore = overwrite_option("an existing STORE")
#: Every command that prints results takes both; they set the output mode as they are parsed,
#: so that every line printed after (cosim_dask.cli.output.echo) follows it.
Quiet = Annotated[bool, on_off(
    "--quiet", "-q", callback=_quiet,
    help="Print errors only (and the JSON document with --json): no progress, no notes.")]
Json = Annotated[bool, on_off(
    "--json", callback=_json,
    help="Print the results as one JSON document on stdout; notes go to stderr.")]
ChunkPairs = Annotated[int | None, typer.Option(
    "--chunk-pairs", help="Pairs per chunk (default: ~16 MiB of x per chunk, 32,768 at "
    "d=128, evened out over the pairs).")]
CodecOption = Annotated[Codec, typer.Option(
    help="Chunk codec (none reads fastest; measured in scripts/README.md, Codec and chunk size).")]
#: Every positional has an upper-case metavar (MODEL, STORE, IN, OUT), the name its help
#: text and the other options' help refer to.
Model = Annotated[str, typer.Argument(
    metavar="MODEL", help="A model written by `cosim train` (folder or URL).")]

# The cluster options of every command that runs on Dask; defaults are ClusterConfig's.
CLUSTER = ClusterConfig()
Scheduler = Annotated[str | None, typer.Option(
    "--scheduler", envvar="DASK_SCHEDULER_ADDRESS",
    help="Address of an existing Dask scheduler (tcp://host:8786, tls://...). Default: start a "
         "LocalCluster.", rich_help_panel="Cluster")]
Workers = Annotated[int, typer.Option(
    min=1, help="LocalCluster worker processes.", rich_help_panel="Cluster")]
Threads = Annotated[int, typer.Option(
    "--threads-per-worker", min=1, help="Threads per LocalCluster worker.",
    rich_help_panel="Cluster")]
MemoryLimit = Annotated[str, typer.Option(
    "--memory-limit", help="Memory limit per LocalCluster worker ('4GiB', 'auto').",
    rich_help_panel="Cluster")]
DashboardAddress = Annotated[str, typer.Option(
    "--dashboard-address", help="Where the LocalCluster dashboard listens (loopback by "
    "default; e.g. 0.0.0.0:8787 opens it to the network on purpose).",
    rich_help_panel="Cluster")]
Security = Annotated[Path | None, typer.Option(
    "--security", help="A Dask TLS config (YAML with distributed.comm.tls keys) for tls:// "
    "schedulers.", rich_help_panel="Cluster")]


#: The cluster options that only shape a LocalCluster this command starts.
LOCAL_CLUSTER_ONLY = ("workers", "threads_per_worker", "memory_limit", "dashboard_address")


def cluster_config(ctx: typer.Context) -> ClusterConfig:
    """The cluster options of the command ``ctx`` runs, checked (one line and exit 2 if bad)
    before anything starts.

    A LocalCluster option given (on the command line or from the environment, not left at
    its default) together with an existing scheduler is an error: the scheduler's own
    workers run the tasks, so the option would be silently ignored.
    """
    names = ("scheduler", "security", *LOCAL_CLUSTER_ONLY)
    config = ClusterConfig(**{name: ctx.params[name] for name in names})
    address = scheduler_address(config)
    given = [name for name in LOCAL_CLUSTER_ONLY if _given(ctx, name)]
    if address is not None and given:
        option = _option(ctx, given[0])
        where = ("with --scheduler" if _given(ctx, "scheduler", envvar=False) else
                 f"with a scheduler set in the environment ({address})")
        run(lambda: _fail(ClusterError(
            f"{option} is for the LocalCluster cosim starts; {where} the cluster's own "
            f"workers are used: drop {option}")))
    run(config.check)
    return config


def _given(ctx: typer.Context, name: str, *, envvar: bool = True) -> bool:
    """Whether option ``name`` was typed (or, with ``envvar``, read from the environment),
    not left at its default. The sources are compared by name: the enum is Click's or,
    in recent Typer, Typer's own copy of it."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in (
        ("COMMANDLINE", "ENVIRONMENT") if envvar else ("COMMANDLINE",))


def _option(ctx: typer.Context, name: str) -> str:
    """The flag of parameter ``name``: ``--workers``."""
    return next(max(p.opts, key=len) for p in ctx.command.params if p.name == name)


def _fail(error: Exception) -> None:
    raise error


def swapped(first: Path | str, second: Path | str, usage: str) -> None:
    """When MODEL ``first`` did not load: if it is a pair store (or a ``.npy`` file) and
    ``second`` is a model, the two were given in the wrong order; say so, and the order.
    Nothing is raised otherwise, and the caller raises the model's own error."""
    try:
        load_model(second)
    except (CosimError, OSError):
        return
    kind = "a .npy file" if str(first).endswith(".npy") and Path(first).is_file() else None
    if kind is None:
        try:
            open_store(str(first))
        except (CosimError, OSError):
            return
        kind = "a pair store"
    raise CosimError(f"{str(first)!r} looks like {kind} and {str(second)!r} a model: the "
                     f"order is `{usage}`")


@contextmanager
def connected(config: ClusterConfig) -> Iterator[Client]:
    """A client of the cluster ``config`` names, closed (and a LocalCluster stopped) after."""
    if not debugging():
        # When the scheduler goes away, distributed's client logs each failed reconnect with
        # a traceback; our own one-line error says what happened and how to resume.
        logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
    client, cluster = run(lambda: connect(config))
    try:
        yield client
    finally:
        close(client, cluster)
