"""Benchmark the pair-store format: codecs, chunk sizes and the streaming commands' memory.

    python scripts/bench_store.py            # ~5 min: 512k-pair codec table, 3M-pair RSS runs
    python scripts/bench_store.py --quick    # a smoke run in seconds

1. Codecs: the same pairs (float32, d = 128, from the synthetic generator) written with every
   codec in :data:`cosim_dask.data.store.CODECS` (plus the default sharded), then read in full chunk
   by chunk, warm (page cache) and cold (the store's pages evicted with posix_fadvise, which
   touches only these files). Figures are ratios to the default measured in the same run: the
   machine is shared, so absolute MB/s are noisy.
2. Chunk sizes for the default codec: full-read throughput and the gradient time of one chunk
   (measured: tasks should compute for >= ~50 ms).
3. Peak RSS of `cosim generate` and `cosim ingest` (aligned .npy, and embeddings + Parquet
   pair list) as subprocesses on a dataset several times larger than that RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import zarr
from threadpoolctl import threadpool_limits

from cosim_dask.core.kernel import chunk_partial
from cosim_dask.data.store import (
    CODECS,
    DEFAULT_CODEC,
    bytes_on_disk,
    create_store,
    default_chunk_rows,
)
from cosim_dask.data.synthetic import hidden_metric, synthetic_chunk

MB = 1e6
COSIM = str(Path(sys.executable).with_name("cosim"))


def evict(path: Path) -> None:
    """Drop this store's pages from the guest page cache (only its own files; the VM's host
    may still cache them, so "cold" here is an upper bound for a real disk)."""
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages (just written) would not be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_all(path: Path, rows: int) -> float:
    """Seconds to read every chunk of x, y and target into NumPy, one chunk at a time."""
    g = zarr.open_group(str(path), mode="r")
    x, y, t = g["x"], g["y"], g["target"]
    n = x.shape[0]
    started = time.perf_counter()
    for lo in range(0, n, rows):
        sl = slice(lo, min(lo + rows, n))
        x[sl], y[sl], t[sl]
    return time.perf_counter() - started


def write_store(path: Path, blocks: list, d: int, rows: int, codec: str,
                shard_chunks: int | None = None) -> float:
    started = time.perf_counter()
    with create_store(path, d=d, chunk_rows=rows, codec=codec, overwrite=True,
                      shard_chunks=shard_chunks) as w:
        for x, y, t in blocks:
            w.append(x, y, t)
    return time.perf_counter() - started


def measure(paths: dict[str, tuple], blocks_for, d: int, repeats: int) -> dict:
    """Best-of-``repeats`` (write s, warm read s, cold read s, bytes on disk) per config.

    Configs run round-robin inside each repeat, so a burst of load from other jobs on this
    shared machine hits every config alike instead of one of them.
    """
    times: dict[str, list[list[float]]] = {k: [[], [], []] for k in paths}
    for _ in range(repeats):
        for label, (path, rows, codec, shards) in paths.items():
            times[label][0].append(write_store(path, blocks_for(rows), d, rows, codec, shards))
        for label, (path, rows, _, _) in paths.items():
            read_all(path, rows)  # warm the page cache
            times[label][1].append(read_all(path, rows))
        for label, (path, rows, _, _) in paths.items():
            evict(path)
            times[label][2].append(read_all(path, rows))
    out = {k: (min(w), min(r), min(c), bytes_on_disk(paths[k][0])) for k, (w, r, c) in
           times.items()}
    for path, *_ in paths.values():
        shutil.rmtree(path)
    return out


def _blocks(n: int, d: int):
    """``blocks_for(rows)``: the same n pairs (generated once) cut into blocks of ``rows``."""
    A = hidden_metric(d, seed=0)
    parts = [synthetic_chunk(min(65_536, n - lo), A, seed=0, chunk=i)
             for i, lo in enumerate(range(0, n, 65_536))]
    x, y, t = (np.concatenate(p) for p in zip(*parts, strict=True))
    del parts

    def blocks_for(rows: int) -> list:
        return [(x[lo:lo + rows], y[lo:lo + rows], t[lo:lo + rows]) for lo in range(0, n, rows)]
    return blocks_for


def codec_table(work: Path, n: int, d: int, rows: int, repeats: int) -> None:
    raw = n * (2 * d + 1) * 4
    configs = {c: (work / f"codec-{c}.zarr", rows, c, None) for c in CODECS}
    configs[f"{DEFAULT_CODEC}+shard4"] = (work / "codec-shard.zarr", rows, DEFAULT_CODEC, 4)
    results = measure(configs, _blocks(n, d), d, repeats)
    base = results[DEFAULT_CODEC]
    print(f"\n## Codecs: {n:,} pairs x d={d}, {rows:,}-pair chunks, raw {raw / MB:,.0f} MB "
          f"(best of {repeats}; ratios to the default '{DEFAULT_CODEC}', same run)\n")
    print("| codec | disk/raw | write MB/s | write Mpairs/s | read warm MB/s | read warm "
          "Mpairs/s | read cold MB/s | write x | read warm x | read cold x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, (w, warm, cold, disk) in results.items():
        print(f"| {label} | {disk / raw:.3f} | {raw / w / MB:,.0f} | {n / w / 1e6:.2f} | "
              f"{raw / warm / MB:,.0f} | {n / warm / 1e6:.2f} | {raw / cold / MB:,.0f} | "
              f"{base[0] / w:.2f} | {base[1] / warm:.2f} | {base[2] / cold:.2f} |")


def chunk_table(work: Path, n: int, d: int, sizes: list[int], repeats: int) -> None:
    raw = n * (2 * d + 1) * 4
    blocks_for = _blocks(n, d)
    configs = {rows: (work / f"chunk-{rows}.zarr", rows, DEFAULT_CODEC, None) for rows in sizes}
    results = measure(configs, blocks_for, d, repeats)
    print(f"\n## Chunk size, codec '{DEFAULT_CODEC}', {n:,} pairs x d={d} (best of {repeats})\n")
    print("| chunk pairs | x chunk MiB | read warm MB/s | read cold MB/s | gradient ms/chunk "
          "(1 BLAS thread) |")
    print("|---|---|---|---|---|")
    for rows in sizes:
        x, y, t = blocks_for(rows)[0]
        with threadpool_limits(1):  # one BLAS thread, as on a 1-thread Dask worker
            chunk_partial(x[:4096], y[:4096], t[:4096], np.eye(d))  # warm up BLAS first
            grad = min(_timed(lambda x=x, y=y, t=t: chunk_partial(x, y, t, np.eye(d)))
                       for _ in range(repeats))
        _, warm, cold, _ = results[rows]
        print(f"| {rows:,} | {rows * d * 4 / 2**20:.0f} | {raw / warm / MB:,.0f} | "
              f"{raw / cold / MB:,.0f} | {grad * 1e3:.0f} |")


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _hwm(pid: int) -> int:
    """Peak resident set (VmHWM) of a live process, in bytes; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a subprocess.

    Polls the child's VmHWM (its own high-water mark since exec) every 20 ms, falling back to
    psutil's RSS off Linux. Not rusage: a child's ru_maxrss on Linux starts from the parent's
    RSS at fork, and this script holds hundreds of MB by then.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _hwm(proc.pid))
        if not peak:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed: {proc.stderr.read().decode()}")
    return time.perf_counter() - started, peak / 2**20


