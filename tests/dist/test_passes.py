"""The distributed evaluation on a real LocalCluster (the session's shared ``client``) against
the single-process NumPy core."""

import dask.array as da
import numpy as np
import pytest
import zarr
from helpers import random_spd

from cosim_dask.core.forms import FactorMetric, FullMetric
from cosim_dask.core.kernel import chunk_partial
from cosim_dask.core.losses import get_loss
from cosim_dask.core.objective import Objective
from cosim_dask.data.split import validation_mask
from cosim_dask.data.synthetic import synthetic_pairs
from cosim_dask.dist import passes
from cosim_dask.dist.passes import DaskPairs, LocalPairs, persisted_pieces, store_pieces
from cosim_dask.dist.tasks import ChunkSpec, chunk_result, score_rows
from cosim_dask.dist.tree import Tree
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
    assert Tree(n_leaves, k).depth == depth


@pytest.mark.parametrize("n_chunks,k", [(17, 2), (17, 4), (30, 8)])
def test_graph_is_a_tree_of_expected_depth(client, data, n_chunks, k):
    # One task per chunk (full passes over persisted chunks otherwise take one task per
    # worker's run: test_runs_fold_the_same_tree_as_one_task_per_chunk).
    pairs = dask_pairs(client, data, -(-5000 // n_chunks), k, worker_runs=False)
    params, chunks = np.eye(12), list(range(pairs.n_chunks))
    assert pairs(params).count == 5000  # the graph below is the one a pass computes
    root = pairs.graph(params, pairs.spec, chunks, "t", pairs.tasks(params, chunks))
    graph = dict(root.__dask_graph__())
    combine = [key for key in graph if str(key).startswith("cosim-combine-")]
    levels = {int(str(key).split("-")[3]) for key in combine}
    assert max(levels) == Tree(n_chunks, k).depth
    # No combine task takes more than k inputs: a tree, not one fan-in of everything.
    for key in combine:
        task = graph[key]
        assert len(task.dependencies) <= k


def test_pass_graph_orders_its_tasks_and_carries_small_parameters(client, data, monkeypatch):
    # Tasks run in chunk order (priorities), and parameters whose copies take at most
    # PARAMS_IN_GRAPH_BYTES ride in every task of the pass's graph instead of a scatter
    # before it; larger ones are scattered.
    pairs = dask_pairs(client, data, 500, 2, worker_runs=False)
    params, chunks = np.eye(12), list(range(pairs.n_chunks))
    tasks = pairs.tasks(params, chunks)
    ref = pairs._params_ref(params, len(tasks))
    assert ref is params
    root = pairs.graph(ref, pairs.spec, chunks, "t", tasks)
    layers = root.__dask_graph__().layers
    priorities = [layers[f"cosim-chunk-t-{start}"].annotations["priority"]
                  for start, *_ in tasks]
    assert priorities == sorted(priorities, reverse=True) and len(set(priorities)) == len(tasks)
    got, expected = client.compute(root).result().train, pairs(params)
    assert got.loss == expected.loss and np.array_equal(got.grad, expected.grad)
    monkeypatch.setattr(passes, "PARAMS_IN_GRAPH_BYTES", params.nbytes * len(tasks) - 1)
    scattered = pairs._params_ref(params, len(tasks))
    assert type(scattered).__name__ == "Future"
    scattered.release()


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


def level_by_level(items, k, combine):
    """The reduction tree as its definition reads: items added k at a time, level by level."""
    while len(items) > 1:
        items = [combine(*items[j : j + k]) for j in range(0, len(items), k)]
    return items[0]


@pytest.mark.parametrize("n, k", [(1, 2), (7, 2), (62, 8), (64, 8), (65, 8), (100, 3)])
def test_runs_fold_the_same_tree_as_one_task_per_chunk(n, k):
    """Per-worker runs, folded and built into the tree, add in exactly the level-by-level
    order (k at a time), for any partition of the chunks into consecutive runs (checked on
    the sum's written form)."""

    def combine(*parts):
        return "(" + "+".join(parts) + ")" if len(parts) > 1 else parts[0]

    leaves = [f"c{i}" for i in range(n)]
    want = level_by_level(leaves, k, combine)
    tree = Tree(n, k)
    assert tree.sum(leaves, combine) == want
    rng = np.random.default_rng(n * 31 + k)
    for _ in range(20):
        cuts = sorted(set(rng.integers(1, n, size=rng.integers(0, 5)).tolist())) if n > 1 else []
        bounds = [0, *cuts, n]
        nodes = {}
        for a, b in zip(bounds, bounds[1:], strict=False):
            nodes.update(tree.fold(leaves[a:b], a, b, combine))
        got = tree.build(nodes, lambda node, children: combine(*children))
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_way_of_cutting_a_pass_gives_the_same_bits(client, tmp_path, seed):
    """In-process, one task per chunk (the delayed tree), grouped tasks (persisted and
    streamed from a store), and worker runs: the same training partial, validation
    statistics and evaluation statistics, bitwise, for a random fan-in and chunk count."""
    from cosim_dask.data.store import create_store, open_store

    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    n_chunks = int(rng.integers(k + 2, 25))
    rows = 37
    x, y, t, _ = synthetic_pairs(n_chunks * rows - int(rng.integers(0, rows)), 6, rank=2,
                                 seed=seed, targets="binary")
    path = tmp_path / "s.zarr"
    with create_store(path, d=6, chunk_rows=rows) as writer:
        writer.append(x, y, t)
    store = open_store(path)
    assert store.n_chunks == n_chunks
    group = k ** int(rng.integers(1, 3))
    kw = dict(validation=0.3, seed=seed, split_every=k)
    held = persisted_pieces(client, da.from_array(x, chunks=(rows, -1)),
                            da.from_array(y, chunks=(rows, -1)), da.from_array(t, chunks=rows))
    streamed = store_pieces(store.path, store.chunk_slices())
    ways = {
        "in-process": LocalPairs(x, y, t, FullMetric(), "mse", chunk_rows=rows, **kw),
        "per chunk": DaskPairs(client, held, FullMetric(), "mse", worker_runs=False,
                               chunks_per_task=1, **kw),
        "grouped": DaskPairs(client, held, FullMetric(), "mse", worker_runs=False,
                             chunks_per_task=group, **kw),
        "streamed, grouped": DaskPairs(client, streamed, FullMetric(), "mse",
                                       chunks_per_task=group, **kw),
        "worker runs": DaskPairs(client, held, FullMetric(), "mse", **kw),
    }
    assert held.runs is not None and len(held.runs) == 2
    A = random_spd(rng, 6)
    results = {}
    for name, pairs in ways.items():
        train = pairs(A)
        scores = pairs.score(A, ("train", "validation"))
        results[name] = (train, pairs.last_validation, scores)
    want_train, want_val, want_scores = results.pop("in-process")
    for name, (train, val, scores) in results.items():
        assert (train.loss, train.count) == (want_train.loss, want_train.count), name
        np.testing.assert_array_equal(train.grad, want_train.grad, err_msg=name)
        assert (val.count, val.loss, val.auc()) == \
            (want_val.count, want_val.loss, want_val.auc()), name
        for key, want in want_scores.items():
            got = scores[key]
            assert (got.count, got.loss, got.sq_error) == \
                (want.count, want.loss, want.sq_error), (name, key)
            np.testing.assert_array_equal(got.pos_hist, want.pos_hist)
            np.testing.assert_array_equal(got.neg_hist, want.neg_hist)


def test_split_every_is_resolved_and_checked_in_one_place():
    """The option, else Dask's config, else 8; anything under 2 is refused wherever it came
    from (a config of 1 used to reach the task grouping, which never ended)."""
    import dask

    from cosim_dask.dist.tree import resolve_split_every
    from cosim_dask.errors import CosimError
    from cosim_dask.fit.train import RunOptions

    x, y, t = np.ones((10, 3)), np.ones((10, 3)), np.ones(10)
    assert resolve_split_every(None) == 8
    assert resolve_split_every(3) == 3
    with dask.config.set(split_every=5):
        assert resolve_split_every(None) == 5
        assert LocalPairs(x, y, t, FullMetric(), "mse").split_every == 5
        assert resolve_split_every(4) == 4
    with dask.config.set(split_every=1), \
            pytest.raises(CosimError, match="Dask's config split_every=1"):
        RunOptions().check()
    for bad in (0, 1, 2.5, True):
        with pytest.raises(CosimError, match=f"split_every={bad!r}"):
            resolve_split_every(bad)


def test_each_split_scores_as_its_rows_alone_would():
    # Plain cosine skips the product with I (half of an evaluation pass's work), and each
    # split's figures keep the bits of scoring its rows under A and under np.eye(d).
    rng = np.random.default_rng(8)
    x, y = (rng.standard_normal((3001, 16), dtype=np.float32) for _ in range(2))
    x[7] = 0.0  # an invalid pair is left out of every split it is in
    t = np.where(rng.random(3001) < 0.5, 1.0, -1.0)
    A, loss = random_spd(rng, 16), get_loss("mse")
    spec = ChunkSpec(FullMetric(), loss, validation=0.3, seed=1, with_train=False,
                     splits=("train", "validation", "all"))
    got = chunk_result(x, y, t, A, spec, 4).scores
    val = validation_mask(4, len(x), 0.3, 1)
    for split, rows in (("train", ~val), ("validation", val), ("all", np.ones(3001, bool))):
        for name, metric in (("learned", A), ("plain", np.eye(16))):
            want = score_rows(x[rows], y[rows], t[rows], metric, loss)
            have = got[f"{name}/{split}"]
            assert (have.loss, have.count, have.sq_error) == (want.loss, want.count,
                                                              want.sq_error)
            assert np.array_equal(have.pos_hist, want.pos_hist)
            assert np.array_equal(have.neg_hist, want.neg_hist)
