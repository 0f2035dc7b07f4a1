"""In-chunk negatives and retrieval figures through whole passes: on the shared LocalCluster
(2 workers) against the same work in this process, and against written-out pairs and an
exact brute-force ranking."""

import dask.array as da
import numpy as np
import pytest

from cosim_dask import CosineMetricLearner
from cosim_dask.core.forms import FactorMetric, FullMetric
from cosim_dask.core.kernel import chunk_partial, pair_similarity
from cosim_dask.core.negatives import negative_partners
from cosim_dask.core.retrieval import block_ranks, candidate_blocks
from cosim_dask.data.split import validation_mask
from cosim_dask.dist.passes import DaskPairs, LocalPairs, persisted_pieces

ROWS = 250  # per chunk


@pytest.fixture(scope="module")
def views():
    """Positive pairs with a shared hidden factor: y is a noisy linear view of x."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, 6))
    y = x @ rng.standard_normal((6, 6)) * 0.5 + rng.standard_normal((1000, 6))
    return x, y, np.ones(1000)


def on_cluster(client, x, y, t, form, **kw):
    pieces = persisted_pieces(client, *(da.from_array(a, chunks=(ROWS, -1) if a.ndim > 1
                                                      else ROWS) for a in (x, y, t)))
    return DaskPairs(client, pieces, form, "mse", **kw)


def test_a_pass_with_negatives_equals_the_written_out_pairs(client, views):
    """Chunk by chunk: the stored (training) pairs weighted w, then the negatives drawn from
    (seed, chunk); validation rows neither train nor serve as partners."""
    x, y, t = views
    K, w, seed = 2, 2, 3
    A = np.eye(6) + 0.1
    got = on_cluster(client, x, y, t, FullMetric(), negatives=K, positive_weight=w,
                     validation=0.2, seed=seed)(A)
    xs, ys, ts = [], [], []
    for c in range(4):
        sl = slice(c * ROWS, (c + 1) * ROWS)
        train = ~validation_mask(c, ROWS, 0.2, seed)
        p = negative_partners(train, K, seed, c)
        xc, yc = x[sl], y[sl]
        xs += [xc[train]] * w + [xc[train]] * K
        ys += [yc[train]] * w + [yc[p[k][train]] for k in range(K)]
        ts += [np.ones(train.sum())] * w + [-np.ones(train.sum())] * K
    # "mse" as the pass has it: label −1 is the target −1 (no remapping asked for).
    ref = chunk_partial(np.concatenate(xs), np.concatenate(ys), np.concatenate(ts), A, "mse")
    assert got.count == ref.count
    assert got.loss == pytest.approx(ref.loss, rel=1e-12)
    np.testing.assert_allclose(got.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_validation_figures_count_the_validation_rows_negatives(client, views):
    """With negatives, each pass's validation statistics are those of the validation
    positives and their own in-chunk negatives (partners among the validation positives),
    written out as pairs: a positive-only store gets a validation AUC, and its validation
    loss is of the objective trained."""
    x, y, t = views
    K, seed = 3, 4
    A = np.eye(6) + 0.1
    pairs = on_cluster(client, x, y, t, FullMetric(), negatives=K, validation=0.2, seed=seed)
    pairs(A)
    got = pairs.last_validation
    s_all, t_all = [], []
    for c in range(4):
        sl = slice(c * ROWS, (c + 1) * ROWS)
        val = validation_mask(c, ROWS, 0.2, seed)
        p = negative_partners(val, K, seed, c)
        xc, yc = x[sl], y[sl]
        s_all += [pair_similarity(xc[val], yc[val], A)]
        s_all += [pair_similarity(xc[val], yc[p[k][val]], A) for k in range(K)]
        t_all += [np.ones(val.sum())] + [-np.ones(val.sum())] * K
    s_all, t_all = np.concatenate(s_all), np.concatenate(t_all)
    assert got.count == len(s_all) == (K + 1) * np.count_nonzero(t_all > 0)
    assert got.mean_loss == pytest.approx(np.mean((s_all - t_all) ** 2), rel=1e-9)
    pos, neg = s_all[t_all > 0], s_all[t_all < 0]
    exact_auc = np.mean(pos[:, None] > neg[None, :])
    assert got.auc() == pytest.approx(exact_auc, abs=2e-3)  # within the score bins
    # A training run's final figures count them too (the same as its last step's); an
    # evaluation without negatives (`cosim evaluate`) scores the stored pairs alone.
    final = pairs.score(A, ("validation",))["learned/validation"]
    assert final.count == got.count and final.loss == pytest.approx(got.loss, rel=1e-12)
    stored = on_cluster(client, x, y, t, FullMetric(), validation=0.2, seed=seed)
    stored = stored.score(A, ("validation",))["learned/validation"]
    assert stored.count == len(pos) and np.isnan(stored.auc())


def test_negatives_give_the_same_bits_on_the_cluster_and_in_process(client, views):
    """The partners depend on (seed, chunk, epoch) only: 2 workers and one process agree."""
    x, y, t = views
    M = np.eye(6)[:4] + 0.05
    form = FactorMetric(rank=4)
    local = LocalPairs(x, y, t, form, "mse", chunk_rows=ROWS, negatives=3, seed=1)(M)
    dist = on_cluster(client, x, y, t, form, negatives=3, seed=1)(M)
    assert dist.loss == local.loss
    np.testing.assert_array_equal(dist.grad, local.grad)


def test_same_seed_same_metric_another_seed_another(views):
    x, y, _ = views
    pairs = np.stack([x, y], axis=1)

    def fit(seed, **kw):
        return CosineMetricLearner(negatives=2, max_iter=3, random_state=seed,
                                   chunk_rows=ROWS, **kw).fit(pairs, np.ones(len(x))).metric_

    # (The cluster's passes equal the in-process ones bitwise: the test above.)
    first = fit(0, cluster="never")
    np.testing.assert_array_equal(first, fit(0, cluster="never"))
    assert not np.array_equal(first, fit(1, cluster="never"))


def brute_force(x, y, A, seed, candidates, rows_of_chunk):
    """Every query against every candidate of its block, one pair_similarity call per query,
    ties counted against the query."""
    ranks = []
    for c, rows in enumerate(rows_of_chunk):
        for queries, cands in candidate_blocks(len(rows), candidates, seed, c):
            for q in queries:
                i = rows[q]
                s = pair_similarity(np.repeat(x[i : i + 1], len(cands), 0), y[rows[cands]], A)
                ranks.append(int(np.sum(s >= s[list(cands).index(q)])))
    return np.array(ranks)


@pytest.mark.parametrize("candidates", [7, 400])
def test_retrieval_pass_equals_brute_force_ranking(client, views, candidates):
    x, y, _ = views
    t = np.where(np.arange(1000) % 9 == 0, -1.0, 1.0)  # labelled negatives are no queries
    y = y.copy()
    y[1], y[2] = y[3], y[3]  # candidates level with a true partner: ties count against it
    A = np.diag(np.linspace(0.5, 2, 6))
    pairs = on_cluster(client, x, y, t, FullMetric(), validation=0.3, seed=2)
    got = pairs.retrieval(A, "validation", candidates=candidates, seed=4)
    rows = []
    for c in range(4):
        val = validation_mask(c, ROWS, 0.3, 2) & (t[c * ROWS : (c + 1) * ROWS] > 0)
        rows.append(c * ROWS + np.flatnonzero(val))
    for name, metric in (("learned", A), ("plain", None)):
        ranks = brute_force(x, y, metric, 4, candidates, rows)
        s = got[name]
        assert s.queries == len(ranks) == sum(len(r) for r in rows)
        assert s.hits_at_1 == np.sum(ranks == 1)
        assert s.hits_at_10 == np.sum(ranks <= 10)
        assert s.reciprocal_rank == pytest.approx(np.sum(1.0 / ranks), rel=1e-12)
        assert s.rank == np.sum(ranks)
        summary = s.summary()
        assert summary["mrr"] == pytest.approx(np.mean(1.0 / ranks), rel=1e-12)
        assert summary["min_candidates"] == min(candidates, min(len(r) for r in rows))


def test_ties_count_against_the_query():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[1.0, 0.0], [1.0, 0.0]])  # both candidates equal for query 0
    assert block_ranks(x, y, None, np.array([0]), np.array([0, 1])).tolist() == [2]


def test_candidate_blocks_cover_every_query_once_with_its_partner():
    for n, size in ((10, 3), (9, 3), (2, 5), (1000, 64)):
        blocks = candidate_blocks(n, size, 0, 0)
        queries = np.concatenate([q for q, _ in blocks])
        assert sorted(queries.tolist()) == list(range(n))
        for q, c in blocks:
            assert set(q) <= set(c)
            assert len(c) == min(size, n)
