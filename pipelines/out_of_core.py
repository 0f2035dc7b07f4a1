"""Out of core: train on a pair store larger than the whole cluster's memory.

The store is generated at ``--factor`` times the cluster's total memory limit; training
streams it from disk every step (the automatic choice when it does not fit), and the worker
processes' peak memory is sampled while it runs: it stays flat and under the limit. The live
page printed at start shows the same on the Dask dashboard's worker-memory panel.

    python pipelines/out_of_core.py                 # 2 workers × 512 MiB, a 4 GiB store
    python pipelines/out_of_core.py --memory-mib 128 --factor 2 --steps 3   # a quick look
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cosim_dask.data.ingest import generate_store
from cosim_dask.data.store import open_store
from cosim_dask.dist.cluster import ClusterConfig, WorkerMemorySampler, close, connect
from cosim_dask.fit.config import RunOptions, TrainConfig
from cosim_dask.fit.model import load_model
from cosim_dask.fit.train import train_store


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--memory-mib", type=int, default=512, help="per worker (2 workers)")
    parser.add_argument("--factor", type=float, default=4.0,
                        help="store size over the cluster's total memory limit")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    limit = args.memory_mib * 2**20
    pairs = int(args.factor * 2 * limit / ((2 * args.dim + 1) * 4)) + 1
    store, model = args.out / "big-pairs.zarr", args.out / "big-model.zarr"
    if not store.exists() or open_store(store).n != pairs:
        print(f"generating {pairs:,} pairs × {args.dim} "
              f"({pairs * (2 * args.dim + 1) * 4 / 2**30:.2f} GiB) ...", flush=True)
        generate_store(store, pairs=pairs, dim=args.dim, rank=16, targets="binary",
                       overwrite=True)
    client, cluster = connect(ClusterConfig(workers=2, memory_limit=f"{args.memory_mib}MiB"))
    try:
        print(f"cluster: 2 workers × {args.memory_mib} MiB; dashboard {client.dashboard_link}")

        def on_start(info) -> None:
            print(f"data {info['cache']}ed from {store}; live page {info['live_url']}",
                  flush=True)

        def on_step(r) -> None:
            loss = "—" if r["loss"] is None else f"{r['loss']:.5f}"  # step 0: not yet known
            print(f"step {r['step']:3d}  loss {loss}  "
                  f"{(r['pairs_per_s'] or 0):12,.0f} pairs/s", flush=True)

        with WorkerMemorySampler(client, interval=0.1) as peak:
            result = train_store(
                str(store), str(model), TrainConfig(steps=args.steps, validation=0.05),
                client=client, options=RunOptions(cache="auto"), overwrite=True,
                on_start=on_start, on_step=on_step)
    finally:
        close(client, cluster)
    size = pairs * (2 * args.dim + 1) * 4
    summary = {"store_bytes": size, "cluster_bytes": 2 * limit, "cache": result.cache,
               "peak_worker_rss": peak.peak, "limit": limit,
               "val_auc": load_model(model).attrs["validation_figures"]["learned"]["auc"]}
    print(f"store {size / 2**20:,.0f} MiB = {size / (2 * limit):.1f}× the cluster's memory; "
          f"data {result.cache}ed; peak worker RSS {peak.peak / 2**20:,.0f} MiB of a "
          f"{args.memory_mib} MiB limit; validation AUC {summary['val_auc']:.4f}")
    return summary


if __name__ == "__main__":
    main()
