"""The output policy (cosim_dask.outputs) with real processes: locks that die with their
holder, two writers at once, signals in the middle of a write, a full disk, symlinked outputs.
(Refusals of inputs and of other kinds of artifact: tests/cli/test_bad_input.py. Kills at every
file-system operation of a model write: tests/fit/test_crash.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import cosim_cmd, leftovers, one_line_error, tree_hash, wait_for

from cosim_dask.data.ingest import generate_store
from cosim_dask.data.store import open_store
from cosim_dask.errors import CosimError
from cosim_dask.fit.model import Model, load_model, save_model
from cosim_dask.outputs import MODEL, PAIR_STORE, claim_output, reading

#: A process that claims PATH (or reads it with "read") and says so, then waits to be killed.
HOLDER = """
import sys, time
from cosim_dask.outputs import PAIR_STORE, claim_output, reading
path, how = sys.argv[1], sys.argv[2]
with (reading(path) if how == "read" else claim_output(path, PAIR_STORE, overwrite=True)):
    print("holding", flush=True)
    time.sleep(600)
"""


def hold(path: Path, how: str = "write") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), how],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def generate(path: Path, *extra, pairs: int = 2_000, seed: int = 0, **kwargs):
    return subprocess.run(cosim_cmd("generate", path, "--pairs", pairs, "--dim", 8,
                                    "--seed", seed, *extra),
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_a_second_writer_is_refused_and_the_lock_dies_with_its_holder(tmp_path):
    store = tmp_path / "s.zarr"
    holder = hold(store)
    try:
        result = generate(store)
        assert result.returncode == 2
        one_line_error(result.stderr, "is in use by another cosim run", f"pid {holder.pid}",
                       "s.zarr.lock")
        assert not store.exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the lock file stays behind ...
        holder.wait()
    assert (tmp_path / "s.zarr.lock").exists()
    result = generate(store)  # ... and locks nothing
    assert result.returncode == 0, result.stderr
    assert open_store(store).n == 2_000
    assert leftovers(tmp_path) == []


def test_a_store_being_read_is_not_replaced(tmp_path):
    store = tmp_path / "s.zarr"
    generate_store(store, pairs=500, dim=4, seed=1)
    before = tree_hash(store)
    readers = [hold(store, "read"), hold(store, "read")]  # readers share the lock
    try:
        result = generate(store, "--overwrite")
        assert result.returncode == 2
        one_line_error(result.stderr, "is in use by another cosim run", "reading")
        with pytest.raises(CosimError, match="in use"), claim_output(store, PAIR_STORE,
                                                                      overwrite=True):
            pass
        assert tree_hash(store) == before
    finally:
        for r in readers:
            r.kill()
            r.wait()
    with reading(store), reading(store):
        pass
    assert generate(store, "--overwrite").returncode == 0
    assert leftovers(tmp_path) == []


def test_two_generates_to_one_new_path_one_wins(tmp_path):
    store = tmp_path / "s.zarr"
    args = cosim_cmd("generate", store, "--pairs", 400_000, "--dim", 16)
    procs = [subprocess.Popen(args + ["--seed", str(seed)], stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)]
    outcomes = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    loser = next(err for code, err in outcomes if code == 2)
    one_line_error(loser, str(store))
    assert "in use by another cosim run" in loser or "already exists" in loser
    winner_seed = 1 + [code for code, _ in outcomes].index(0)
    assert open_store(store).attrs["provenance"]["params"]["seed"] == winner_seed
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"),
                                           (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_write_keeps_the_old_store_and_leaves_nothing(tmp_path, sig, code, word):
    store = tmp_path / "s.zarr"
    generate_store(store, pairs=500, dim=4, seed=1)
    before = tree_hash(store)
    proc = subprocess.Popen(cosim_cmd("generate", store, "--pairs", 3_000_000, "--dim", 64,
                                      "--overwrite", "--chunk-pairs", 20_000),
                            stderr=subprocess.PIPE, text=True)
    # Wait until the new version is being written (its temporary folder holds chunks).
    wait_for(lambda: any(p.name.startswith(".s.zarr.tmp-") and (p / "x").exists()
                         for p in tmp_path.iterdir()), 60, "the temporary store")
    time.sleep(0.3)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip().splitlines() == [word], stderr
    assert tree_hash(store) == before
    assert leftovers(tmp_path) == []


def test_litter_of_a_killed_writer_is_removed_by_the_next(tmp_path):
    store = tmp_path / "s.zarr"
    generate_store(store, pairs=500, dim=4, seed=1)
    proc = subprocess.Popen(cosim_cmd("generate", store, "--pairs", 3_000_000, "--dim", 64,
                                      "--overwrite", "--chunk-pairs", 20_000),
                            stderr=subprocess.DEVNULL)
    wait_for(lambda: any(p.name.startswith(".s.zarr.tmp-") for p in tmp_path.iterdir()), 60,
             "the temporary store")
    proc.kill()
    proc.wait()
    assert [p for p in leftovers(tmp_path) if ".tmp-" in p]
    open_store(store)  # the old one, whole
    assert generate(store, "--overwrite", pairs=300).returncode == 0
    assert leftovers(tmp_path) == []
    assert open_store(store).n == 300


def test_a_symlinked_output_stays_a_link_to_the_replaced_target(tmp_path):
    real = tmp_path / "data" / "s.zarr"
    real.parent.mkdir()
    generate_store(real, pairs=500, dim=4, seed=1)
    link = tmp_path / "current.zarr"
    link.symlink_to(real)
    assert generate(link, "--overwrite", pairs=700).returncode == 0
    assert link.is_symlink() and link.resolve() == real
    assert open_store(real).n == 700
    assert leftovers(tmp_path) == [] and leftovers(real.parent) == []
    # A model through a link too (the estimator's save goes the same way).
    model_link = tmp_path / "model"
    model_link.symlink_to(tmp_path / "data" / "m.zarr")  # dangling: created through it
    save_model(model_link, Model(A=np.eye(3)))
    save_model(model_link, Model(A=2 * np.eye(3)), overwrite=True)
    assert model_link.is_symlink()
    np.testing.assert_array_equal(load_model(model_link).A, 2 * np.eye(3))


def test_writer_errors_leave_the_old_version_and_no_litter(tmp_path):
    out = tmp_path / "m.zarr"
    save_model(out, Model(A=np.eye(3)))
    before = tree_hash(out)
    with pytest.raises(RuntimeError), claim_output(out, MODEL, overwrite=True) as target, \
            target.staged() as tmp:
        (tmp / "zarr.json").write_text("{}")
        raise RuntimeError("boom")
    assert tree_hash(out) == before
    assert leftovers(tmp_path) == []


def test_transform_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A real full file system: a 1 MiB tmpfs mounted in a private mount namespace (so nothing
    outlives the test). The old transform wrote through a memory map of a sparse file and died
    of SIGBUS, leaving the temporary file behind."""
    save_model(tmp_path / "m.zarr", Model(A=np.eye(32)))
    np.save(tmp_path / "emb.npy", np.ones((20_000, 32), dtype=np.float32))  # 2.5 MiB out
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=1m none {disk} || exit 99; "
              f"{sys.executable} -m cosim_dask transform {tmp_path}/m.zarr {tmp_path}/emb.npy "
              f"{disk}/out.npy; rc=$?; echo left: $(ls -A {disk}); exit $rc")
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep
                                                       .join(sys.path)})
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    one_line_error(proc.stderr, "cannot write .npy array", "No space left on device",
                   "nothing was written")
    assert proc.stdout.strip() == "left:", proc.stdout


def test_the_estimators_save_goes_through_the_same_policy(tmp_path, rng):
    from cosim_dask.estimator import CosineMetricLearner

    pairs = rng.standard_normal((400, 2, 5))
    y = np.where(rng.random(400) < 0.5, -1.0, 1.0)
    learner = CosineMetricLearner(max_iter=3).fit(pairs, y)
    out = tmp_path / "m.zarr"
    learner.save(out)
    np.testing.assert_array_equal(load_model(out).A, learner.get_mahalanobis_matrix())
    with pytest.raises(CosimError, match="already exists"):
        learner.save(out)
    store = tmp_path / "s.zarr"
    generate_store(store, pairs=100, dim=5, seed=1)
    before = tree_hash(store)
    with pytest.raises(CosimError, match="refusing to replace .* not a cosim model"):
        learner.save(store, overwrite=True)
    assert tree_hash(store) == before
    learner.save(out, overwrite=True)
    assert leftovers(tmp_path) == []