def rss_table(work: Path, n: int, d: int, table_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    gen = work / "rss-generated.zarr"
    data_mib = n * (2 * d + 1) * 4 / 2**20
    rows = []
    secs, rss = peak_rss([COSIM, "generate", str(gen), "--pairs", str(n), "--dim", str(d),
                          "--overwrite"])
    rows.append(("cosim generate", data_mib, secs, rss))
    # Aligned .npy sources, streamed out of the generated store (not held in memory).
    g = zarr.open_group(str(gen), mode="r")
    paths = {name: work / f"{name}.npy" for name in ("x", "y", "target")}
    for name, p in paths.items():
        out = np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=g[name].shape)
        step = g[name].chunks[0]
        for lo in range(0, n, step):
            out[lo:lo + step] = g[name][lo:lo + step]
        out.flush()
        del out
    secs, rss = peak_rss([COSIM, "ingest", str(work / "rss-arrays.zarr"), "--x", str(paths["x"]),
                          "--y", str(paths["y"]), "--target", str(paths["target"])])
    rows.append(("cosim ingest --x/--y/--target (.npy)", data_mib, secs, rss))
    shutil.rmtree(work / "rss-arrays.zarr")
    for p in paths.values():
        p.unlink()
    # Embedding table plus a Parquet pair list of n pairs.
    rng = np.random.default_rng(0)
    np.save(work / "E.npy", rng.standard_normal((table_rows, d), dtype=np.float32))
    writer = None
    for lo in range(0, n, 1_000_000):
        b = min(1_000_000, n - lo)
        batch = pa.table({"i": rng.integers(0, table_rows, b), "j": rng.integers(0, table_rows, b),
                          "target": rng.choice([-1.0, 1.0], b)})
        writer = writer or pq.ParquetWriter(work / "pairs.parquet", batch.schema)
        writer.write_table(batch)
    writer.close()
    secs, rss = peak_rss([COSIM, "ingest", str(work / "rss-pairs.zarr"), "--embeddings",
                          str(work / "E.npy"), "--pairs", str(work / "pairs.parquet")])
    rows.append((f"cosim ingest --embeddings ({table_rows:,} rows) --pairs (.parquet)",
                 data_mib, secs, rss))
    print(f"\n## Peak RSS of the streaming commands: {n:,} pairs x d={d}\n")
    print("| command | store data MiB | seconds | kpairs/s | peak RSS MiB | data / RSS |")
    print("|---|---|---|---|---|---|")
    for name, data, secs, rss in rows:
        print(f"| {name} | {data:,.0f} | {secs:.1f} | {n / secs / 1e3:,.0f} | {rss:,.0f} | "
              f"{data / rss:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--codec-pairs", type=int, default=524_288)
    ap.add_argument("--rss-pairs", type=int, default=3_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["codecs", "chunks", "rss"])
    args = ap.parse_args()
    if args.quick:
        args.codec_pairs, args.rss_pairs, args.repeats = 32_768, 200_000, 1
    d = args.dim
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as they finish
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-store-") as tmp:
        work = Path(tmp)
        print(f"# bench_store: zarr {zarr.__version__}, numpy {np.__version__}, "
              f"{os.cpu_count()} cores")
        if "codecs" not in args.skip:
            rows = min(default_chunk_rows(d), args.codec_pairs)  # the default chunking
            codec_table(work, args.codec_pairs, d, rows, args.repeats)
        if "chunks" not in args.skip:
            sizes = [s for s in (16_384, 32_768, 65_536, 131_072) if s <= args.codec_pairs]
            chunk_table(work, args.codec_pairs, d, sizes, args.repeats)
        if "rss" not in args.skip:
            rss_table(work, args.rss_pairs, d, table_rows=max(args.rss_pairs // 10, 1000))


if __name__ == "__main__":
    main()
