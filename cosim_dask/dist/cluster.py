"""Connect to a Dask cluster or start a LocalCluster; nothing here knows about the CLI."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import socket
import threading
import time
from dataclasses import dataclass

import dask
import psutil
import yaml
from dask.utils import parse_bytes
from distributed import Client, LocalCluster
from distributed.comm.registry import backends
from distributed.security import Security

from cosim_dask.dist import warm
from cosim_dask.dist.waits import close_client, close_cluster, guarded, start_local
from cosim_dask.errors import ANY, ClusterError

#: BLAS threads in processes that share cores collapse (measured: one GEMM ran 50× slower).
_BLAS_ENV = warm.BLAS_ENV


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

    def check(self) -> None:
        """Check every setting before anything starts; a :class:`ClusterError` names the bad
        value and the form expected.

        The scheduler address (scheme, host, port), the workers and threads, the memory
        limit, the dashboard address, and the TLS settings against the scheduler's scheme.
        """
        address = scheduler_address(self)
        scheme = None if address is None else check_scheduler_address(address)
        most = max_local_processes()
        for name in ("workers", "threads_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                # A typo of 100000 workers would start 100000 processes on this machine.
                raise ClusterError(f"{name}={value!r} must be a whole number between 1 and "
                                   f"{most} (4 per core of this machine, at least 64)")
        if not isinstance(self.timeout, int | float) or not (
                math.isfinite(self.timeout) and self.timeout > 0):
            raise ClusterError(f"timeout={self.timeout!r} must be a finite number of seconds > 0")
        check_memory_limit(self.memory_limit)
        if self.dashboard_address is not None:
            check_dashboard_address(self.dashboard_address)
        _check_tls(address, scheme, self.security)
        load_security(self.security)  # a TLS config file is read and checked here, too


def scheduler_address(config: ClusterConfig) -> str | None:
    """The scheduler to connect to, from the option or from Dask's configuration."""
    return config.scheduler or dask.config.get("scheduler-address", None) or None


def connect(config: ClusterConfig) -> tuple[Client, LocalCluster | None]:
    """A client, and the LocalCluster it owns (None when it joined an existing cluster).

    An unreachable scheduler raises :class:`ClusterError` after ``config.timeout`` seconds, a
    LocalCluster that does not start after :data:`cosim_dask.dist.waits.START_TIMEOUT` seconds.
    The LocalCluster's workers ignore the terminal's Ctrl-C
    (:func:`~cosim_dask.dist.waits.start_local`): the driver alone handles it and closes them.
    """
    config.check()  # bad settings fail here, before anything starts
    security = load_security(config.security)
    address = scheduler_address(config)
    if address:
        try:
            client = Client(address, timeout=config.timeout, security=security)
        except TypeError as exc:
            if "TLS" not in str(exc):
                raise
            raise ClusterError(
                f"the scheduler at {address!r} speaks TLS but no certificates were given: pass "
                "{security} (see README, Running on a cluster)",
                params={"security": "CONFIG.yaml"}) from None
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {address!r} within {config.timeout:g} s "
                f"({type(exc).__name__}); check the address, or omit {{scheduler}} to start "
                "a local cluster", params={"scheduler": ANY}) from None
        return client, None
    if config.workers < 1 or config.threads_per_worker < 1:
        raise ClusterError(
            f"workers={config.workers} and threads_per_worker={config.threads_per_worker} "
            "must be at least 1"
        )
    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    env.update({name: str(config.threads_per_worker) for name in _BLAS_ENV})
    # Workers forked from a warm server when one was started for exactly this environment
    # (cosim_dask.dist.warm: the CLI starts it before its imports), else spawned.
    fork = warm.cluster_config(env, dask.config.get(
        "distributed.worker.multiprocessing-method")) if config.processes else {}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env, **fork}):
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


def max_local_processes() -> int:
    """Most LocalCluster workers (or threads per worker) accepted: 4 per core, at least 64."""
    return max(64, 4 * (os.cpu_count() or 1))


def _schemes() -> list[str]:
    return sorted(backends)


