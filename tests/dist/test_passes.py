"""The distributed evaluation on a real LocalCluster (the session's shared ``client``) against
the single-process NumPy core."""

import dask.array as da
import numpy as np
import pytest
import zarr
from helpers import random_spd

from cosim_dask.core.forms import FactorMetric, FullMetric
from cosim_dask.core.kernel import chunk_partial
from cosim_dask.core.objective import Objective
from cosim_dask.data.store import validation_mask
from cosim_dask.data.synthetic import synthetic_pairs
from cosim_dask.dist.passes import DaskPairs, LocalPairs, persisted_pieces, store_pieces, tree_depth
from cosim_dask.errors import InvalidPairsError


@pytest.fixture(scope="module")
def data():
    x, y, t, _ = synthetic_pairs(5000, 12, rank=4, seed=1, targets="binary")
    return x.astype(np.float64), y.astype(np.float64), t.astype(np.float64)


def dask_pairs(client, data, chunk_rows, split_every, form=FullMetric(), **kw):
    x, y, t = data
    pieces = persisted_pieces(client, da.from_array(x, chunks=(chunk_rows, -1)),
                                    da.from_array(y, chunks=(chunk_rows, -1)),
                                    da.from_array(t, chunks=chunk_rows))
    return DaskPairs(client, pieces, form, "mse", split_every=split_every, **kw)


@pytest.mark.parametrize("chunk_rows,split_every", [(5000, 2), (700, 2), (700, 3), (333, 8)])
def test_distributed_partial_equals_numpy(client, data, chunk_rows, split_every):
    x, y, t = data
    rng = np.random.default_rng(0)
    A = random_spd(rng, 12)
    expected = chunk_partial(x, y, t, A)
    got = dask_pairs(client, data, chunk_rows, split_every)(A)
    assert got.count == expected.count == 5000
    assert got.loss == pytest.approx(expected.loss, rel=1e-12)
    np.testing.assert_allclose(got.grad, expected.grad, rtol=1e-10, atol=1e-12)


def test_result_is_deterministic_run_to_run(client, data):
    pairs = dask_pairs(client, data, 300, 4)
    A = random_spd(np.random.default_rng(1), 12)
    first = pairs(A)
    for _ in range(3):
        again = pairs(A)
        assert again.loss == first.loss
        np.testing.assert_array_equal(again.grad, first.grad)


def test_factor_form_distributed(client, data):
    x, y, t = data
    M = np.random.default_rng(2).standard_normal((5, 12))
    got = dask_pairs(client, data, 900, 2, form=FactorMetric(rank=5))(M)
    expected = FactorMetric(rank=5).chunk_partial(x, y, t, M, "mse")
    np.testing.assert_allclose(got.grad, expected.grad, rtol=1e-10)


@pytest.mark.parametrize("n_leaves,k,depth", [(1, 2, 0), (2, 2, 1), (8, 2, 3), (9, 2, 4),
                                               (64, 8, 2), (65, 8, 3), (10000, 32, 3)])
def test_tree_depth(n_leaves, k, depth):
    assert tree_depth(n_leaves, k) == depth


