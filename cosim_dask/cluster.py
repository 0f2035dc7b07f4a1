"""Connect to a Dask cluster or start a LocalCluster; nothing here knows about the CLI."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass

import dask
from distributed import Client, LocalCluster

from .errors import ClusterError
from .waits import close_client, close_cluster, guarded, start_local

#: BLAS threads in processes that share cores collapse (measured: one GEMM ran 50× slower).
_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class ClusterConfig:
    """How to reach or build the cluster.

    ``scheduler``: an address (``tcp://host:8786``, ``tls://...``); None uses Dask's own
    configuration (``DASK_SCHEDULER_ADDRESS`` / ``scheduler-address``) and otherwise starts a
    LocalCluster with ``workers`` × ``threads_per_worker`` and ``memory_limit`` per worker.
    """

    scheduler: str | None = None
    workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str | None = "auto"
    dashboard_address: str = "127.0.0.1:0"
    security: object | None = None  # distributed.security.Security, or a path to a TLS config
    timeout: float = 10.0
    processes: bool = True


def scheduler_address(config: ClusterConfig) -> str | None:
    """The scheduler to connect to, from the option or from Dask's configuration."""
    return config.scheduler or dask.config.get("scheduler-address", None) or None


def connect(config: ClusterConfig) -> tuple[Client, LocalCluster | None]:
    """A client, and the LocalCluster it owns (None when it joined an existing cluster).

    An unreachable scheduler raises :class:`ClusterError` after ``config.timeout`` seconds, a
    LocalCluster that does not start after :data:`cosim_dask.waits.START_TIMEOUT` seconds.
    The LocalCluster's workers ignore the terminal's Ctrl-C (:func:`~cosim_dask.waits.start_local`):
    the driver alone handles it and closes them.
    """
    security = _security(config.security)
    address = scheduler_address(config)
    if address:
        try:
            client = Client(address, timeout=config.timeout, security=security)
        except TypeError as exc:
            if "TLS" not in str(exc):
                raise
            raise ClusterError(
                f"the scheduler at {address!r} speaks TLS but no certificates were given: pass "
                "--security CONFIG.yaml (see README, Training on a cluster)"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {address!r} within {config.timeout:g} s "
                f"({type(exc).__name__}); check the address, or omit --scheduler to start a "
                f"local cluster"
            ) from None
        return client, None
    if config.workers < 1 or config.threads_per_worker < 1:
        raise ClusterError(
            f"workers={config.workers} and threads_per_worker={config.threads_per_worker} "
            "must be at least 1"
        )
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    env.update({name: str(config.threads_per_worker) for name in _BLAS_ENV})
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        cluster = start_local(lambda: LocalCluster(
            n_workers=config.workers,
            threads_per_worker=config.threads_per_worker,
            memory_limit=config.memory_limit,
            processes=config.processes,
            dashboard_address=config.dashboard_address,
            host="127.0.0.1",
            security=security,
        ))
    try:
        return Client(cluster, security=security), cluster
    except BaseException:
        close_cluster(cluster)
        raise


def _security(security: object | None):
    """A Security from a YAML file in Dask's own layout (the ``distributed.comm.tls`` part of a
    Dask config file, or that mapping alone)::

        distributed:
          comm:
            tls:
              ca-file: ca.pem
              scheduler: {cert: scheduler.pem, key: scheduler.key}
              worker: {cert: worker.pem, key: worker.key}
              client: {cert: client.pem, key: client.key}
    """
    if security is None or not isinstance(security, str | os.PathLike):
        return security
    from distributed.security import Security

    path = os.fspath(security)
    if not os.path.exists(path):
        raise ClusterError(f"the security config {path!r} does not exist")
    import yaml

    try:
        with open(path) as f:
            settings = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise ClusterError(f"the security config {path!r} is not valid YAML "
                           f"({str(exc).splitlines()[0]})") from None
    tls = settings
    for key in ("distributed", "comm", "tls"):
        if isinstance(tls, dict) and isinstance(tls.get(key), dict):
            tls = tls[key]
    if not isinstance(tls, dict):
        raise ClusterError(f"the security config {path!r} is not a Dask TLS config (a mapping "
                           "with distributed.comm.tls keys, see README)")
    if "ca-file" not in tls:
        raise ClusterError(f"the security config {path!r} lacks the key 'ca-file'")
    roles = {role: tls.get(role) if isinstance(tls.get(role), dict) else {}
             for role in ("client", "scheduler", "worker")}
    files = [tls["ca-file"], *(v for r in roles.values() for v in (r.get("cert"), r.get("key")))]
    for name in files:
        if name is not None and not os.path.isfile(str(name)):
            raise ClusterError(f"the security config {path!r} names {str(name)!r}, which does "
                               "not exist")
    return Security(
        require_encryption=True,
        tls_ca_file=tls["ca-file"],
        tls_client_cert=roles["client"].get("cert"),
        tls_client_key=roles["client"].get("key"),
        tls_scheduler_cert=roles["scheduler"].get("cert"),
        tls_scheduler_key=roles["scheduler"].get("key"),
        tls_worker_cert=roles["worker"].get("cert"),
        tls_worker_key=roles["worker"].get("key"),
    )


def cluster_memory(client: Client) -> int:
    """Total memory limit of the cluster's workers, in bytes (0 when unknown)."""
    info = guarded(client, lambda: client.scheduler_info(n_workers=-1),
                   "asking the scheduler for its workers")
    return int(sum(w.get("memory_limit") or 0 for w in info["workers"].values()))


def close(client: Client, cluster: LocalCluster | None) -> None:
    """Close the client and the LocalCluster it owns, each within
    :data:`cosim_dask.waits.CLOSE_TIMEOUT` seconds (a frozen scheduler must not hang the end
    of a command)."""
    close_client(client)
    if cluster is not None:
        close_cluster(cluster)


class WorkerMemorySampler:
    """Peak resident memory of the worker processes, sampled from the driver.

    For workers on this machine (a LocalCluster): psutil reads each worker process every
    ``interval`` seconds, so the sampling adds no tasks to the cluster being measured.
    """

    def __init__(self, client: Client, interval: float = 0.05) -> None:
        import psutil

        pids = guarded(client, lambda: client.run(os.getpid), "asking the workers' pids")
        self.procs = [psutil.Process(pid) for pid in pids.values()]
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._done.is_set():
            for p in self.procs:
                with contextlib.suppress(psutil.Error):  # a worker being restarted
                    self.peak = max(self.peak, p.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> WorkerMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