def check_scheduler_address(address: str) -> str:
    """The scheme of a scheduler address (``tcp://host:port``, ``tls://...``, a bare
    ``host:port`` meaning Dask's default scheme); :class:`ClusterError` if it is not one."""
    expected = (f"expected SCHEME://HOST:PORT such as tcp://127.0.0.1:8786 (schemes: "
                f"{', '.join(_schemes())})")
    if not isinstance(address, str) or not address.strip():
        raise ClusterError(f"scheduler={address!r} is not a Dask scheduler address; {expected}")
    scheme, sep, location = address.partition("://")
    if not sep:
        scheme = dask.config.get("distributed.comm.default-scheme", "tcp")
        location = address
    if scheme not in _schemes():
        raise ClusterError(f"scheduler={address!r} names the unknown protocol {scheme!r}; "
                           f"{expected}")
    if scheme == "inproc":
        if not location:
            raise ClusterError(f"scheduler={address!r} is not a Dask scheduler address; "
                               f"{expected}")
        return scheme
    host, port = _split_host_port(location)
    if not host or port is None or not 1 <= port <= 65535:
        raise ClusterError(f"scheduler={address!r} is not a Dask scheduler address (a host "
                           f"and a port 1-65535 are needed); {expected}")
    return scheme


def _split_host_port(location: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port`` or ``:port`` → (host, port); port None if not a number."""
    if location.startswith("["):
        host, sep, rest = location[1:].partition("]")
        port = rest[1:] if sep and rest.startswith(":") else ""
    else:
        host, _, port = location.rpartition(":")
    if not port.isascii() or not port.isdigit() or len(port) > 5:
        return host, None
    return host, int(port)


def check_memory_limit(limit: object) -> None:
    """A worker memory limit: ``'auto'``, None, bytes (int) or a size string ('4GiB')."""
    if limit is None or limit == "auto":
        return
    bad = ClusterError(f"memory_limit={limit!r} is not a size; give bytes with a unit, such "
                       "as '4GiB' or '500MB', or 'auto' (0 for no limit)")
    if isinstance(limit, bool):
        raise bad
    if isinstance(limit, int | float):
        # Dask reads a float in (0, 1] as a share of the machine's memory.
        if not math.isfinite(limit) or limit < 0:
            raise bad
        return
    if not isinstance(limit, str) or not limit.strip():
        raise bad
    try:
        size = parse_bytes(limit)
    except (ValueError, TypeError):
        raise bad from None
    # "0.5" parses to 0 bytes, which Dask would read as "no limit": only "0" means that.
    if size < 0 or (size == 0 and limit.strip() != "0"):
        raise bad


def check_dashboard_address(address: object) -> None:
    """A dashboard address ``host:port`` (``:port`` for every interface; port 0 = any free
    port); a host name must resolve."""
    expected = "expected HOST:PORT with a port 0-65535, such as 127.0.0.1:8787 or :0"
    if not isinstance(address, str) or ":" not in address:
        raise ClusterError(f"dashboard_address={address!r} is not an address; {expected}")
    host, port = _split_host_port(address)
    if port is None or port > 65535:
        raise ClusterError(f"dashboard_address={address!r} has no valid port; {expected}")
    if not host:
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            socket.getaddrinfo(host, port)
        except (OSError, UnicodeError):
            raise ClusterError(f"dashboard_address={address!r}: the host {host!r} does not "
                               f"resolve; {expected}") from None


def _tls_given(security: object | None) -> bool:
    if security is None:
        return False
    if isinstance(security, str | os.PathLike):
        return True
    return bool(getattr(security, "require_encryption", False))


def _check_tls(address: str | None, scheme: str | None, security: object | None) -> None:
    """TLS settings against the scheduler's scheme: certificates for a tcp:// scheduler
    would silently go unused; a tls:// scheduler without any cannot be reached."""
    if scheme in ("tcp", "ws") and _tls_given(security):
        raise ClusterError(f"a TLS config (security) was given but the scheduler {address!r} "
                           f"speaks plain {scheme}://; use its tls:// address, or drop the "
                           "TLS config ({security})", params={"security": ANY})
    if (scheme in ("tls", "wss") and not _tls_given(security)
            and not dask.config.get("distributed.comm.tls.ca-file", None)):
        raise ClusterError(f"the scheduler {address!r} speaks TLS but no certificates were "
                           "given: pass {security} (see README, Reliability and security)",
                           params={"security": "CONFIG.yaml"})


def load_security(security: object | None):
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
    path = os.fspath(security)
    if not os.path.exists(path):
        raise ClusterError(f"the security config {path!r} does not exist")
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
    :data:`cosim_dask.dist.waits.CLOSE_TIMEOUT` seconds (a frozen scheduler must not hang the end
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
        pids = guarded(client, lambda: client.run(os.getpid), "asking the workers' pids")
        self.procs = [psutil.Process(pid) for pid in pids.values()]
        self.interval = interval
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
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
