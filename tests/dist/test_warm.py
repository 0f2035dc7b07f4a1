"""Workers forked from the warm fork server (``cosim_dask.dist.warm``): the `cosim` entry point
starts it for commands that start a LocalCluster, and a LocalCluster uses it only when its
workers would get exactly the environment the server has. Each case runs in a fresh Python,
as `cosim` does (a fork server belongs to the process that started it)."""

import os
import subprocess
import sys
import textwrap

import pytest

from cosim_dask.console import threads_per_worker, wants_local_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKERS = """
import os, signal, sys

def probe():
    from threadpoolctl import threadpool_info
    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return (os.getppid(), os.environ.get("OPENBLAS_NUM_THREADS"),
            os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("PYTHONHASHSEED"),
            blas, signal.getsignal(signal.SIGINT) == signal.SIG_IGN, hash("cosim"))

if __name__ == "__main__":  # the fork server runs this file too, as its main module
    from cosim_dask.dist import warm
    started = warm.start({threads})
    from cosim_dask.dist.cluster import ClusterConfig, close, connect
    client, cluster = connect(ClusterConfig(threads_per_worker={cluster_threads}))
    try:
        found = list(client.run(probe).values())
        print(started, os.getpid(), repr(found))
    finally:
        close(client, cluster)
"""


def run_workers(tmp_path, threads: int, cluster_threads: int):
    script = tmp_path / "workers.py"
    script.write_text(textwrap.dedent(WORKERS).format(threads=threads,
                                                      cluster_threads=cluster_threads))
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                        "PYTHONHASHSEED", "MALLOC_TRIM_THRESHOLD_")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    started, driver, found = done.stdout.split(maxsplit=2)
    return started == "True", int(driver), eval(found)  # noqa: S307 - our own repr


@pytest.mark.slow
def test_workers_fork_from_the_warm_server_with_a_spawned_workers_environment(tmp_path):
    started, driver, found = run_workers(tmp_path, threads=1, cluster_threads=1)
    assert started and len(found) == 2
    for parent, blas_env, trim, seed, blas, deaf, _ in found:
        assert parent != driver  # a fork of the server, not a child of the driver
        assert (blas_env, trim, seed) == ("1", "65536", "6640")
        assert blas == [1]
        assert deaf  # the terminal's Ctrl-C is the driver's alone
    assert len({h for *_, h in found}) == 1  # one hash seed: workers hash alike
    # Workers of another thread count need another environment: spawned as before.
    started, driver, found = run_workers(tmp_path, threads=1, cluster_threads=2)
    assert started and len(found) == 2
    for parent, blas_env, trim, seed, blas, deaf, _ in found:
        assert parent == driver
        assert (blas_env, trim, seed) == ("2", "65536", "6640")
        assert blas == [2] and deaf


def test_the_entry_point_warms_up_only_for_local_clusters(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert wants_local_cluster(["train", "s.zarr", "--out", "m.zarr"])
    assert wants_local_cluster(["evaluate", "m.zarr", "s.zarr"])
    assert not wants_local_cluster(["generate", "s.zarr"])
    assert not wants_local_cluster([])
    assert not wants_local_cluster(["train", "s.zarr", "--scheduler", "tcp://h:8786"])
    assert not wants_local_cluster(["train", "s.zarr", "--scheduler=tcp://h:8786"])
    assert not wants_local_cluster(["train", "--help"])
    assert not wants_local_cluster(["train", "s.zarr", "--threads-per-worker", "x"])
    assert threads_per_worker(["train", "--threads-per-worker", "3"]) == 3
    assert threads_per_worker(["train", "--threads-per-worker=2"]) == 2
    assert threads_per_worker(["train"]) == 1
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://h:8786")
    assert not wants_local_cluster(["train", "s.zarr", "--out", "m.zarr"])


def test_a_server_that_cannot_start_leaves_the_workers_spawned(monkeypatch):
    """An optimisation must not become an error: no server, no change to this process."""
    import signal
    from multiprocessing import forkserver

    from cosim_dask.dist import warm

    def refuse():
        raise OSError("no room for a socket")

    monkeypatch.setattr(forkserver, "ensure_running", refuse)
    monkeypatch.setattr(warm, "_server_environ", None)
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    handler = signal.getsignal(signal.SIGINT)
    assert warm.start(1) is False
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    assert signal.getsignal(signal.SIGINT) is handler
    assert warm.cluster_config({"OPENBLAS_NUM_THREADS": 1}) == {}


def test_a_running_server_serves_only_clusters_it_fits(monkeypatch):
    from cosim_dask.dist import warm

    pre_spawn = {**warm.TRIM_ENV, **dict.fromkeys(warm.BLAS_ENV, 1)}
    for name in (*pre_spawn, "PYTHONHASHSEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(warm, "_server_environ", warm.worker_environ(pre_spawn))
    forkserver = {"distributed.worker.multiprocessing-method": "forkserver"}
    assert warm.cluster_config(pre_spawn) == forkserver
    assert warm.cluster_config({**pre_spawn, "OMP_NUM_THREADS": 2}) == {}
    assert warm.cluster_config(pre_spawn, method="fork") == {}  # the user's choice stands
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the environment wins, as in the nanny
    assert warm.cluster_config(pre_spawn) == {}
