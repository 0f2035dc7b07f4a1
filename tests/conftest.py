"""Fixtures shared by the whole suite: a seeded generator, one LocalCluster for the session,
a headless browser. Shared helper functions live in helpers.py (importable from every test
folder: ``pythonpath`` in pyproject.toml), not here."""

import os
import shutil

import numpy as np
import pytest
from distributed import Client, LocalCluster


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# --- one cluster for the session ----------------------------------------------------------


@pytest.fixture(scope="session")
def shared_cluster():
    """One real LocalCluster for every test that only needs a cluster: 2 worker processes
    x 1 thread on loopback, as `cosim train` starts by default.

    Starting one costs seconds on a small machine, so tests share it. A test that kills
    workers, needs another shape of cluster, or is about starting a LocalCluster starts its
    own. Worker processes import this checkout through PYTHONPATH, as the CLI's do.
    """
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def cluster_address(shared_cluster) -> str:
    """The shared cluster's scheduler, for `--scheduler ADDRESS` or ``Client(address)``."""
    return shared_cluster.scheduler_address


@pytest.fixture(scope="session")
def client(shared_cluster):
    """A client of the shared cluster. Not Dask's default client, so that a test asking
    whether a cluster was started behind the user's back (``get_client()``) sees none."""
    with Client(shared_cluster, set_as_default=False) as c:
        yield c


# --- a real headless browser (Debian's Chromium driven by Playwright) -----------------

CHROMIUM = "/usr/bin/chromium"
# The flags this machine needs: no sandbox as root, and no background traffic to a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    executable = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if executable is None:
        # Fail, not skip: CI installs Chromium, so its absence is a broken setup.
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: the browser tests need Debian's "
            "chromium package (apt-get install -y chromium; .ci/run installs it)."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(autouse=True)
def _local_dask_scheduler_by_default():
    """Plain ``dask.compute`` in a test runs on threads unless the test makes a Client.

    Our code always computes through an explicit client; this keeps a client closed by an
    earlier module (a module-scoped fixture torn down after other clients came and went)
    from being left as dask's global default, where the next module's plain compute would
    hang or fail with "no Client active". A Client made inside the test still sets itself
    as the default within it.
    """
    import dask

    with dask.config.set(scheduler="threads"):
        yield
