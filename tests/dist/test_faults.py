"""Faults on real clusters: a worker, the scheduler or the driver dying, damaged stores,
concurrent runs and a full disk. (Driver SIGKILL then --resume: tests/fit/test_train.py,
test_resume_after_sigkill_equals_uninterrupted.)"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster
from helpers import (
    cosim_cmd,
    dask_processes,
    leftovers,
    one_line_error,
    tree_hash,
    wait_for,
)
from typer.testing import CliRunner

from cosim_dask.cli.app import app
from cosim_dask.data.ingest import generate_store
from cosim_dask.dist import passes
from cosim_dask.fit.loop import TrainConfig
from cosim_dask.fit.model import load_model
from cosim_dask.fit.train import RunOptions, train_store

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "s.zarr"
    generate_store(path, pairs=60_000, dim=16, rank=3, targets="binary", seed=3,
                   chunk_rows=3_000)
    return path


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "small.zarr"
    generate_store(path, pairs=4_000, dim=8, rank=2, targets="graded", seed=4,
                   chunk_rows=1_000)
    return path


# --- 1. a worker SIGKILLed in the middle of a step --------------------------------------


def _kill_a_busy_worker(monitor: Client, pids: dict[str, int]) -> float:
    """SIGKILL a worker that is running a chunk task (or a run of chunks) right now; the
    time of the kill."""
    while True:
        busy = [w for w, keys in monitor.processing().items()
                if any(str(k).startswith(("cosim-chunk-", "cosim-run-")) for k in keys)]
        if busy:
            os.kill(pids[busy[0]], signal.SIGKILL)
            return time.monotonic()
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize("workers,cache", [(2, "stream"), (2, "memory"), (1, "stream")])
def test_worker_sigkill_mid_step_gives_the_undisturbed_result(store, tmp_path, workers, cache):
    """Chunks are recomputed from the store (lineage). With one worker the scattered
    parameters die with it too (no lineage): the pass is sent again, same result."""
    config = TrainConfig(steps=5, tol=0.0, gtol=0.0, validation=0.1)
    options = RunOptions(cache=cache, checkpoint_every=None)
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client, Client(cluster.scheduler_address) as monitor:
        calm = train_store(str(store), str(tmp_path / "calm.zarr"), config, client=client,
                           options=options, dashboard=False)
        pids = monitor.run(os.getpid)
        windows, second_step, outcome = [], threading.Event(), {}

        def on_step(record):
            now = time.monotonic()
            windows.append((now - record["step_seconds"], now))
            if record["step"] == 1:
                second_step.set()

        def train():
            try:
                outcome["result"] = train_store(
                    str(store), str(tmp_path / "killed.zarr"), config, client=client,
                    options=options, dashboard=False, on_step=on_step)
            except BaseException as exc:  # reported below
                outcome["error"] = exc
            finally:
                second_step.set()

        thread = threading.Thread(target=train)
        thread.start()
        assert second_step.wait(120)
        killed_at = _kill_a_busy_worker(monitor, pids)
        thread.join(180)
        assert "error" not in outcome, outcome.get("error")
        # The kill landed inside a step, and the nanny brought a new worker process.
        assert any(lo <= killed_at <= hi for lo, hi in windows[1:]), (killed_at, windows)
        wait_for(lambda: len(monitor.run(os.getpid)) == workers, 60, "the restarted worker")
        assert set(monitor.run(os.getpid).values()) != set(pids.values())
    killed = outcome["result"]
    np.testing.assert_array_equal(killed.model.A, calm.model.A)  # bitwise
    assert [h["loss"] for h in killed.state.history] == [h["loss"] for h in calm.state.history]


# --- 3. the scheduler lost mid-run -------------------------------------------------------


@pytest.mark.slow
def test_scheduler_lost_stops_with_resume_instructions(small_store, tmp_path, cluster_address):
    out = tmp_path / "m.zarr"
    args = ["--steps", 400, "--solver", "gd", "--tol", 0, "--checkpoint-every", 1]
    with dask_processes(workers=2) as (address, procs):
        proc = subprocess.Popen(cosim_cmd("train", small_store, "--out", out, *args,
                                          "--scheduler", address),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: out.exists() and load_model(out).attrs["steps"] >= 3, 120,
                     "three checkpoints")
            procs[0].kill()  # the scheduler
            killed_at = time.monotonic()
            _, stderr = proc.communicate(timeout=90)
            stopped_after = time.monotonic() - killed_at
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 2, stderr
    assert stopped_after <= 60, stopped_after
    line = one_line_error(stderr, "training stopped after step", "lost the Dask scheduler",
                          "is intact", f"cosim train {small_store} --out {out} --resume")
    saved = int(re.search(r"last checkpoint \(step (\d+)\)", line).group(1))
    reached = int(re.search(r"after step (\d+)", line).group(1))
    assert 3 <= saved <= reached
    model = load_model(out, with_solver=True)  # loadable, and the step the message names
    assert model.attrs["steps"] == saved and not model.attrs["complete"]
    assert leftovers(tmp_path) == []
    # The command it prints works (on another cluster: the shared one).
    result = runner.invoke(app, ["train", str(small_store), "--out", str(out), "--resume",
                                 *map(str, args[:1]), str(saved + 2), *map(str, args[2:]),
                                 "--scheduler", cluster_address])
    assert result.exit_code == 0, result.output
    assert load_model(out).attrs["steps"] == saved + 2


# --- 4. a damaged store: a clear error naming array and chunk, no NaN model ---------------


def _damage(store: Path, tmp_path: Path, codec: str, array: str, how: str) -> Path:
    broken = tmp_path / f"broken-{codec}.zarr"
    if codec == "none":
        shutil.copytree(store, broken)
    else:
        generate_store(broken, pairs=4_000, dim=8, rank=2, targets="graded", seed=4,
                       chunk_rows=1_000, codec=codec)
    key = "c/2/0" if array != "target" else "c/2"
    chunk = broken / array / key
    data = chunk.read_bytes()
    if how == "missing":
        chunk.unlink()
    elif how == "truncated":
        chunk.write_bytes(data[: len(data) // 2])
    else:  # a corrupt header: the decoder itself fails
        chunk.write_bytes(b"\xff" * 4 + data[4:])
    return broken


@pytest.mark.parametrize("codec,array,how,cache,fragment", [
    ("none", "x", "truncated", "stream", "has 16000 bytes, expected 32000"),
    ("none", "target", "missing", "stream", "is missing"),  # graded: zeros would be valid
    ("none", "y", "missing", "memory", "is missing"),
    ("lz4", "y", "truncated", "stream", "blosc header says"),  # blosc decodes it silently
    ("lz4", "x", "corrupt", "memory", "cannot read chunk 2"),
])
def test_damaged_chunk_is_a_clear_error(small_store, tmp_path, cluster_address, codec, array,
                                        how, cache, fragment):
    broken = _damage(small_store, tmp_path, codec, array, how)
    out = tmp_path / "model.zarr"
    runner.invoke(app, ["train", str(small_store), "--out", str(out), "--steps", "2",
                        "--scheduler", cluster_address])
    before = tree_hash(out)
    started = time.monotonic()
    result = runner.invoke(app, ["train", str(broken), "--out", str(out), "--overwrite",
                                 "--steps", "3", "--cache", cache,
                                 "--scheduler", cluster_address])
    assert result.exit_code == 2, result.output
    one_line_error(result.stderr, "chunk 2", f"array {array!r}", fragment)
    assert time.monotonic() - started < 60
    assert tree_hash(out) == before  # the previous model untouched
    assert leftovers(tmp_path) == []


# --- 5. two runs writing the same --out ------------------------------------------------


@pytest.mark.slow
def test_second_train_on_the_same_out_is_refused(small_store, tmp_path, cluster_address):
    out = tmp_path / "m.zarr"
    first = subprocess.Popen(cosim_cmd("train", small_store, "--out", out, "--steps", 60,
                                       "--solver", "gd", "--tol", 0, "--checkpoint-every", 1,
                                       "--scheduler", cluster_address),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: out.exists(), 120, "the first run's checkpoint")
        during = tree_hash(out)
        result = runner.invoke(app, ["train", str(small_store), "--out", str(out),
                                     "--overwrite", "--steps", "1",
                                     "--scheduler", cluster_address])
        assert result.exit_code == 2
        one_line_error(result.stderr, "is in use by another cosim run",
                       f"pid {first.pid}", "m.zarr.lock")
        _, stderr = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    model = load_model(out)
    assert model.attrs["complete"] and model.attrs["steps"] == 60
    assert during  # the refused run wrote nothing in between: the model is the first run's
    assert leftovers(tmp_path) == []  # lock released at the end
    # An error releases the lock too.
    result = runner.invoke(app, ["train", str(small_store), "--out", str(out), "--resume",
                                 "--loss", "contrastive", "--scheduler", cluster_address])
    assert result.exit_code == 2
    assert leftovers(tmp_path) == []


# --- 6. disk full while writing a model or checkpoint -----------------------------------


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("checkpoint_every", [1, 1000])  # a checkpoint / the final model
def test_disk_full_keeps_the_previous_model(tmp_path, cluster_address, checkpoint_every):
    store = tmp_path / "d64.zarr"
    generate_store(store, pairs=2_000, dim=64, rank=4, targets="binary", seed=5,
                   chunk_rows=1_000)
    out = tmp_path / "m.zarr"
    runner.invoke(app, ["train", str(store), "--out", str(out), "--steps", "1",
                        "--scheduler", cluster_address])
    before = tree_hash(out)
    # Only the driver is limited: A (64 x 64 float64) is 32 KiB, above 16 KiB.
    proc = subprocess.run(
        cosim_cmd("train", store, "--out", out, "--overwrite", "--steps", 2,
                  "--checkpoint-every", checkpoint_every, "--scheduler", cluster_address),
        capture_output=True, text=True, timeout=120, preexec_fn=_file_size_limit(16 * 1024))
    assert proc.returncode == 2, proc.stderr
    one_line_error(proc.stderr, f"cannot write model {str(out)!r}", "File too large",
                   f"the previous {str(out)!r} is intact")
    assert tree_hash(out) == before
    assert leftovers(tmp_path) == []
    load_model(out)


# --- 7. every wait has a deadline: frozen scheduler, worker lost mid-broadcast, Ctrl-C ------


@pytest.mark.slow
def test_frozen_scheduler_ends_the_run_within_the_bound(small_store, tmp_path, cluster_address):
    """A SIGSTOPped scheduler keeps its connections open, so the client never sees it close:
    the liveness probes end the run within SCHEDULER_DEADLINE (+ a probe period and the
    bounded close), with the lost-scheduler line and an intact, resumable checkpoint."""
    from cosim_dask.dist.waits import CLOSE_TIMEOUT, WATCH_SECONDS

    out = tmp_path / "m.zarr"
    args = ["--steps", 400, "--solver", "gd", "--tol", 0, "--checkpoint-every", 1]
    deadline = 6.0  # the same mechanism as the 30 s default, waited out faster
    bound = deadline + 2 * WATCH_SECONDS + CLOSE_TIMEOUT
    with dask_processes(workers=2) as (address, procs):
        proc = subprocess.Popen(cosim_cmd("train", small_store, "--out", out, *args,
                                          "--scheduler", address),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "COSIM_SCHEDULER_DEADLINE": str(deadline)})
        try:
            wait_for(lambda: out.exists() and load_model(out).attrs["steps"] >= 3, 120,
                     "three checkpoints")
            procs[0].send_signal(signal.SIGSTOP)  # the scheduler freezes, sockets open
            frozen_at = time.monotonic()
            _, stderr = proc.communicate(timeout=bound + 30)
            stopped_after = time.monotonic() - frozen_at
        finally:
            if proc.poll() is None:
                proc.kill()
            procs[0].send_signal(signal.SIGCONT)
            procs[0].kill()
    assert proc.returncode == 2, stderr
    assert stopped_after <= bound, (stopped_after, bound)
    line = one_line_error(stderr, "training stopped after step", "lost the Dask scheduler",
                          "is intact", f"cosim train {small_store} --out {out} --resume")
    saved = int(re.search(r"last checkpoint \(step (\d+)\)", line).group(1))
    model = load_model(out, with_solver=True)
    assert model.attrs["steps"] == saved >= 3 and not model.attrs["complete"]
    assert leftovers(tmp_path) == []
    result = runner.invoke(app, ["train", str(small_store), "--out", str(out), "--resume",
                                 *map(str, args[:1]), str(saved + 2), *map(str, args[2:]),
                                 "--scheduler", cluster_address])
    assert result.exit_code == 0, result.output
    assert load_model(out).attrs["steps"] == saved + 2


def _dies_receiving_a_broadcast(marker: str):
    """A worker plugin that SIGKILLs its own worker the first time (cluster-wide: the
    ``marker`` file) a key reaches it through the scheduler's copying of a broadcast.

    The scheduler sends a broadcast's first copy with ``update_data`` and the others with
    ``gather`` requests to the workers that lack it; a worker records the stimulus
    ``gather-...`` before it stores the key. Dying right there, before answering, is dying
    in the middle of the broadcast, every time: no race with the timing of the step.
    Defined in a function so that it is pickled by value for the workers."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class DieReceivingBroadcast(WorkerPlugin):
        name = "die-receiving-broadcast"

        def setup(self, worker):
            self.worker = worker

        def transition(self, key, start, finish, **kwargs):
            log = self.worker.state.stimulus_log
            if finish != "memory" or not log or not log[-1].stimulus_id.startswith("gather-"):
                return
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)

    return DieReceivingBroadcast()


