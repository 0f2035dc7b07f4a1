"""Options shared by several commands, each defined once, and the choices they offer.

Choices come from the library's own registries (losses, solvers, parameterisations,
codecs, target kinds, cache modes, evaluation splits), so the CLI cannot offer a name the
library does not know. Defaults come from the library's configuration classes.
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

from cosim_dask.cli.output import debugging, run
from cosim_dask.core.forms import PARAMETERISATIONS
from cosim_dask.core.losses import LOSSES
from cosim_dask.core.solvers import SOLVERS
from cosim_dask.data.store import CODECS, TARGET_KINDS
from cosim_dask.dist.cluster import ClusterConfig, close, connect
from cosim_dask.fit.config import CACHE_MODES
from cosim_dask.fit.evaluate import SPLITS


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



def overwrite_option(what: str) -> object:
    """The ``--overwrite`` flag of a command whose output is ``what``."""
    return Annotated[bool, typer.Option("--overwrite", help=f"Replace {what}.")]


OverwriteStore = overwrite_option("an existing STORE")
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ChunkPairs = Annotated[int | None, typer.Option(
    "--chunk-pairs", help="Pairs per chunk (default: ~16 MiB of x per chunk, 32,768 at "
    "d=128, evened out over the pairs).")]
CodecOption = Annotated[Codec, typer.Option(help="Chunk codec (see README, Store format).")]
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


def cluster_config(scheduler: str | None, workers: int, threads_per_worker: int,
                   memory_limit: str, dashboard_address: str,
                   security: Path | None) -> ClusterConfig:
    """The cluster options, checked (one line and exit 2 if bad) before anything starts."""
    config = ClusterConfig(scheduler=scheduler, workers=workers,
                           threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                           dashboard_address=dashboard_address, security=security)
    run(config.check)
    return config


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
