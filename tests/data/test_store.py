"""The pair-store format: create/open round trips, chunking, errors, split, generated data."""

import uuid

import numpy as np
import pytest
import zarr

from cosim_dask import pair_similarity
from cosim_dask.data.ingest import generate_store
from cosim_dask.data.split import validation_mask
from cosim_dask.data.store import (
    FORMAT,
    FORMAT_VERSION,
    choose_chunk_rows,
    create_store,
    default_chunk_rows,
    open_store,
)
from cosim_dask.errors import CosimError, StoreError
from cosim_dask.outputs import OutputError


def leftovers(folder):
    """Temporary or set-aside directories the atomic writer may have left."""
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def write(path, x, y, t, chunk_rows, **kw):
    with create_store(path, d=x.shape[1], chunk_rows=chunk_rows, **kw) as w:
        for lo in range(0, len(t), 5):  # blocks that do not line up with the chunks
            w.append(x[lo:lo + 5], y[lo:lo + 5], t[lo:lo + 5])


@pytest.fixture
def pairs(rng):
    x = rng.standard_normal((23, 4)).astype(np.float32)
    y = rng.standard_normal((23, 4)).astype(np.float32)
    t = rng.uniform(-1, 1, 23).astype(np.float32)
    return x, y, t


def test_round_trip_and_chunks(tmp_path, pairs):
    x, y, t = pairs
    write(tmp_path / "s.zarr", x, y, t, chunk_rows=8)
    store = open_store(tmp_path / "s.zarr")
    assert (store.n, store.d, store.chunk_rows, store.targets) == (23, 4, 8, "graded")
    assert store.x.chunks == ((8, 8, 7), (4,)) and store.target.chunks == ((8, 8, 7),)
    assert store.n_chunks == 3
    assert store.chunk_slices() == [slice(0, 8), slice(8, 16), slice(16, 23)]
    np.testing.assert_array_equal(store.x.compute(), x)
    np.testing.assert_array_equal(store.y.compute(), y)
    np.testing.assert_array_equal(store.target.compute(), t)
    assert store.x.dtype == np.float32 and store.hidden_metric is None
    # the Dask arrays use exactly the on-disk chunking: no rechunk
    z = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert z["x"].chunks == (8, 4) and z["target"].chunks == (8,)
    assert store.attrs["format"] == FORMAT and store.attrs["format_version"] == FORMAT_VERSION
    assert leftovers(tmp_path) == []


def test_fingerprint_stable_and_new_on_rewrite(tmp_path, pairs):
    x, y, t = pairs
    write(tmp_path / "s.zarr", x, y, t, chunk_rows=8)
    a, b = open_store(tmp_path / "s.zarr"), open_store(str(tmp_path / "s.zarr"))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    write(tmp_path / "s.zarr", x, y, t, chunk_rows=8, overwrite=True)
    assert open_store(tmp_path / "s.zarr").fingerprint != a.fingerprint


def test_binary_targets_inferred(tmp_path, pairs):
    x, y, _ = pairs
    t = np.where(np.arange(23) % 3 == 0, 1.0, -1.0).astype(np.float32)
    write(tmp_path / "s.zarr", x, y, t, chunk_rows=8)
    store = open_store(tmp_path / "s.zarr")
    assert store.targets == "binary"
    stats = store.attrs["target_stats"]
    assert (stats["count_pos"], stats["count_neg"]) == (8, 15)


def test_memory_url_round_trip(pairs):
    x, y, t = pairs
    url = f"memory://cosim-test-{uuid.uuid4().hex}"
    write(url, x, y, t, chunk_rows=10)
    store = open_store(url)
    assert store.x.chunks == ((10, 10, 3), (4,))
    np.testing.assert_array_equal(store.y.compute(), y)
    with pytest.raises(OutputError, match="already exists"):
        write(url, x, y, t, chunk_rows=10)


