"""Crash consistency of model writes: the driver is SIGKILLed just before each file-system
operation of every checkpoint write and of the final write, in turn (tests/fit/crash_driver.py
counts them). After every kill the model path opens as a complete model (the old version or
the new one, never a part and never nothing once one was written), and ``--resume`` reaches
the bitwise-same A as the uninterrupted run. Both ways of swapping folders are covered: the
atomic exchange, and two renames whose interruption the next open repairs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import leftovers, one_line_error, tree_hash
from typer.testing import CliRunner

from cosim_dask.cli.app import app
from cosim_dask.data.ingest import generate_store
from cosim_dask.fit.model import load_model

DRIVER = Path(__file__).with_name("crash_driver.py")
ARGS = ["--steps", "4", "--checkpoint-every", "2", "--tol", "0", "--validation", "0.2"]
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cluster_address):
    folder = tmp_path_factory.mktemp("crash")
    store = folder / "s.zarr"
    generate_store(store, pairs=3_000, dim=8, rank=3, targets="binary", seed=2,
                   chunk_rows=1_000)
    return store, cluster_address  # the driver is killed, never the shared cluster


@pytest.fixture(scope="module")
def driver():
    """One crash driver for the module: it forks a child per run (see crash_driver.py)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen([sys.executable, str(DRIVER)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    yield server
    server.stdin.close()
    server.wait(timeout=30)


def train(driver, store, out, address, kill_at: int, swap: str = "exchange", args=ARGS
          ) -> subprocess.CompletedProcess:
    """`cosim train` in a child of the crash driver, killed before operation ``kill_at``."""
    argv = ["train", str(store), "--out", str(out), *args, "--scheduler", address]
    driver.stdin.write(json.dumps({"argv": argv, "kill_at": kill_at, "swap": swap}) + "\n")
    driver.stdin.flush()
    reply = driver.stdout.readline()
    assert reply, f"the crash driver died (exit {driver.poll()})"
    done = json.loads(reply)
    return subprocess.CompletedProcess(argv, done["returncode"], "", done["stderr"])


@pytest.mark.slow
@pytest.mark.parametrize("swap", ["exchange", "renames"])
def test_kill_at_every_write_operation_resumes_to_the_same_a(setup, driver, tmp_path,
                                                             swap):
    store, address = setup
    reference = tmp_path / "reference.zarr"
    assert train(driver, store, reference, address, 0, swap).returncode == 0
    expected = load_model(reference)
    assert expected.attrs["complete"] and expected.attrs["steps"] == 4
    # Both modes write the first checkpoint the same way (a rename, nothing to swap) and swap
    # the second checkpoint and the final model by the same code: the exchange mode kills at
    # every operation, the two-rename mode at every operation of the final write.
    first = 1 if swap == "exchange" else 8
    kill_at, kills = first, 0
    while True:
        out = tmp_path / f"m{kill_at}.zarr"
        run = train(driver, store, out, address, kill_at, swap)
        if run.returncode == 0:  # past the last operation: nothing left to kill
            break
        assert run.returncode == -signal.SIGKILL, run.stderr
        kills += 1
        # The path opens as a whole model, or holds nothing if no version was published yet.
        if out.exists() or any(".old-" in p for p in leftovers(tmp_path)):
            model = load_model(out, with_solver=True)
            assert model.attrs["steps"] in (2, 4)
            if model.attrs["complete"]:
                np.testing.assert_array_equal(model.A, expected.A)
            resume = ["--resume"]
        else:
            resume = []
        result = runner.invoke(app, ["train", str(store), "--out", str(out), *ARGS,
                                     "--scheduler", address, *resume])
        assert result.exit_code == 0, (kill_at, result.output)
        final = load_model(out)
        assert final.attrs["complete"], kill_at
        np.testing.assert_array_equal(final.A, expected.A)  # bitwise
        assert [p for p in leftovers(tmp_path) if not p.endswith(".lock")] == [], kill_at
        kill_at += 1
    # The first checkpoint (publish, rename), then publish, swap and removal of the old version
    # for the second checkpoint and the final model: 8 operations; with two renames a swap the
    # final write is publish, the refused exchange, two renames and the removal: 5.
    assert kills == (8 if swap == "exchange" else 5), kills


def test_a_run_that_stopped_by_itself_resumes_to_nothing_more(setup, driver, tmp_path):
    """The stopping rule fires at step k, where a checkpoint is also written; the run is killed
    after the final evaluation pass, before the final write. The resume must not take a step
    k + 1: it ends on the uninterrupted A, bitwise. A complete model then resumes to nothing."""
    store, address = setup
    common = ["--tol", "1e-3", "--steps", "40", "--validation", "0.2"]
    whole = tmp_path / "whole.zarr"
    cosim_train = ["train", str(store), "--scheduler", address, *common]
    assert runner.invoke(app, [*cosim_train, "--out", str(whole)]).exit_code == 0
    expected = load_model(whole)
    k = expected.attrs["steps"]
    assert 1 <= k < 40 and expected.attrs["stop_reason"].startswith("relative loss change")
    part = tmp_path / "part.zarr"
    # Operations: the checkpoint at step k (publish, rename), then the final write's publish.
    run = train(driver, store, part, address, 3, args=[*common, "--checkpoint-every", str(k)])
    assert run.returncode == -signal.SIGKILL, run.stderr
    checkpoint = load_model(part)
    assert checkpoint.attrs["steps"] == k and not checkpoint.attrs["complete"]
    result = runner.invoke(app, [*cosim_train, "--out", str(part), "--resume",
                                 "--checkpoint-every", str(k)])
    assert result.exit_code == 0, result.output
    final = load_model(part)
    assert final.attrs["complete"] and final.attrs["steps"] == k
    np.testing.assert_array_equal(final.A, expected.A)
    # Resuming the complete model: nothing to do, nothing rewritten, even with more steps.
    before = tree_hash(part)
    for steps in ("40", "80"):
        result = runner.invoke(app, [*cosim_train, "--out", str(part), "--resume",
                                     "--checkpoint-every", str(k), "--steps", steps])
        assert result.exit_code == 0, result.output
        assert "nothing to resume" in result.output and "stopped by itself" in result.output
        assert tree_hash(part) == before


def test_resume_with_another_fan_in_is_refused(setup, tmp_path):
    """The fan-in of the reduction tree orders the float sums: a resume may not change it."""
    store, address = setup
    out = tmp_path / "m.zarr"
    base = ["train", str(store), "--out", str(out), "--scheduler", address, "--steps", "2"]
    assert runner.invoke(app, [*base, "--split-every", "2"]).exit_code == 0
    before = tree_hash(out)
    result = runner.invoke(app, [*base[:-1], "4", "--resume"])
    assert result.exit_code == 2
    one_line_error(result.stderr, "--split-every 2, now 8")
    assert tree_hash(out) == before
