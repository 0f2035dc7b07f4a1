#!/usr/bin/env python3
"""Benchmark distributed training against its baselines, each measured in the same run.

1. step      One full-batch step (loss + gradient) on a 2-worker LocalCluster over data
             persisted in worker memory, vs the same step in one process with plain NumPy
             (1 thread; and 2 Python threads on halves, BLAS at 1 thread, the best in-process
             use of two cores). Also the per-task overhead (tasks that do nothing) and the
             cost of getting A (d = 1024, 8 MB) to the workers: scatter(broadcast) vs a graph
             constant.
2. stream    Out of core: a store ≥ 4× the cluster's total memory limit. Peak worker RSS during
             streaming steps vs the limit, and step throughput vs the raw read rate of the
             same store on the same cluster (a pass that only reads every chunk).
3. converge  Passes over the data to get within 1e-4 (relative) of the best loss: L-BFGS vs
             gradient descent vs Adam (a pass = one full evaluation; Adam's mini-batch
             evaluations count as their share of a pass).

Usage: python scripts/bench_train.py [--quick] [--only step|stream|converge] [--workdir DIR]
Figures are ratios measured in one run: this machine is shared, absolute seconds are noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
from distributed import Client, LocalCluster, wait
from threadpoolctl import threadpool_limits

from cosim_dask.cluster import WorkerMemorySampler
from cosim_dask.ingest import generate_store
from cosim_dask.kernel import chunk_partial
from cosim_dask.metric import FullMetric
from cosim_dask.objective import Objective
from cosim_dask.solvers import get_solver
from cosim_dask.step import DaskPairs, LocalPairs, persisted_pieces, read_slice, store_pieces
from cosim_dask.store import open_store
from cosim_dask.synthetic import synthetic_pairs


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cluster(memory_limit: str) -> tuple[LocalCluster, Client]:
    c = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=memory_limit,
                     dashboard_address="127.0.0.1:0", host="127.0.0.1")
    return c, Client(c)


def bench_step(workdir: Path, pairs: int, repeats: int) -> None:
    d = 128
    path = workdir / "step.zarr"
    if not path.exists():
        generate_store(path, pairs=pairs, dim=d, rank=16, targets="binary", seed=0)
    store = open_store(path)
    A = FullMetric().initial(d) + 0.01
    print(f"\n== step: {pairs:,} pairs × d={d}, {store.n_chunks} chunks of "
          f"{store.chunk_rows:,} rows, 2 workers × 1 thread, data persisted")
    c, client = cluster("8GiB")
    try:
        pieces = persisted_pieces(client, store.x, store.y, store.target)
        wait([p for arr in pieces.held for p in [arr]])
        dask_pairs = DaskPairs(client, pieces, FullMetric(), "mse")
        dask_pairs(A)  # warm: data loaded, functions shipped
        x = np.asarray(store.x)
        y = np.asarray(store.y)
        t = np.asarray(store.target)
        slices = store.chunk_slices()

        def numpy_one_thread():
            with threadpool_limits(1):
                for s in slices:
                    chunk_partial(x[s], y[s], t[s], A)

        def numpy_two_threads():
            half = len(slices) // 2
            with threadpool_limits(1), ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda part: [chunk_partial(x[s], y[s], t[s], A) for s in part],
                              (slices[:half], slices[half:])))

        # Interleave the variants so they share the machine's load.
        rows = {"cluster step": [], "numpy 1 thread": [], "numpy 2 threads": []}
        for _ in range(repeats):
            rows["cluster step"].append(median_time(lambda: dask_pairs(A), 1))
            rows["numpy 1 thread"].append(median_time(numpy_one_thread, 1))
            rows["numpy 2 threads"].append(median_time(numpy_two_threads, 1))
        med = {k: statistics.median(v) for k, v in rows.items()}
        for k, v in med.items():
            print(f"  {k:18s} {v * 1e3:9.1f} ms  {pairs / v:12,.0f} pairs/s")
        two, one = med["numpy 2 threads"], med["numpy 1 thread"]
        print(f"  ratio cluster / numpy 2 threads: {med['cluster step'] / two:.2f}"
              f"  (target ≤ 1.2);  cluster / numpy 1 thread: {med['cluster step'] / one:.2f}")

        # Per-task overhead: the same graph shape with tasks that do nothing.
        n = 400
        empty = median_time(lambda: client.gather(client.map(_noop, range(n), pure=False)), 3)
        print(f"  per-task overhead: {empty / n * 1e3:.2f} ms/task ({n} empty tasks)")

        # Getting A to the workers, d = 1024 (8 MB): scatter(broadcast) vs a graph constant.
        import dask

        big = np.eye(1024)

        def via_scatter():
            ref = client.scatter(big, broadcast=True, hash=False)
            client.gather(client.map(_trace, [ref] * 16, range(16), pure=False))
            ref.release()

        def via_constant():
            ref = dask.delayed(big)
            client.compute([dask.delayed(_trace)(ref, i) for i in range(16)], sync=True)

        s_t, c_t = [], []
        for _ in range(repeats):
            s_t.append(median_time(via_scatter, 1))
            c_t.append(median_time(via_constant, 1))
        s_m, c_m = statistics.median(s_t), statistics.median(c_t)
        print(f"  A (8 MB) to 16 tasks: scatter {s_m * 1e3:.1f} ms, graph constant "
              f"{c_m * 1e3:.1f} ms (constant / scatter = {c_m / s_m:.2f})")
    finally:
        client.close()
        c.close()


def _noop(i):
    return i


def _trace(a, i):
    return float(np.trace(a)) + i


def _read_only(piece) -> int:
    x, y, t = read_slice(piece)
    return x.nbytes + y.nbytes + t.nbytes


def bench_stream(workdir: Path, limit_mib: int, factor: float, repeats: int) -> None:
    d = 128
    limit = limit_mib * 2**20
    pairs = int(factor * 2 * limit / ((2 * d + 1) * 4)) + 1
    path = workdir / "stream.zarr"
    if not path.exists() or open_store(path).n != pairs:
        shutil.rmtree(path, ignore_errors=True)
        generate_store(path, pairs=pairs, dim=d, rank=16, targets="binary", seed=1)
    store = open_store(path)
    size = store.n * (2 * d + 1) * 4
    print(f"\n== stream: {pairs:,} pairs × d={d} = {size / 2**30:.2f} GiB; cluster 2 workers × "
          f"{limit_mib} MiB = {2 * limit / 2**30:.2f} GiB ({size / (2 * limit):.1f}× the memory)")
    c, client = cluster(f"{limit_mib}MiB")
    try:
        pieces = store_pieces(store.path, store.chunk_slices())
        dask_pairs = DaskPairs(client, pieces, FullMetric(), "mse")
        A = np.eye(d)
        baseline_rss = max(client.run(lambda: psutil.Process().memory_info().rss).values())

        def read_pass():
            return sum(client.gather(client.map(_read_only, pieces.items, pure=False)))

        read_pass()  # warm the page cache the same way for both
        reads, steps = [], []
        with WorkerMemorySampler(client) as rss:
            for _ in range(repeats):
                reads.append(median_time(read_pass, 1))
                steps.append(median_time(lambda: dask_pairs(A), 1))
        r, s = statistics.median(reads), statistics.median(steps)
        print(f"  raw read pass   {r:7.2f} s  {size / r / 2**20:8.0f} MiB/s")
        print(f"  streaming step  {s:7.2f} s  {size / s / 2**20:8.0f} MiB/s  "
              f"({pairs / s:,.0f} pairs/s)")
        print(f"  step throughput / read rate: {r / s:.2f}  (target ≥ 0.8)")
        print(f"  peak worker RSS {rss.peak / 2**20:.0f} MiB vs limit {limit_mib} MiB "
              f"(idle worker {baseline_rss / 2**20:.0f} MiB): "
              f"{'under' if rss.peak < limit else 'OVER'} the limit")
    finally:
        client.close()
        c.close()


def bench_converge(pairs: int) -> None:
    d = 32
    x, y, t, _ = synthetic_pairs(pairs, d, rank=4, noise=0.05, targets="graded", seed=4,
                                 chunk_rows=8192)
    form = FullMetric()
    n_chunks = -(-pairs // 8192)
    print(f"\n== converge: {pairs:,} pairs × d={d}, graded targets, {n_chunks} chunks")
    curves = {}
    for name, kw, batch in (("lbfgs", {}, None), ("gd", {}, None),
                            ("adam", {"lr": 0.02}, max(1, n_chunks // 8))):
        src = LocalPairs(x, y, t, form, "mse", chunk_rows=8192, batch_chunks=batch)
        objective = Objective(form, src)
        solver = get_solver(name, **kw)
        solver.start(np.eye(d), objective)
        passes, curve = 0.0, []
        share = 1.0 if batch is None else batch / n_chunks
        budget = 300
        while passes < budget:
            before = objective.evaluations
            solver.step(objective, form.project)
            passes += (objective.evaluations - before) * share
            full_loss = objective(solver.params)[0] if batch else solver.loss
            curve.append((passes, full_loss))
        curves[name] = curve
    best = min(loss for c in curves.values() for _, loss in c)
    print(f"  best loss {best:.6g}; passes to within 1e-4 (relative) of it:")
    for name, curve in curves.items():
        hit = next((p for p, loss in curve if loss <= best * (1 + 1e-4)), None)
        print(f"  {name:6s} {'not within budget' if hit is None else f'{hit:7.1f} passes'}"
              f"   (final loss {curve[-1][1]:.6g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--only", choices=("step", "stream", "converge"))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to keep the generated stores (default: a temp dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cosim-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()}; stores in {workdir}")
    q = args.quick
    if args.only in (None, "step"):
        bench_step(workdir, 200_000 if q else 2_000_000, 2 if q else 5)
    if args.only in (None, "stream"):
        bench_stream(workdir, 256 if q else 512, 1.2 if q else 4.2, 1 if q else 3)
    if args.only in (None, "converge"):
        bench_converge(50_000 if q else 200_000)
    print(f"\nload average {os.getloadavg()}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
