"""The workers' chunk reader: the direct file path against zarr's own read, on real stores."""

import os

import numpy as np
import pytest
import zarr

from cosim_dask.data.reader import StoreSlice, direct_readable, read_group, read_slice
from cosim_dask.data.store import create_store
from cosim_dask.errors import StoreError


def make_store(path, rng, n=53, d=6, chunk_rows=8, **kw):
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.standard_normal((n, d)).astype(np.float32)
    t = rng.uniform(-1, 1, n).astype(np.float32)
    with create_store(path, d=d, chunk_rows=chunk_rows, **kw) as w:
        w.append(x, y, t)
    return x, y, t


def zarr_rows(path, lo, hi):
    g = zarr.open_group(str(path), mode="r")
    return tuple(np.asarray(g[name][lo:hi]) for name in ("x", "y", "target"))


@pytest.mark.parametrize("kw, direct", [({"codec": "none"}, True), ({"codec": "lz4"}, False),
                                        ({"codec": "none", "shard_chunks": 2}, False)])
def test_direct_path_only_for_raw_local_chunks(tmp_path, rng, kw, direct):
    make_store(tmp_path / "s.zarr", rng, **kw)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for name in ("x", "y", "target"):
        assert direct_readable(str(tmp_path / "s.zarr"), g[name]) is direct


@pytest.mark.parametrize("codec", ["none", "lz4"])
@pytest.mark.parametrize("lo, hi", [(0, 8), (8, 16), (48, 53),  # whole chunks, the short last
                                    (3, 7), (5, 21), (0, 53), (47, 53)])  # inside, across
def test_reads_equal_zarr(tmp_path, rng, codec, lo, hi):
    path = tmp_path / "s.zarr"
    x, y, t = make_store(path, rng, codec=codec)
    for reuse in (False, True):
        got = read_slice(StoreSlice(str(path), lo // 8, lo, hi), reuse=reuse)
        for g, want, ref in zip(got, zarr_rows(path, lo, hi), (x, y, t), strict=True):
            assert g.dtype == np.float32 and g.flags.c_contiguous
            np.testing.assert_array_equal(g, want)
            np.testing.assert_array_equal(g, ref[lo:hi])


def test_group_read_splits_into_its_chunks(tmp_path, rng):
    path = tmp_path / "s.zarr"
    x, y, t = make_store(path, rng)
    pieces = [StoreSlice(str(path), i, 8 * i, min(8 * i + 8, 53)) for i in range(4, 7)]
    for reuse in (False, True):
        for p, (gx, gy, gt) in zip(pieces, read_group(pieces, reuse=reuse), strict=True):
            np.testing.assert_array_equal(gx, x[p.lo:p.hi])
            np.testing.assert_array_equal(gy, y[p.lo:p.hi])
            np.testing.assert_array_equal(gt, t[p.lo:p.hi])


def test_reused_buffers_are_overwritten_fresh_reads_are_not(tmp_path, rng):
    path = tmp_path / "s.zarr"
    x, _, _ = make_store(path, rng)
    fresh = read_slice(StoreSlice(str(path), 0, 0, 8))
    reused = read_slice(StoreSlice(str(path), 0, 0, 8), reuse=True)
    read_slice(StoreSlice(str(path), 1, 8, 16), reuse=True)
    read_slice(StoreSlice(str(path), 2, 16, 24))
    np.testing.assert_array_equal(fresh[0], x[0:8])  # kept: persisted data relies on it
    np.testing.assert_array_equal(reused[0], x[8:16])  # the buffer holds the newer chunk


def test_truncated_raw_chunk_names_itself(tmp_path, rng):
    path = tmp_path / "s.zarr"
    make_store(path, rng)
    chunk = path / "y" / "c" / "2" / "0"
    with open(chunk, "r+b") as f:
        f.truncate(os.path.getsize(chunk) // 2)
    read_slice(StoreSlice(str(path), 1, 8, 16))  # other chunks still read
    with pytest.raises(StoreError, match=r"chunk 2 \(rows 16:24\) of array 'y'.*truncated"):
        read_slice(StoreSlice(str(path), 2, 16, 24), reuse=True)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_prefetch_reads_a_later_chunks_files_in_the_background(tmp_path, rng):
    from cosim_dask.data import reader

    path = tmp_path / "s.zarr"
    make_store(path, rng, n=4000, d=64, chunk_rows=1000)
    piece = StoreSlice(str(path), 2, 2000, 3000)
    files = reader.chunk_files(piece)
    assert [f.relative_to(path).as_posix() for f in files] == ["x/c/2/0", "y/c/2/0",
                                                                "target/c/2"]
    before = _rchar()
    reader.prefetch([piece])
    reader._prefetcher.submit(lambda: None).result()  # the one prefetch thread is done
    assert _rchar() - before >= sum(f.stat().st_size for f in files)


def test_prefetch_leaves_errors_to_the_real_read(tmp_path, rng):
    from cosim_dask.data import reader

    path = tmp_path / "s.zarr"
    make_store(path, rng)
    (path / "x" / "c" / "1" / "0").unlink()
    reader.prefetch([StoreSlice(str(path), 1, 8, 16), StoreSlice(str(tmp_path / "no"), 0, 0, 8)])
    reader._prefetcher.submit(lambda: None).result()
    with pytest.raises(StoreError, match="is missing"):
        read_slice(StoreSlice(str(path), 1, 8, 16))