def test_sharded_store_opens_with_inner_chunks(tmp_path, pairs):
    x, y, t = pairs
    write(tmp_path / "s.zarr", x, y, t, chunk_rows=4, shard_chunks=2)
    store = open_store(tmp_path / "s.zarr")
    assert store.x.chunks[0] == (4, 4, 4, 4, 4, 3)
    np.testing.assert_array_equal(store.x.compute(), x)


def test_interrupted_write_keeps_old_store(tmp_path, pairs):
    x, y, t = pairs
    path = tmp_path / "s.zarr"
    write(path, x, y, t, chunk_rows=8)
    before = open_store(path).fingerprint
    with pytest.raises(RuntimeError), create_store(path, d=4, chunk_rows=8,
                                                   overwrite=True) as w:
        w.append(x * 2, y, t)
        raise RuntimeError("killed mid-write")
    store = open_store(path)
    assert store.fingerprint == before
    np.testing.assert_array_equal(store.x.compute(), x)
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError), create_store(tmp_path / "new.zarr", d=4) as w:
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_empty_store_is_refused(tmp_path):
    with pytest.raises(StoreError, match="no pairs"), create_store(tmp_path / "e.zarr", d=3):
        pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "not a cosim pair store"),
    (lambda p: zarr.open_group(str(p), mode="w"), "format attribute None"),
    (lambda p: zarr.open_group(str(p), mode="w").create_array("x", shape=(2,), dtype="f4"),
     "not a cosim pair store"),
])
def test_open_errors(tmp_path, make, match):
    path = tmp_path / "bad.zarr"
    make(path)
    with pytest.raises(StoreError, match=match) as info:
        open_store(path)
    assert "\n" not in str(info.value) and "bad.zarr" in str(info.value)


def test_open_errors_version_and_shapes(tmp_path, pairs):
    x, y, t = pairs
    path = tmp_path / "s.zarr"
    write(path, x, y, t, chunk_rows=8)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["n"] = 24
    with pytest.raises(StoreError, match="inconsistent"):
        open_store(path)
    group.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99"):
        open_store(path)


def test_validation_mask():
    a = validation_mask(3, 1000, 0.2, seed=7)
    assert a.dtype == bool and a.shape == (1000,)
    np.testing.assert_array_equal(a, validation_mask(3, 1000, 0.2, seed=7))
    assert not np.array_equal(a, validation_mask(4, 1000, 0.2, seed=7))
    assert not np.array_equal(a, validation_mask(3, 1000, 0.2, seed=8))
    # a shorter (last) chunk gets a prefix of the same mask
    np.testing.assert_array_equal(validation_mask(3, 100, 0.2, seed=7), a[:100])
    assert 0.15 < validation_mask(0, 20000, 0.2, seed=1).mean() < 0.25
    assert not validation_mask(0, 50, 0.0, seed=1).any()
    for bad in (1.0, -0.1, float("nan"), 2):
        with pytest.raises(CosimError, match="must be in"):
            validation_mask(0, 10, bad, seed=0)


def test_chunk_rows_defaults():
    assert default_chunk_rows(128) == 32768
    assert default_chunk_rows(768) == 4096
    assert default_chunk_rows(1) == 2**20
    assert default_chunk_rows(10**6) == 1024
    assert choose_chunk_rows(128, 1000, None) == 1000
    assert choose_chunk_rows(128, 1_000_000, None) == 32_259  # 31 equal chunks, no runt
    assert choose_chunk_rows(128, 32_769, None) == 16_385
    assert choose_chunk_rows(128, 1000, 300) == 300
    assert choose_chunk_rows(128, None, 500) == 500
    with pytest.raises(CosimError, match="chunk_pairs=0"):
        choose_chunk_rows(4, 10, 0)


