"""The ``cosim`` console command's entry point (``python -m cosim_dask`` too).

Before the CLI's imports, a command that will start a LocalCluster launches the workers'
fork server (:mod:`cosim_dask.dist.warm`), so that the workers' imports overlap this
process's own (the cluster is up ~0.5 s sooner on 2 cores). Everything else is
:func:`cosim_dask.cli.main`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

#: Commands that start a LocalCluster unless given a scheduler.
CLUSTER_COMMANDS = ("train", "evaluate")


def main() -> NoReturn:
    if wants_local_cluster(sys.argv[1:]):
        from cosim_dask.dist import warm

        warm.start(threads_per_worker(sys.argv[1:]))
    from cosim_dask.cli import main as cli_main

    cli_main()


def wants_local_cluster(args: Sequence[str]) -> bool:
    """True when the command line (after the program name) runs a command that starts a
    LocalCluster: ``train`` or ``evaluate``, without ``--scheduler`` (or a scheduler address
    in the environment) and without a request for help. A guess: a wrong one costs a
    process that idles."""
    if not args or args[0] not in CLUSTER_COMMANDS:
        return False
    if any(a in ("-h", "--help") or a.startswith("--scheduler") for a in args):
        return False
    return not os.environ.get("DASK_SCHEDULER_ADDRESS") and threads_per_worker(args) > 0


def threads_per_worker(args: Sequence[str]) -> int:
    """``--threads-per-worker`` on the command line (default 1); 0 when it is not a
    positive whole number (the CLI reports that)."""
    threads = "1"
    for k, a in enumerate(args):
        if a == "--threads-per-worker" and k + 1 < len(args):
            threads = args[k + 1]
        elif a.startswith("--threads-per-worker="):
            threads = a.split("=", 1)[1]
    return int(threads) if threads.isdigit() else 0