@pytest.mark.slow
@pytest.mark.parametrize("send", ["scatter", "graph"])
def test_worker_killed_during_the_broadcast_gives_the_undisturbed_result(store, tmp_path, send,
                                                                        monkeypatch):
    # Small parameters travel in the pass's tasks (the worker dies fetching a partial from
    # the other), larger ones are scattered first (it dies in the scatter's broadcast).
    monkeypatch.setattr(passes, "PARAMS_IN_GRAPH_BYTES", 0 if send == "scatter" else 2**20)
    config = TrainConfig(steps=3, tol=0.0, gtol=0.0, validation=0.1)
    options = RunOptions(cache="memory", checkpoint_every=None)
    marker = tmp_path / "killed"
    # The scheduler keeps trying to copy the broadcast to the dead worker until a connect
    # times out (30 s by default); a shorter timeout ends that wait sooner, nothing else.
    with dask.config.set({"distributed.comm.timeouts.connect": "5s"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        calm = train_store(str(store), str(tmp_path / "calm.zarr"), config, client=client,
                           options=options, dashboard=False)
        client.register_plugin(_dies_receiving_a_broadcast(str(marker)))
        outcome = {}

        def train():
            try:
                outcome["result"] = train_store(
                    str(store), str(tmp_path / "killed.zarr"), config, client=client,
                    options=options, dashboard=False)
            except BaseException as exc:  # reported below
                outcome["error"] = exc

        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        thread.join(90)  # the old code waited forever
        assert not thread.is_alive(), "training hung after a worker died in the broadcast"
        assert "error" not in outcome, outcome.get("error")
        assert marker.exists()  # a worker did die receiving the parameters
    killed = outcome["result"]
    np.testing.assert_array_equal(killed.model.A, calm.model.A)  # bitwise
    assert [h["loss"] for h in killed.state.history] == [h["loss"] for h in calm.state.history]


_PROGRESS = ("Dask dashboard:", "Live training page:", "train: ")


@pytest.mark.slow
def test_ctrl_c_on_a_local_cluster_is_one_line(small_store, tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: the workers of the
    LocalCluster get it too, and used to print a traceback each."""
    out = tmp_path / "m.zarr"
    proc = subprocess.Popen(cosim_cmd("train", small_store, "--out", out, "--steps", 400,
                                      "--solver", "gd", "--tol", 0, "--checkpoint-every", 1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: out.exists() and load_model(out).attrs["steps"] >= 2, 120,
                 "two checkpoints")
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    # What the interrupt printed: the lines besides the run's own progress report.
    said = [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(_PROGRESS) and " pairs × " not in line]
    assert said == ["interrupted"], stderr
    model = load_model(out, with_solver=True)  # the last checkpoint is intact
    assert model.attrs["steps"] >= 2 and not model.attrs["complete"]
    assert leftovers(tmp_path) == []


# --- 9. a wait on a pass cut short inside distributed -----------------------------------


def _slow_double(params, token, seconds):
    time.sleep(seconds)
    return params * 2


def _cut_waits_short(client: Client, every: float, times: int) -> threading.Thread:
    """Cancel ``times`` times, ``every`` s apart, the event-loop task that waits for a
    future's result: what distributed does to it when another wait sharing its gather is
    cancelled (a timeout, a Ctrl-C) or the client's loop stops. distributed's ``sync`` then
    raises ``UnboundLocalError: cannot access local variable 'result'``."""
    import asyncio

    async def cancel() -> int:
        waits = [task for task in asyncio.all_tasks()
                 if getattr(task.get_coro(), "__qualname__", "") == "Future._result"]
        for task in waits:
            task.cancel()
        return len(waits)

    def cut() -> None:
        done, deadline = 0, time.monotonic() + 30
        while done < times and time.monotonic() < deadline and client.status == "running":
            time.sleep(every if done else 0.05)
            with contextlib.suppress(RuntimeError):  # the client closed meanwhile
                done += bool(client.sync(cancel))

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    return thread


def test_a_wait_cut_short_by_distributed_is_waited_again(cluster_address):
    """The pass's result is fetched again: the right value, no raw UnboundLocalError."""
    from cosim_dask.dist.passes import run_pass

    params = np.arange(6.0)
    root = lambda ref, token: dask.delayed(_slow_double)(ref, token, 1.0)  # noqa: E731
    with Client(cluster_address, set_as_default=False) as client:
        cutter = _cut_waits_short(client, every=0.3, times=1)
        result = run_pass(client, params, root)
        cutter.join()
    np.testing.assert_array_equal(result, params * 2)


def test_a_wait_cut_short_again_and_again_is_one_line_naming_the_step(cluster_address):
    from cosim_dask.dist.passes import run_pass
    from cosim_dask.errors import ClusterError

    root = lambda ref, token: dask.delayed(_slow_double)(ref, token, 2.0)  # noqa: E731
    with Client(cluster_address, set_as_default=False) as client:
        cutter = _cut_waits_short(client, every=0.25, times=3)
        with pytest.raises(ClusterError) as err:
            run_pass(client, np.arange(3.0), root)
        cutter.join()
    message = str(err.value)
    assert "\n" not in message
    assert "waiting for a pass" in message and "UnboundLocalError" in message, message


def _breaking_send(client: Client, times: int):
    """A ``send`` for run_pass whose first ``times`` calls fail as a connection reset by a
    peer does (what distributed raises when a connection it gathers over breaks)."""
    calls = []

    def send(params):
        calls.append(1)
        if len(calls) <= times:
            raise ConnectionResetError(104, "Connection reset by peer")
        return passes.broadcast_params(client, params)

    return send


def test_a_connection_broken_mid_pass_repeats_the_pass(cluster_address):
    """The scheduler still answers: a worker's connection broke, and the pass is repeated."""
    root = lambda ref, token: dask.delayed(_slow_double)(ref, token, 0.0)  # noqa: E731
    with Client(cluster_address, set_as_default=False) as client:
        result = passes.run_pass(client, np.arange(4.0), root, send=_breaking_send(client, 1))
    np.testing.assert_array_equal(result, np.arange(4.0) * 2)


def test_a_connection_broken_by_a_lost_scheduler_says_so():
    """A connection error that arrives before the client has noticed its scheduler is gone
    (here frozen, so the client's status stays "running") is the lost scheduler's one-line
    error, not a raw ConnectionResetError (it leaked when the scheduler was killed mid-pass)."""
    from cosim_dask.errors import SchedulerLostError

    root = lambda ref, token: dask.delayed(_slow_double)(ref, token, 0.0)  # noqa: E731
    with dask_processes(workers=1) as (address, procs), \
            Client(address, set_as_default=False, timeout=30) as client:
        client.wait_for_workers(1, timeout=60)
        procs[0].send_signal(signal.SIGSTOP)
        try:
            assert client.status == "running"
            with pytest.raises(SchedulerLostError, match="lost the Dask scheduler") as err:
                passes.run_pass(client, np.arange(4.0), root, send=_breaking_send(client, 1))
        finally:
            procs[0].send_signal(signal.SIGCONT)
    assert "ConnectionResetError" in str(err.value) and "\n" not in str(err.value)
