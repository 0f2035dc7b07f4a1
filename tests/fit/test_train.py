"""`cosim train` / `cosim evaluate` end to end on real stores and real LocalClusters.

Most commands join the session's shared cluster with ``--scheduler``; the ``trained`` model
and the SIGKILLed run start their own LocalCluster, as `cosim train` does by default."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from helpers import dask_processes, free_port, one_line_error
from typer.testing import CliRunner

from cosim_dask.cli.app import app
from cosim_dask.data.store import open_store
from cosim_dask.fit.model import load_model

runner = CliRunner()
CLUSTER = ["--workers", "2", "--threads-per-worker", "1"]  # a LocalCluster of its own


def cosim(*args, expect=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


@pytest.fixture(scope="module")
def binary_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "binary.zarr"
    cosim("generate", path, "--pairs", 24000, "--dim", 16, "--rank", 3, "--noise", 0.05,
          "--targets", "binary", "--seed", 1, "--chunk-pairs", 4000)
    return path


@pytest.fixture(scope="module")
def graded_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "graded.zarr"
    cosim("generate", path, "--pairs", 16000, "--dim", 10, "--rank", 3, "--noise", 0.0,
          "--targets", "graded", "--seed", 2, "--chunk-pairs", 3000)
    return path


@pytest.fixture(scope="module")
def trained(binary_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "m.zarr"
    result = cosim("train", binary_store, "--out", out, "--steps", 25, *CLUSTER)
    return out, result


def test_train_writes_a_model_that_beats_plain_cosine(trained):
    out, result = trained
    model = load_model(out)
    assert model.A.shape == (16, 16)
    assert np.linalg.eigvalsh(model.A)[0] > -1e-10  # A = MᵀM: PSD by construction
    assert model.M.shape == (16, 16)
    assert np.trace(model.A) == pytest.approx(16)  # scale-free loss: stored at trace d
    np.testing.assert_allclose(model.M.T @ model.M, model.A, rtol=1e-10, atol=1e-10)
    attrs = model.attrs
    assert attrs["complete"] and attrs["steps"] == len(attrs["history"]) - 1
    assert attrs["loss"] == "mse" and attrs["solver"] == "stream+lbfgs"
    val = attrs["validation_figures"]
    assert val["learned"]["auc"] > val["plain"]["auc"] + 0.05
    # Step 0: the first pass's average, with its validation figures after that one pass;
    # its training loss and gradient come with step 1 (the full pass at the average).
    first = attrs["history"][0]
    assert first["loss"] is None and first["grad_norm"] is None
    assert first["val_auc"] is not None and first["evaluations"] == 1
    assert attrs["history"][1]["evaluations"] >= 2
    losses = [h["loss"] for h in attrs["history"][1:]]
    passes = [h["passes"] for h in attrs["history"]]
    assert passes[:2] == [1, 3] and passes == sorted(passes)
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))  # Armijo steps
    assert "Dask dashboard: http://127.0.0.1:" in result.output
    assert "learned A" in result.output and "model written to" in result.output


def test_evaluate_reports_learned_and_plain(trained, binary_store, cluster_address,
                                            monkeypatch):
    from cosim_dask.cli import train as model_module  # the CLI's reference to load_model

    reads, original = [], model_module.load_model

    def load_model_counted(path, **kw):
        reads.append(path)
        return original(path, **kw)

    monkeypatch.setattr(model_module, "load_model", load_model_counted)
    out, _ = trained
    result = cosim("evaluate", out, binary_store, "--json", "--scheduler", cluster_address)
    monkeypatch.undo()
    assert len(reads) == 1  # checked before the cluster starts, and not read again
    report = json.loads(result.stdout)
    assert report["split"] == "validation"
    model = load_model(out)
    # The same validation rows and thresholds as at training time: the same figures.
    assert report["learned"]["auc"] == pytest.approx(
        model.attrs["validation_figures"]["learned"]["auc"], abs=1e-12)
    assert report["learned"]["auc"] > report["plain"]["auc"]
    assert report["learned"]["pairs"] == model.attrs["validation_figures"]["learned"]["pairs"]


def test_graded_targets_recover_hidden_metric(graded_store, tmp_path, cluster_address):
    out = tmp_path / "g.zarr"
    cosim("train", graded_store, "--out", out, "--steps", 60, "--validation", 0.1,
          "--scheduler", cluster_address)
    A = load_model(out).A
    A_star = open_store(graded_store).hidden_metric
    cos = np.sum(A * A_star) / np.linalg.norm(A) / np.linalg.norm(A_star)
    assert cos >= 0.99


def test_a_graded_store_gets_the_graded_first_pass(graded_store, tmp_path, cluster_address):
    """`cosim train` picks the first pass's fit from the store's target kind: after step 0
    a graded store's model is the graded fit's average, computed in this process on the same
    chunks, rows and seed, and not the binary labels' fit's."""
    from threadpoolctl import threadpool_limits

    from cosim_dask.core.local import GRADED_FIT, LocalFit
    from cosim_dask.core.objective import Objective
    from cosim_dask.dist.passes import LocalPairs
    from cosim_dask.fit.config import TrainConfig

    out = tmp_path / "g.zarr"
    cosim("train", graded_store, "--out", out, "--steps", 0, "--validation", 0.1,
          "--scheduler", cluster_address)
    model = load_model(out)
    assert model.history[0]["passes"] == 1.0
    root = zarr.open_group(graded_store, mode="r")
    x, y, t = (root[name][...] for name in ("x", "y", "target"))
    config = TrainConfig(validation=0.1)
    form = config.make_parameterisation()
    averages = {}
    for name, fit in (("graded", GRADED_FIT), ("binary", LocalFit())):
        source = LocalPairs(x, y, t, form, config.make_loss(binary=False), chunk_rows=3000,
                            validation=0.1, seed=config.seed)
        with threadpool_limits(limits=1):  # as the workers run
            params = Objective(form, source).local_average(form.initial(10), fit)
        averages[name] = form.metric(params)
    np.testing.assert_allclose(model.A, averages["graded"], rtol=1e-9, atol=1e-12)
    assert not np.allclose(model.A, averages["binary"], rtol=1e-3)


def test_factor_form_and_stream_equals_memory(binary_store, tmp_path, cluster_address):
    models = {}
    for cache in ("memory", "stream"):
        out = tmp_path / f"{cache}.zarr"
        cosim("train", binary_store, "--out", out, "--param", "factor", "--rank", 4,
              "--steps", 5, "--cache", cache, "--scheduler", cluster_address)
        models[cache] = load_model(out)
    assert models["memory"].M.shape == (4, 16)
    np.testing.assert_array_equal(models["memory"].A, models["stream"].A)


def counting_model_reads(monkeypatch) -> list:
    """Count the model files cosim_dask.fit.train reads (paths, in order)."""
    from cosim_dask.fit import train

    reads, original = [], train.load_model

    def load_model_counted(path, **kw):
        reads.append(str(path))
        return original(path, **kw)

    monkeypatch.setattr(train, "load_model", load_model_counted)
    return reads


@pytest.mark.parametrize("solver,cut,negatives", [("lbfgs", 3, 0), ("stream+lbfgs", 0, 0),
                                                  ("stream+lbfgs", 0, 2)])
def test_resume_equals_uninterrupted(binary_store, tmp_path, cluster_address, monkeypatch,
                                     solver, cut, negatives):
    """Cut mid-run (L-BFGS), or (the default schedule) right after its streaming first
    pass, with or without in-chunk negatives, then resumed: the same metric, history and
    passes as one uninterrupted run."""
    whole, part = tmp_path / "whole.zarr", tmp_path / "part.zarr"
    common = ["--steps", 8, "--checkpoint-every", 2, "--solver", solver,
              "--negatives", negatives, "--scheduler", cluster_address]
    cosim("train", binary_store, "--out", whole, *common)
    cosim("train", binary_store, "--out", part, *common[:1], cut, *common[2:])
    assert load_model(part).attrs["steps"] == cut
    reads = counting_model_reads(monkeypatch)
    cosim("train", binary_store, "--out", part, "--resume", *common)
    assert reads == [str(part)]  # read once: checked before start-up, then resumed from
    a, b = load_model(whole), load_model(part)
    np.testing.assert_array_equal(a.A, b.A)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert [h["passes"] for h in a.history] == [h["passes"] for h in b.history]


def test_checkpoint_rewritten_after_the_checks_is_read_again(trained, binary_store, tmp_path,
                                                            monkeypatch):
    import shutil

    from cosim_dask.fit.loop import TrainConfig
    from cosim_dask.fit.model import save_model
    from cosim_dask.fit.train import RunOptions, check_request

    out = tmp_path / "m.zarr"
    shutil.copytree(trained[0], out)
    config = TrainConfig(**load_model(out).attrs["settings"])
    reads = counting_model_reads(monkeypatch)
    args = (str(binary_store), str(out), config, RunOptions())
    _, checkpoint = check_request(*args, resume=True)
    assert check_request(*args, resume=True, checkpoint=checkpoint)[1] is checkpoint
    assert len(reads) == 1
    save_model(out, checkpoint.model, overwrite=True)  # as another run would, meanwhile
    _, again = check_request(*args, resume=True, checkpoint=checkpoint)
    assert again is not checkpoint and len(reads) == 2


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(binary_store, tmp_path, cluster_address):
    whole, killed = tmp_path / "whole.zarr", tmp_path / "killed.zarr"
    args = ["--steps", 12, "--checkpoint-every", 1, "--solver", "gd"]
    shared = ["--scheduler", cluster_address]
    cosim("train", binary_store, "--out", whole, *args, *shared)
    # The killed run starts its own LocalCluster, which dies with it.
    cmd = [sys.executable, "-m", "cosim_dask", "train", str(binary_store), "--out", str(killed),
           *map(str, args), *CLUSTER]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if killed.exists() and load_model(killed).attrs["steps"] >= 3:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its LocalCluster, at once
    proc.wait()
    steps_done = load_model(killed).attrs["steps"]
    assert 3 <= steps_done < 12
    cosim("train", binary_store, "--out", killed, "--resume", *args, *shared)
    np.testing.assert_array_equal(load_model(whole).A, load_model(killed).A)


@pytest.mark.slow
def test_train_through_external_scheduler_and_workers(binary_store, tmp_path):
    with dask_processes(workers=2) as (address, _):
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        out = tmp_path / "ext.zarr"
        cosim("train", binary_store, "--out", out, "--steps", 5, "--scheduler", address)
        assert 1 <= load_model(out).attrs["steps"] <= 5
        # Dask's own environment variable works too.
        out2 = tmp_path / "ext2.zarr"
        result = runner.invoke(app, ["train", str(binary_store), "--out", str(out2),
                                     "--steps", "5"], env={"DASK_SCHEDULER_ADDRESS": address})
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(load_model(out).A, load_model(out2).A)


# --- bad input: one line, exit 2, nothing good overwritten ------------------------------


def _one_line_error(result, *fragments):
    """Exit 2, exactly one error line naming the problem, no traceback."""
    assert result.exit_code == 2, result.output
    one_line_error(result.stderr, *fragments)


def test_existing_out_needs_overwrite(trained, binary_store):
    out, _ = trained
    before = load_model(out).A.copy()
    result = runner.invoke(app, ["train", str(binary_store), "--out", str(out), "--steps", "1"])
    _one_line_error(result, "already exists", "--overwrite")
    np.testing.assert_array_equal(load_model(out).A, before)


@pytest.mark.parametrize("args,fragments", [
    (["--param", "factor", "--rank", "17"], ["rank=17", "d=16"]),
    (["--param", "full", "--rank", "3"], ["factor form"]),
    (["--validation", "0", "--patience", "2"], ["patience needs validation"]),
    (["--resume", "--overwrite"], ["contradict"]),
])
def test_bad_training_options(binary_store, tmp_path, args, fragments):
    out = tmp_path / "m.zarr"
    result = runner.invoke(app, ["train", str(binary_store), "--out", str(out), *args, *CLUSTER])
    _one_line_error(result, *fragments)
    assert not out.exists()


def test_resume_needs_a_checkpoint_and_the_same_settings(binary_store, tmp_path,
                                                         cluster_address):
    out = tmp_path / "m.zarr"
    result = runner.invoke(app, ["train", str(binary_store), "--out", str(out), "--resume"])
    _one_line_error(result, "nothing to resume")
    cosim("train", binary_store, "--out", out, "--steps", 2, "--scheduler", cluster_address)
    before = load_model(out).A.copy()
    result = runner.invoke(app, ["train", str(binary_store), "--out", str(out), "--resume",
                                 "--loss", "contrastive", "--steps", "4",
                                 "--scheduler", cluster_address])
    _one_line_error(result, "different settings", "loss='mse' now 'contrastive'")
    np.testing.assert_array_equal(load_model(out).A, before)


def test_unreachable_scheduler_fails_fast(binary_store, tmp_path):
    started = time.monotonic()
    result = runner.invoke(app, ["train", str(binary_store), "--out", str(tmp_path / "m"),
                                 "--scheduler", f"tcp://127.0.0.1:{free_port()}"])
    _one_line_error(result, "cannot reach the Dask scheduler")
    assert time.monotonic() - started < 30


def test_invalid_rows_stop_training_and_keep_the_old_model(binary_store, trained, tmp_path,
                                                           cluster_address):
    broken = tmp_path / "broken.zarr"
    import shutil

    shutil.copytree(binary_store, broken)
    x = zarr.open_group(broken, mode="r+")["x"]
    x[9000] = 0.0  # chunk 2 (4,000 rows per chunk), row 1,000 within it
    out, _ = trained
    before = load_model(out).A.copy()
    result = runner.invoke(app, ["train", str(broken), "--out", str(out), "--overwrite",
                                 "--scheduler", cluster_address])
    _one_line_error(result, "in chunk 2", "--drop-invalid")
    np.testing.assert_array_equal(load_model(out).A, before)
    # --skip-invalid trains on and counts them.
    skip = tmp_path / "skip.zarr"
    cosim("train", broken, "--out", skip, "--steps", 2, "--skip-invalid",
          "--scheduler", cluster_address)


def test_evaluate_rejects_a_model_of_another_dimension(trained, graded_store, cluster_address):
    out, _ = trained
    result = runner.invoke(app, ["evaluate", str(out), str(graded_store),
                                 "--scheduler", cluster_address])
    _one_line_error(result, "d=16", "d=10")


def test_evaluate_rejects_what_is_not_a_model(binary_store, tmp_path, cluster_address):
    result = runner.invoke(app, ["evaluate", str(binary_store), str(binary_store),
                                 "--scheduler", cluster_address])
    _one_line_error(result, "is not a cosim model")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nope"), str(binary_store)])
    _one_line_error(result, "does not exist")


def test_training_publishes_every_step_to_the_live_dashboard(binary_store, tmp_path, client):
    """The real trainer's steps reach the dashboard's JSON route, in order, per run id."""
    import urllib.request

    from cosim_dask.dashboard.publisher import dashboard_url
    from cosim_dask.fit.loop import TrainConfig
    from cosim_dask.fit.train import train_store

    runs = {}
    for run_id, steps in (("run-a", 4), ("run-b", 6)):
        seen = []
        result = train_store(str(binary_store), str(tmp_path / f"{run_id}.zarr"),
                             TrainConfig(steps=steps, tol=0.0, gtol=0.0), client=client,
                             run_id=run_id, on_step=seen.append)
        runs[run_id] = (result, seen)
    root = dashboard_url(client).rsplit("/status", 1)[0].rstrip("/") + "/"
    for run_id, (result, seen) in runs.items():
        with urllib.request.urlopen(f"{root}cosim/api/runs/{run_id}", timeout=10) as r:
            data = json.load(r)
        logged = data["steps"]
        assert [s["step"] for s in logged] == [r["step"] for r in seen]
        assert [s["loss"] for s in logged] == pytest.approx([r["loss"] for r in seen])
        assert [s["val_auc"] for s in logged] == pytest.approx([r["val_auc"] for r in seen])
        assert result.model.attrs["run_id"] == run_id
