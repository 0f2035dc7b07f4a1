"""Load: a store of 10,000 tiny chunks. Small chunks are grouped into tasks (a power of the
fan-in per task), and the sums come out bitwise as with one task per chunk."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from distributed import wait

from cosim_dask.core.forms import FullMetric
from cosim_dask.core.kernel import chunk_partial
from cosim_dask.data.store import create_store, open_store
from cosim_dask.data.synthetic import synthetic_pairs
from cosim_dask.dist.passes import (
    DaskPairs,
    persisted_pieces,
    persisted_store_pieces,
    store_pieces,
)
from cosim_dask.dist.tasks import chunks_per_task


@pytest.fixture(scope="module")
def tiny_chunks(tmp_path_factory):
    """100,000 pairs × d=4 in 5,000 chunks of 20 rows (written in one block): as many tasks
    as 10,000 would be without grouping is more than enough to show the grouping (64 a task)."""
    x, y, t, _ = synthetic_pairs(100_000, 4, rank=2, seed=7, targets="binary")
    path = tmp_path_factory.mktemp("load") / "tiny.zarr"
    with create_store(path, d=4, chunk_rows=20) as writer:
        writer.append(x, y, t)
    return path, (x, y, t)


@pytest.mark.parametrize("n_chunks,chunk_bytes,k,group", [
    (30, 1000, 8, 1),                # few chunks: one task each
    (10_000, 20 * 9 * 4, 8, 64),     # 10k tiny chunks: 157 tasks of 64
    (10_000, 33 * 2**20, 8, 1),      # default 32 MiB chunks are never grouped
    (100_000, 2**20, 2, 16),         # a group holds at most 16 MiB
])
def test_chunks_per_task(n_chunks, chunk_bytes, k, group):
    assert chunks_per_task(n_chunks, chunk_bytes, k) == group


def test_grouped_tasks_sum_bitwise_like_one_task_per_chunk(client):
    x, y, t, _ = synthetic_pairs(256 * 6, 5, rank=2, seed=8, targets="binary")
    pieces = persisted_pieces(client, da.from_array(x, chunks=(6, -1)),
                              da.from_array(y, chunks=(6, -1)), da.from_array(t, chunks=6))
    A = np.eye(5) + 0.05
    results = [DaskPairs(client, pieces, FullMetric(), "mse", split_every=4,
                         chunks_per_task=g, validation=0.2)(A) for g in (1, 4, 16, 64)]
    for r in results[1:]:
        assert r.loss == results[0].loss and r.count == results[0].count
        np.testing.assert_array_equal(r.grad, results[0].grad)
    with pytest.raises(ValueError, match="power of split_every"):
        DaskPairs(client, pieces, FullMetric(), "mse", split_every=4, chunks_per_task=8)


@pytest.mark.slow
def test_thousands_of_tiny_chunks_one_step_equals_numpy(client, tiny_chunks):
    path, (x, y, t) = tiny_chunks
    store = open_store(path)
    assert store.n_chunks == 5_000
    A = np.eye(4) + 0.1
    expected = chunk_partial(x, y, t, A)
    streamed = DaskPairs(client, store_pieces(store.path, store.chunk_slices()), FullMetric(),
                         "mse")
    got = streamed(A)
    assert streamed.chunks_per_task == 64  # 79 tasks a pass, not 5,000
    assert got.count == expected.count == 100_000
    # float32 data: the products are single precision and NumPy's blocks are 4,096 rows,
    # not 20, so the roundoff differs at float32 level (exact equality: the tests above).
    assert got.loss == pytest.approx(expected.loss, rel=1e-6)
    np.testing.assert_allclose(got.grad, expected.grad, rtol=1e-5)
    # In cluster memory: one persisted key per group; the same sums, bitwise.
    pieces = persisted_store_pieces(client, store.path, store.chunk_slices(), group=64)
    with client.as_current():  # the shared client is not Dask's default one
        wait(list(pieces.held))
    assert len(pieces.groups) == 79
    held = DaskPairs(client, pieces, FullMetric(), "mse")(A)
    assert held.loss == got.loss
    np.testing.assert_array_equal(held.grad, got.grad)
    # Mini-batches pick single chunks (streamed) and still add up.
    batches = DaskPairs(client, pieces, FullMetric(), "mse", batch_chunks=5, seed=1)
    assert batches(A, batch=0).count == 100
