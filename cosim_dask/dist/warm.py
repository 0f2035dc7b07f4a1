"""A warm start for LocalCluster workers: a fork server launched before the driver's imports.

A LocalCluster normally spawns each worker as a fresh interpreter that imports distributed,
NumPy, zarr and our task modules before its first task: on a 2-core machine the cluster was
up 0.7 s after the driver asked for it, and the `cosim train` driver had itself spent 0.6 s
importing before it asked. Launched first thing, a ``multiprocessing`` fork server does
those imports on the other core while the driver imports; the workers are then forks of it
and start at once. Measured (`cosim train` on 2M pairs × 128, streamed, 3 runs each): the
dashboard line at 0.86–0.94 s instead of 1.34–1.42 s, the first figures 0.45 s sooner.

Only the environment a worker process needs at its start differs from a spawned worker's:
the fork server has it (:func:`worker_environ`: the BLAS thread counts, glibc's trim
threshold and the hash seed that Dask's nanny sets before it spawns), so its forks do too.
:func:`cluster_config` hands the server to a LocalCluster only when that environment is
exactly what the nanny would set for the cluster being started; any other cluster spawns its
workers as before. This module imports only the standard library: it runs before the rest.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Mapping

#: What the fork server imports once for every worker it forks.
PRELOAD = ("distributed", "numpy", "zarr", "cosim_dask.dist.tasks")
#: Environment variables Dask's nanny sets before it spawns a worker (``distributed.nanny.
#: pre-spawn-environ``'s defaults), with the BLAS thread counts set per worker by us.
BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
TRIM_ENV = {"MALLOC_TRIM_THRESHOLD_": "65536"}
#: Dask's nanny gives workers this hash seed when none (or 0) is set, so that every worker
#: hashes alike; an interpreter fixes its seed when it starts, so the server needs it.
HASH_SEED = "6640"

_server_environ: dict[str, str] | None = None
_lock = threading.Lock()


def available() -> bool:
    """True where ``multiprocessing`` has a fork server (POSIX)."""
    return "forkserver" in multiprocessing.get_all_start_methods()


def worker_environ(pre_spawn: Mapping[str, object]) -> dict[str, str]:
    """The environment Dask's nanny sets for a worker before it starts, from the
    ``pre-spawn-environ`` settings, as the nanny computes it: a variable already set in this
    process wins over its setting, and the hash seed is fixed unless the settings give one."""
    env = {k: os.environ.get(k, str(v)) for k, v in pre_spawn.items() if v is not None}
    if env.get("PYTHONHASHSEED") in (None, "0"):
        env["PYTHONHASHSEED"] = HASH_SEED
    return env


def start(threads_per_worker: int = 1) -> bool:
    """Launch the fork server for workers of ``threads_per_worker`` threads, and return at
    once (it imports :data:`PRELOAD` meanwhile). False where there is no fork server, or it
    could not start (the workers are then spawned as usual).

    Call it before the heavy imports. Its forks ignore the terminal's Ctrl-C, as spawned
    workers do (:func:`cosim_dask.dist.waits.start_local`): the driver alone handles it.
    """
    global _server_environ
    if not available():
        return False
    env = worker_environ({**TRIM_ENV, **dict.fromkeys(BLAS_ENV, threads_per_worker)})
    with _lock:
        if _server_environ is not None:
            return _server_environ == env
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(PRELOAD))
        saved = {k: os.environ.get(k) for k in env}
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if on_main else None
        try:
            os.environ.update(env)  # the server's environment is its forks' environment
            from multiprocessing import forkserver

            forkserver.ensure_running()
        except Exception:  # noqa: BLE001 - an optimisation: the workers are spawned instead
            return False
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if on_main:
                signal.signal(signal.SIGINT, previous)
        _server_environ = env
        return True


def cluster_config(pre_spawn: Mapping[str, object], method: str = "spawn"
                   ) -> dict[str, object]:
    """Dask settings that make a LocalCluster fork its workers from the running server: only
    when one runs, its environment is what the nanny would set (``pre_spawn``), and the
    configured start ``method`` is Dask's default (``spawn``: a user's own choice stands);
    else none."""
    if (method != "spawn" or _server_environ is None
            or _server_environ != worker_environ(pre_spawn)):
        return {}
    try:  # distributed would otherwise import every optional package to preload them
        import distributed.utils

        distributed.utils._forkserver_preload_set = True
    except (ImportError, AttributeError):  # pragma: no cover - a moved internal costs time only
        pass
    return {"distributed.worker.multiprocessing-method": "forkserver"}
