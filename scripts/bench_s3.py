#!/usr/bin/env python3
"""Streaming from object storage vs from local disk, measured in one run.

Starts moto's standalone S3 server (``moto[server]``) on loopback with throwaway credentials,
generates a pair store in it, copies the same store (same chunks, same fingerprint) to local
disk, and times one streaming step (loss + gradient over every chunk, read from the store by
the workers, on a 2-worker × 1-thread LocalCluster) from each; for the S3 store also with
read-ahead off, and how often a task found its chunks already read ahead.

Usage: python scripts/bench_s3.py [--pairs N] [--dim D] [--chunk-pairs C] [--repeats R]
Figures are ratios measured in one run: this machine is shared, absolute seconds are noisy.
moto keeps objects in memory and serves them from one Python process, so it is a slower
"network" than a real S3 endpoint and than MinIO.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from bench_train import median_time  # scripts/ is on sys.path when a script runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> subprocess.Popen:
    """moto's S3 server on loopback; the environment points botocore (here and in the
    LocalCluster's workers, started later) at it with throwaway credentials."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1",
                      AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise SystemExit("moto server did not start") from None
            time.sleep(0.2)


def _ahead_stats() -> dict:
    from cosim_dask.data.reader import AHEAD_STATS

    stats = dict(AHEAD_STATS)
    AHEAD_STATS.update(hits=0, misses=0)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=120_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-pairs", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    server = start_moto()
    from distributed import Client, LocalCluster

    from cosim_dask.core.forms import FullMetric
    from cosim_dask.data.ingest import generate_store
    from cosim_dask.data.store import open_store
    from cosim_dask.dist.passes import DaskPairs, store_pieces
    from cosim_dask.objectstore import filesystem, versions

    try:
        fs, _ = filesystem("s3://bench")
        fs.mkdir("bench")
        url = "s3://bench/pairs.zarr"
        t = time.perf_counter()
        generate_store(url, pairs=args.pairs, dim=args.dim, rank=8, targets="binary",
                       chunk_rows=args.chunk_pairs, seed=1)
        wrote = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "pairs.zarr"
            (version,) = versions(url)
            fs.get(f"bench/pairs.zarr/{version}", str(local), recursive=True)
            stores = {"local disk": open_store(local), "s3 (moto)": open_store(url)}
            assert stores["local disk"].fingerprint == stores["s3 (moto)"].fingerprint
            s = stores["s3 (moto)"]
            size = s.n * (2 * s.d + 1) * 4
            print(f"{s.n:,} pairs × d={s.d} in {s.n_chunks} chunks of {s.chunk_rows:,} "
                  f"({size / 2**20:.0f} MiB); written to S3 in {wrote:.1f} s; load "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                              dashboard_address="127.0.0.1:0") as cluster, \
                    Client(cluster) as client:
                A = np.eye(s.d)
                variants = {}
                for name, store in stores.items():
                    pieces = store_pieces(store.source, store.chunk_slices(), store.fingerprint)
                    variants[name] = DaskPairs(client, pieces, FullMetric(), "mse")
                    if name.startswith("s3"):
                        variants[f"{name}, no read-ahead"] = DaskPairs(
                            client, pieces, FullMetric(), "mse", read_ahead=0)
                times = {name: [] for name in variants}
                hits = {"hits": 0, "misses": 0}
                for _ in range(args.repeats):  # interleaved: the load changes under us
                    for name, pairs in variants.items():
                        pairs(A)  # warm: imports, connections, page cache
                        client.run(_ahead_stats)
                        times[name].append(median_time(lambda p=pairs: p(A), 1))
                        if name == "s3 (moto)":
                            for counts in client.run(_ahead_stats).values():
                                for key in hits:
                                    hits[key] += counts[key]
                med = {name: statistics.median(v) for name, v in times.items()}
                for name, took in med.items():
                    print(f"  streaming step from {name:26s} {took:6.2f} s  "
                          f"{s.n / took:>10,.0f} pairs/s  {size / took / 2**20:6.1f} MiB/s")
                print(f"  s3 / local disk: {med['s3 (moto)'] / med['local disk']:.2f}x the "
                      f"time;  read-ahead gain on s3: "
                      f"{med['s3 (moto), no read-ahead'] / med['s3 (moto)']:.2f}x;  "
                      f"tasks served by read-ahead: {hits['hits']} of "
                      f"{hits['hits'] + hits['misses']}")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