@pytest.mark.parametrize("targets", ["graded", "binary"])
def test_generated_targets_follow_hidden_metric(tmp_path, targets):
    noise = 0.02
    report = generate_store(tmp_path / "g.zarr", pairs=3000, dim=6, rank=2, noise=noise,
                            targets=targets, seed=3, chunk_rows=1000)
    store = open_store(tmp_path / "g.zarr")
    assert report.n == store.n == 3000 and store.targets == targets
    A = store.hidden_metric
    assert A.shape == (6, 6) and np.allclose(A, A.T)
    assert store.attrs["hidden_metric_rank"] == 2
    assert store.attrs["provenance"]["params"]["seed"] == 3
    s = pair_similarity(store.x.compute(), store.y.compute(), A)
    t = store.target.compute()
    if targets == "graded":
        assert np.abs(np.clip(s, -1, 1) - t).max() < 6 * noise
    else:
        assert set(np.unique(t)) == {-1.0, 1.0}
        clear = np.abs(s) > 6 * noise
        np.testing.assert_array_equal(np.sign(s[clear]), t[clear])
    # same seed and chunking -> the same data
    generate_store(tmp_path / "g2.zarr", pairs=3000, dim=6, rank=2, noise=noise,
                   targets=targets, seed=3, chunk_rows=1000)
    np.testing.assert_array_equal(open_store(tmp_path / "g2.zarr").x.compute(),
                                  store.x.compute())


def test_overwrite_replaces_only_pair_stores(tmp_path, pairs):
    x, y, t = pairs
    folder = tmp_path / "my-data"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(OutputError, match="refusing to replace .* not a cosim pair store"):
        write(folder, x, y, t, chunk_rows=8, overwrite=True)
    assert (folder / "precious.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty", x, y, t, chunk_rows=8, overwrite=True)
    assert open_store(tmp_path / "empty").n == 23


@pytest.mark.parametrize("chunking", [{"chunk_rows": 8}, {"chunk_rows": 4, "shard_chunks": 2}])
def test_all_zero_chunks_are_written_and_read_back(tmp_path, rng, chunking):
    # zarr skips all-zero chunks by default; the readers' chunk-file check would call them
    # missing. Rows 8:16 of x and 16:24 of the targets are zeros (a whole chunk or shard).
    from cosim_dask.core.forms import FullMetric
    from cosim_dask.core.losses import get_loss
    from cosim_dask.data.reader import StoreSlice, read_group, read_slice
    from cosim_dask.dist.tasks import ChunkSpec, chunk_result
    from cosim_dask.dist.tree import Tree

    x = rng.standard_normal((24, 4)).astype(np.float32)
    y = rng.standard_normal((24, 4)).astype(np.float32)
    t = rng.uniform(-1, 1, 24).astype(np.float32)
    x[8:16] = 0.0
    t[16:24] = 0.0
    path = tmp_path / "zeros.zarr"
    write(path, x, y, t, targets="graded", **chunking)
    store = open_store(path)
    pieces = [StoreSlice(str(path), i, s.start, s.stop)
              for i, s in enumerate(store.chunk_slices())]
    got = read_group(pieces)  # the workers' read, with its chunk-file check
    for name, column, expected in (("x", 0, x), ("y", 1, y), ("target", 2, t)):
        np.testing.assert_array_equal(np.concatenate([g[column] for g in got]), expected,
                                      err_msg=name)
    # one training pass streaming chunk by chunk from the store, as a worker would, against
    # the same pass over the arrays in memory (the zero x rows are invalid pairs: skipped)
    A = np.eye(4) + 0.1
    spec = ChunkSpec(FullMetric(), get_loss("mse"), on_invalid="skip")
    tree = Tree(len(pieces), 2)
    streamed = tree.sum([chunk_result(*read_slice(p), A, spec, p.index) for p in pieces]).train
    in_memory = tree.sum([chunk_result(x[s], y[s], t[s], A, spec, i)
                          for i, s in enumerate(store.chunk_slices())]).train
    assert (streamed.count, streamed.skipped) == (in_memory.count, in_memory.skipped) == (16, 8)
    assert streamed.loss == in_memory.loss
    np.testing.assert_array_equal(streamed.grad, in_memory.grad)