@pytest.mark.parametrize("n_chunks,k", [(17, 2), (17, 4), (30, 8)])
def test_graph_is_a_tree_of_expected_depth(client, data, n_chunks, k):
    from cosim_dask.dist import passes as step

    captured = {}
    original = step.tree_reduce

    def spy(leaves, split_every, token):
        root = original(leaves, split_every, token)
        captured["graph"] = dict(root.__dask_graph__())
        return root

    step.tree_reduce = spy
    try:
        # One task per chunk (full passes over persisted chunks otherwise take one task per
        # worker's run: test_runs_fold_the_same_tree_as_one_task_per_chunk).
        dask_pairs(client, data, -(-5000 // n_chunks), k, worker_runs=False)(np.eye(12))
    finally:
        step.tree_reduce = original
    combine = [key for key in captured["graph"] if str(key).startswith("cosim-combine-")]
    levels = {int(str(key).split("-")[3]) for key in combine}
    assert max(levels) == tree_depth(n_chunks, k)
    # No combine task takes more than k inputs: a tree, not one fan-in of everything.
    for key in combine:
        task = captured["graph"][key]
        assert len(task.dependencies) <= k


@pytest.mark.parametrize("compressors", [None, "auto"])  # direct file reads, zarr's reads
@pytest.mark.parametrize("read_ahead", [0, 1, 3, None])
def test_streaming_from_store_equals_persisted(client, data, tmp_path, compressors,
                                               read_ahead):
    x, y, t = data
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    for name, a in (("x", x), ("y", y), ("target", t)):
        z = root.create_array(name, shape=a.shape, dtype=a.dtype,
                              chunks=(1000,) + a.shape[1:], compressors=compressors)
        z[...] = a
    slices = [slice(lo, min(lo + 1000, 5000)) for lo in range(0, 5000, 1000)]
    pieces = store_pieces(str(tmp_path / "s.zarr"), slices)
    streamed = DaskPairs(client, pieces, FullMetric(), "mse", split_every=2,
                         read_ahead=read_ahead)
    persisted = dask_pairs(client, data, 1000, 2)
    A = random_spd(np.random.default_rng(3), 12)
    a, b = streamed(A), persisted(A)
    assert a.loss == b.loss
    np.testing.assert_array_equal(a.grad, b.grad)


def test_persisted_chunks_are_spread_evenly_one_key_each(client, data):
    """Each chunk's x, y and target are one key, and the workers hold equal shares (the
    scheduler alone had put 24 and 36 of 60 chunks on two equal workers)."""
    from distributed import wait

    pairs = dask_pairs(client, data, 250, 4)  # 20 chunks
    with client.as_current():  # the shared client is not Dask's default one
        wait(pairs.pieces)
    who = client.who_has(pairs.pieces)
    holders = [who[item.key] for item in pairs.pieces]
    assert len(holders) == 20 and all(len(w) == 1 for w in holders)
    per_worker = {}
    for k, (w,) in enumerate(holders):
        per_worker.setdefault(w, []).append(k)
    assert sorted(len(v) for v in per_worker.values()) == [10, 10]
    # Consecutive runs: the first levels of the tree need no transfers.
    assert sorted(v[0] for v in per_worker.values()) == [0, 10]


def test_validation_rows_are_held_out(client, data):
    x, y, t = data
    pairs = dask_pairs(client, data, 1000, 2, validation=0.2, seed=5)
    A = np.eye(12)
    train = pairs(A)
    masks = [validation_mask(i, 1000, 0.2, 5) for i in range(5)]
    val = np.concatenate(masks)
    expected = chunk_partial(x[~val], y[~val], t[~val], A)
    assert train.count == (~val).sum()
    assert train.loss == pytest.approx(expected.loss, rel=1e-12)
    assert pairs.last_validation.count == val.sum()


def test_minibatch_samples_chunks(client, data):
    pairs = dask_pairs(client, data, 500, 2, batch_chunks=3, seed=1)
    p = pairs(np.eye(12), batch=4)
    assert p.count == 1500
    assert pairs(np.eye(12), batch=4).loss == p.loss  # same batch number, same chunks


def test_invalid_rows_error_names_the_chunk(client, data):
    x, y, t = (a.copy() for a in data)
    x[2345] = 0.0
    pairs = dask_pairs(client, (x, y, t), 1000, 2)
    with pytest.raises(InvalidPairsError, match="1 pair.* in chunk 2 .*row 345"):
        pairs(np.eye(12))


def test_objective_matches_in_memory(client, data):
    x, y, t = data
    form = FullMetric()
    local = Objective(form, LocalPairs(x, y, t, form, "mse", chunk_rows=800), 0.1)
    remote = Objective(form, dask_pairs(client, data, 800, 3), 0.1)
    A = random_spd(np.random.default_rng(4), 12)
    (fl, gl), (fr, gr) = local(A), remote(A)
    assert fl == pytest.approx(fr, rel=1e-12)
    np.testing.assert_allclose(gl, gr, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n, k", [(1, 2), (7, 2), (62, 8), (64, 8), (65, 8), (100, 3)])
def test_runs_fold_the_same_tree_as_one_task_per_chunk(n, k):
    """Per-worker runs, folded and stitched, add in exactly tree_reduce's order, for any
    partition of the chunks into consecutive runs (checked on the sum's written form)."""
    from cosim_dask.dist.passes import fold_run, stitch_tree, tree_sum

    def combine(*parts):
        return "(" + "+".join(parts) + ")" if len(parts) > 1 else parts[0]

    leaves = [f"c{i}" for i in range(n)]
    want = tree_sum(leaves, k, combine)
    rng = np.random.default_rng(n * 31 + k)
    for _ in range(20):
        cuts = sorted(set(rng.integers(1, n, size=rng.integers(0, 5)).tolist())) if n > 1 else []
        bounds = [0, *cuts, n]
        nodes = {}
        for a, b in zip(bounds, bounds[1:], strict=False):
            nodes.update(fold_run(leaves[a:b], a, b, k, n, combine))
        got = stitch_tree(nodes, k, n, lambda level, j, children: combine(*children))
        assert got == want, (bounds, got, want)


@pytest.mark.parametrize("chunk_rows,split_every", [(700, 2), (333, 8), (250, 3)])
def test_worker_runs_equal_one_task_per_chunk_bitwise(client, data, chunk_rows, split_every):
    A = random_spd(np.random.default_rng(5), 12)
    by_runs = dask_pairs(client, data, chunk_rows, split_every, validation=0.2)
    per_chunk = dask_pairs(client, data, chunk_rows, split_every, validation=0.2,
                           worker_runs=False)
    assert by_runs.source.runs is not None and len(by_runs.source.runs) == 2
    a, b = by_runs(A), per_chunk(A)
    assert a.loss == b.loss and a.count == b.count
    np.testing.assert_array_equal(a.grad, b.grad)
    assert by_runs.last_validation.auc() == per_chunk.last_validation.auc()
