"""The same data on every worker: a run reads the store the driver opened and checked, or
stops with one line saying why it cannot.

Real ``dask scheduler`` / ``dask worker`` processes: a worker in another working directory
(where another store lies at the same relative path), a worker that cannot see the store's
folder at all (a tmpfs mounted over it in a mount namespace of its own), and a store
regenerated at its path while a run reads it.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
from distributed import Client
from helpers import cosim_cmd, dask_processes, leftovers, one_line_error, wait_for
from typer.testing import CliRunner

from cosim_dask.cli.app import app
from cosim_dask.data.ingest import generate_store
from cosim_dask.data.reader import StoreSlice, read_slice
from cosim_dask.data.store import open_store
from cosim_dask.errors import CosimError, StoreError
from cosim_dask.fit.model import load_model
from cosim_dask.fit.train import make_pieces

runner = CliRunner()
STORE = {"pairs": 4_000, "dim": 8, "rank": 2, "targets": "binary", "chunk_rows": 1_000}


def _generate(path, seed: int, **kw) -> str:
    """A tiny store; returns its fingerprint."""
    generate_store(path, seed=seed, **STORE, **kw)
    return open_store(path).fingerprint


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The driver's and the worker's working directories, each with its own ``pairs.zarr``:
    the same shape, other pairs."""
    driver, worker = tmp_path_factory.mktemp("driver"), tmp_path_factory.mktemp("worker")
    _generate(driver / "pairs.zarr", seed=1)
    _generate(worker / "pairs.zarr", seed=2)
    return driver, worker


@pytest.fixture(scope="module")
def address(folders):
    """A scheduler and one worker whose working directory is not the driver's."""
    with dask_processes(workers=1, cwd=folders[1]) as (addr, _):
        yield addr


def test_relative_store_path_reads_the_drivers_store(folders, address, monkeypatch):
    driver, worker = folders
    assert open_store(driver / "pairs.zarr").fingerprint != \
        open_store(worker / "pairs.zarr").fingerprint
    args = ["--steps", "3", "--cache", "stream", "--scheduler", address]
    monkeypatch.chdir(driver)  # the driver's working directory: not the worker's
    relative = runner.invoke(app, ["train", "pairs.zarr", "--out", "rel.zarr", *args])
    assert relative.exit_code == 0, relative.output
    monkeypatch.chdir(worker)
    absolute = runner.invoke(app, ["train", str(driver / "pairs.zarr"), "--out",
                                   str(driver / "abs.zarr"), *args])
    assert absolute.exit_code == 0, absolute.output
    # The worker read the driver's store both times: the same run, the same A.
    np.testing.assert_array_equal(load_model(driver / "rel.zarr").A,
                                  load_model(driver / "abs.zarr").A)


def test_store_regenerated_mid_run_stops_the_run(tmp_path, address):
    store, out = tmp_path / "s.zarr", tmp_path / "m.zarr"
    started_with = _generate(store, seed=3)
    proc = subprocess.Popen(
        cosim_cmd("train", store, "--out", out, "--solver", "gd", "--steps", 1000, "--tol", 0,
                  "--checkpoint-every", 1, "--cache", "stream", "--scheduler", address),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: out.exists() and load_model(out).attrs["steps"] >= 2, 120,
                 "two checkpoints")
        # `cosim generate --overwrite` is refused while the run reads the store ...
        with pytest.raises(CosimError, match="in use by another cosim run"):
            _generate(store, seed=4, overwrite=True)
        # ... but a user's own `mv` of another store into place goes round the lock.
        found = _generate(tmp_path / "new.zarr", seed=4)
        os.rename(store, tmp_path / "aside.zarr")
        os.rename(tmp_path / "new.zarr", store)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, stderr
    one_line_error(stderr, "changed under this run", str(store), f"fingerprint {started_with}",
                   f"fingerprint {found}")
    model = load_model(out, with_solver=True)  # the last checkpoint, intact
    assert model.attrs["store_fingerprint"] == started_with and not model.attrs["complete"]
    assert leftovers(tmp_path) == []


def test_store_replaced_before_persisting_is_caught(tmp_path, address):
    """Memory mode reads each chunk once; those reads check the store too."""
    store = tmp_path / "s.zarr"
    started_with = _generate(store, seed=5)
    opened = open_store(store)
    found = _generate(store, seed=6, overwrite=True)
    with Client(address) as client:
        pieces = make_pieces(client, opened, "memory")
        with pytest.raises(StoreError, match=f"fingerprint {started_with}.*fingerprint {found}"):
            client.compute(list(pieces.held), sync=True)  # the persisted reads' outcome


def test_a_replaced_store_is_not_read_through_the_open_cache(tmp_path):
    store = tmp_path / "s.zarr"
    old = _generate(store, seed=7)
    first = read_slice(StoreSlice(str(store), 0, 0, 1_000, old))
    new = _generate(store, seed=8, overwrite=True)
    with pytest.raises(StoreError, match="changed under this run"):
        read_slice(StoreSlice(str(store), 0, 0, 1_000, old))
    again = read_slice(StoreSlice(str(store), 0, 0, 1_000, new))
    x_new = np.asarray(open_store(store).x[:1_000])
    np.testing.assert_array_equal(again[0], x_new)  # the new store's rows, not cached ones
    assert not np.array_equal(first[0], again[0])


def test_a_worker_that_cannot_see_the_store_says_so(tmp_path):
    hidden = tmp_path / "data"
    hidden.mkdir()
    store, out = hidden / "s.zarr", tmp_path / "m.zarr"
    _generate(store, seed=9)
    marker = hidden / "visible"
    marker.touch()

    def behind_tmpfs(command: list[str]) -> list[str]:
        # A mount namespace of the worker's own, with an empty tmpfs over the store's folder.
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs none "$0" && exec "$@"', str(hidden), *command]

    with dask_processes(workers=1, wrap=behind_tmpfs) as (addr, _), \
            Client(addr) as client:
        client.wait_for_workers(1, timeout=60)
        # The worker sees an empty folder where the driver sees the store.
        assert client.run(lambda: os.path.exists(marker)) == {
            w: False for w in client.scheduler_info()["workers"]}
        result = runner.invoke(app, ["train", str(store), "--out", str(out), "--steps", "2",
                                     "--scheduler", addr])
    assert result.exit_code == 2, result.output
    one_line_error(result.stderr, "workers cannot see the pair store", str(store),
                   "filesystem every worker mounts", "object-store URL")
    assert not out.exists()
