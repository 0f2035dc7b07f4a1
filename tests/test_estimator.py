"""CosineMetricLearner: the metric-learn pairs API, in-process vs cluster fits, bad input."""

import tracemalloc

import dask.array as da
import numpy as np
import pytest

from cosim_dask import CosineMetricLearner, pair_similarity
from cosim_dask.core.stats import calibrated_threshold, roc_auc
from cosim_dask.data.synthetic import synthetic_pairs
from cosim_dask.errors import CosimError


def pairs_of(n, d, *, targets="binary", seed=0, rank=2, noise=0.05):
    x, y, t, A_star = synthetic_pairs(n, d, rank=rank, seed=seed, targets=targets, noise=noise)
    return np.stack([x, y], axis=1).astype(np.float64), t.astype(np.float64), A_star


def cosine(a, b):
    return float(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def binary():
    return pairs_of(3000, 6, seed=1)


@pytest.fixture(scope="module")
def fitted(binary):
    pairs, y, _ = binary
    return CosineMetricLearner(max_iter=30).fit(pairs[:2000], y[:2000])


def test_fit_returns_self_with_learned_attributes(binary):
    pairs, y, _ = binary
    model = CosineMetricLearner(max_iter=5)
    assert model.fit(pairs, y) is model
    d = pairs.shape[2]
    assert model.metric_.shape == (d, d) and model.components_.shape[1] == d
    np.testing.assert_allclose(model.components_.T @ model.components_, model.metric_,
                               atol=1e-10)
    assert model.n_iter_ <= 5 and len(model.loss_history_) == model.n_iter_ + 1
    assert model.fit_backend_ == "in-process" and model.n_features_in_ == d
    assert -1.0 <= model.threshold_ <= 1.0


def test_learned_beats_plain_cosine_on_held_out_pairs(binary, fitted):
    pairs, y, _ = binary
    test, y_test = pairs[2000:], y[2000:]
    plain = roc_auc(pair_similarity(test[:, 0], test[:, 1]), y_test)
    assert fitted.score(test, y_test) > plain + 0.05
    predicted = fitted.predict(test)
    assert set(np.unique(predicted)) <= {-1.0, 1.0}
    assert np.mean(predicted == y_test) > 0.8


def test_scores_agree_across_methods(binary, fitted):
    pairs, _, _ = binary
    s = fitted.pair_score(pairs[:50])
    np.testing.assert_array_equal(fitted.decision_function(pairs[:50]), s - fitted.threshold_)
    np.testing.assert_allclose(s, pair_similarity(pairs[:50, 0], pairs[:50, 1], fitted.metric_))
    metric = fitted.get_metric()
    assert metric(pairs[3, 0], pairs[3, 1]) == pytest.approx(s[3], abs=1e-12)
    # Plain cosine of the transformed vectors is the learned similarity.
    u, v = fitted.transform(pairs[:50, 0]), fitted.transform(pairs[:50, 1])
    plain = np.sum(u * v, 1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
    np.testing.assert_allclose(plain, s, atol=1e-10)


def test_recovers_hidden_metric_up_to_scale_with_graded_targets():
    pairs, t, A_star = pairs_of(6000, 8, targets="graded", rank=3, noise=0.01, seed=3)
    model = CosineMetricLearner(max_iter=80).fit(pairs, t)
    assert model.targets_binary_ is False
    assert cosine(model.metric_, A_star) >= 0.99


def test_zero_one_labels_mean_the_same_as_plus_minus_one(binary):
    pairs, y, _ = binary
    a = CosineMetricLearner(max_iter=5).fit(pairs[:1000], y[:1000])
    b = CosineMetricLearner(max_iter=5).fit(pairs[:1000], (y[:1000] > 0).astype(int))
    np.testing.assert_array_equal(a.metric_, b.metric_)
    assert b.targets_binary_


def test_negative_target_changes_the_fit_for_binary_labels(binary):
    pairs, y, _ = binary
    a = CosineMetricLearner(max_iter=5, negative_target=0.0).fit(pairs[:1000], y[:1000])
    b = CosineMetricLearner(max_iter=5, negative_target=-1.0).fit(pairs[:1000], y[:1000])
    assert not np.allclose(a.metric_, b.metric_)


def test_validation_and_patience_in_process(binary):
    pairs, y, _ = binary
    model = CosineMetricLearner(max_iter=30, validation=0.2, patience=2, chunk_rows=500)
    model.fit(pairs, y)
    assert all(r["val_auc"] is not None for r in model.history_)
    assert model.n_iter_ < 30 or "validation" not in model.stop_reason_


@pytest.mark.parametrize("param,rank", [("full", None), ("factor", 3)])
def test_in_process_and_cluster_fits_agree(binary, client, param, rank):
    pairs, y, _ = binary
    settings = dict(param=param, rank=rank, max_iter=8, chunk_rows=700, split_every=2,
                    validation=0.1)
    local = CosineMetricLearner(cluster="never", **settings).fit(pairs, y)
    remote = CosineMetricLearner(client=client, **settings).fit(pairs, y)
    lazy = da.from_array(pairs, chunks=(700, 2, 6))
    from_dask = CosineMetricLearner(client=client, **{**settings, "chunk_rows": None})
    from_dask.fit(lazy, da.from_array(y, chunks=700))
    lazy_scores = from_dask.pair_score(lazy)
    assert isinstance(lazy_scores, da.Array)
    np.testing.assert_allclose(client.compute(lazy_scores).result(),
                               from_dask.pair_score(pairs))
    assert local.fit_backend_ == "in-process" and remote.fit_backend_ == "cluster"
    assert local.n_iter_ == remote.n_iter_ == from_dask.n_iter_
    np.testing.assert_allclose(remote.metric_, local.metric_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(from_dask.metric_, local.metric_, rtol=1e-10, atol=1e-12)
    assert remote.threshold_ == pytest.approx(local.threshold_, abs=1e-12)


def test_auto_fits_small_numpy_in_process_without_a_client(binary):
    from distributed import get_client

    pairs, y, _ = binary
    assert CosineMetricLearner(max_iter=2).fit(pairs, y).fit_backend_ == "in-process"
    with pytest.raises(ValueError):
        get_client()  # no cluster was started behind the user's back


def test_get_params_set_params_and_clone():
    model = CosineMetricLearner(rank=4, param="factor", regularization=0.1)
    params = model.get_params()
    assert params["rank"] == 4 and params["regularization"] == 0.1 and "client" in params
    assert model.set_params(max_iter=7) is model and model.max_iter == 7
    with pytest.raises(CosimError, match="invalid parameter 'nope'"):
        model.set_params(nope=1)
    assert "rank=4" in repr(model) and "max_iter=7" in repr(model)
    import sklearn.base as base
    twin = base.clone(model)
    assert twin is not model and twin.get_params() == model.get_params()


def test_not_fitted_raises():
    with pytest.raises(CosimError, match="not fitted yet"):
        CosineMetricLearner().predict(np.ones((2, 2, 3)))


GOOD_PAIRS = np.random.default_rng(0).standard_normal((10, 2, 3))
GOOD_Y = np.where(np.arange(10) % 2 == 0, 1.0, -1.0)
NAN_PAIRS = GOOD_PAIRS.copy()
NAN_PAIRS[4, 1, 2] = np.nan


@pytest.mark.parametrize("pairs,y,kwargs,message", [
    (np.ones((10, 3)), GOOD_Y, {}, r"shape \(n_pairs, 2, n_features\); got \(10, 3\)"),
    (np.ones((10, 3, 4)), GOOD_Y, {}, r"got \(10, 3, 4\)"),
    (np.ones((0, 2, 4)), GOOD_Y[:0], {}, "at least one pair"),
    (NAN_PAIRS, GOOD_Y, {}, r"NaN or Inf values \(first at pair 4\)"),
    (GOOD_PAIRS.astype(str), GOOD_Y, {}, "real numbers"),
    (GOOD_PAIRS, GOOD_Y[:9], {}, "9 targets but there are 10 pairs"),
    (GOOD_PAIRS, GOOD_Y * 2, {}, r"must be in \[-1, 1\]"),
    (GOOD_PAIRS, np.where(GOOD_Y > 0, np.nan, -1.0), {}, "NaN or Inf"),
    (GOOD_PAIRS, GOOD_Y[:, None].repeat(2, 1), {}, "1-D"),
    (GOOD_PAIRS, GOOD_Y, {"solver": "sgdx"}, "unknown solver 'sgdx'"),
    (GOOD_PAIRS, GOOD_Y, {"loss": "hinge"}, "unknown loss 'hinge'"),
    (GOOD_PAIRS, GOOD_Y, {"cluster": "maybe"}, "cluster='maybe'"),
    (GOOD_PAIRS, GOOD_Y, {"param": "factor", "rank": 9}, "rank=9"),
    (GOOD_PAIRS, GOOD_Y, {"validation": 1.5}, "validation=1.5"),
    # The numbers TrainConfig.check bounds, the same checks as the CLI's.
    (GOOD_PAIRS, GOOD_Y, {"lr": float("inf")}, "lr=inf must be a finite number"),
    (GOOD_PAIRS, GOOD_Y, {"max_iter": float("inf")}, "max_iter=inf"),
    (GOOD_PAIRS, GOOD_Y, {"max_iter": 10**20}, "10,000,000"),
    (GOOD_PAIRS, GOOD_Y, {"random_state": -1}, "seed=-1"),
    (GOOD_PAIRS, GOOD_Y, {"tol": float("nan")}, "tol=nan"),
    (GOOD_PAIRS, GOOD_Y, {"regularization": float("inf")}, "regularization=inf"),
    # A diverging solver is reported as such, not as invalid pairs.
    (GOOD_PAIRS, GOOD_Y, {"solver": "gd", "lr": 1e30}, "diverged at step 1.*lr"),
    (GOOD_PAIRS, GOOD_Y, {"solver": "adam", "lr": 1e30}, "diverged at step 1.*lr"),
])
def test_bad_input_is_one_line_cosim_error(pairs, y, kwargs, message):
    with pytest.raises(CosimError, match=message) as info:
        CosineMetricLearner(**{"max_iter": 1, **kwargs}).fit(pairs, y)
    assert "\n" not in str(info.value)


def test_bad_input_after_fit(fitted):
    with pytest.raises(CosimError, match="5 features but the estimator was fitted with 6"):
        fitted.pair_score(np.ones((3, 2, 5)))
    with pytest.raises(CosimError, match=r"X must have shape \(n, 6\)"):
        fitted.transform(np.ones((3, 5)))
    with pytest.raises(CosimError, match="unknown strategy"):
        fitted.calibrate_threshold(np.ones((4, 2, 6)), np.array([1, -1, 1, -1]), "best")


def brute_force_best_accuracy(scores, y):
    candidates = np.concatenate([scores, [scores.max() + 1]])
    return max(np.mean(np.where(scores >= c, 1, -1) == y) for c in candidates)


def test_accuracy_threshold_is_optimal():
    rng = np.random.default_rng(5)
    y = np.where(rng.random(300) < 0.4, 1.0, -1.0)
    scores = np.round(0.3 * y + rng.standard_normal(300), 1)  # ties, like real scores
    threshold = calibrated_threshold(scores, y)
    accuracy = np.mean(np.where(scores >= threshold, 1, -1) == y)
    assert accuracy == pytest.approx(brute_force_best_accuracy(scores, y))


@pytest.mark.parametrize("strategy,min_rate", [("max_tpr", 0.8), ("max_tnr", 0.9)])
def test_rate_strategies_respect_the_minimum(strategy, min_rate):
    rng = np.random.default_rng(6)
    y = np.where(rng.random(400) < 0.5, 1.0, -1.0)
    scores = 0.5 * y + rng.standard_normal(400)
    threshold = calibrated_threshold(scores, y, strategy, min_rate=min_rate)
    pred = scores >= threshold
    tpr, tnr = np.mean(pred[y > 0]), np.mean(~pred[y < 0])
    assert (tnr if strategy == "max_tpr" else tpr) >= min_rate


def test_roc_auc_counts_ordered_pairs():
    rng = np.random.default_rng(7)
    y = np.where(rng.random(200) < 0.5, 1.0, -1.0)
    scores = np.round(rng.standard_normal(200) + 0.5 * y, 1)
    pos, neg = scores[y > 0], scores[y < 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(scores, y) == pytest.approx(wins / (len(pos) * len(neg)), rel=1e-12)


def test_in_process_fit_makes_no_full_copy_of_the_pairs():
    # The caller's pairs are the fit's only copy: chunks are views of them (rows two vectors
    # apart go to BLAS as they are), the NaN check and the final scores go by blocks. Beyond
    # the pairs, the fit may hold per-pair scalars (targets, scores, masks) and a few chunks
    # of work buffers; a copy of x and y alone would double the memory.
    n, d, chunk_rows = 50_000, 64, 4096
    rng = np.random.default_rng(3)
    pairs = rng.standard_normal((n, 2, d), dtype=np.float32)
    y = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    chunk_bytes = chunk_rows * 2 * d * 4
    tracemalloc.start()
    try:
        CosineMetricLearner(max_iter=0, chunk_rows=chunk_rows, cluster="never").fit(pairs, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    bound = 4 * chunk_bytes + 40 * n
    assert peak <= bound, (peak, bound, pairs.nbytes)
    assert bound < 0.6 * pairs.nbytes  # the test could see a copy of x and y


def test_positive_pairs_with_negatives_rank_their_partners_better_than_plain_cosine():
    """negatives=K fits on positive pairs alone (y all +1); score_retrieval ranks the
    partners of held-out pairs, beside plain cosine."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1200, 6))
    y = np.concatenate([3 * x[:, :2], 4 * rng.standard_normal((1200, 4))], axis=1)
    pairs = np.stack([x, y], axis=1)
    model = CosineMetricLearner(negatives=3, max_iter=10, cluster="never").fit(
        pairs[:800], np.ones(800))
    assert model._model.attrs["settings"]["negatives"] == 3
    figures = model.score_retrieval(pairs[800:], candidates=100)
    learned, plain = figures["learned"], figures["plain"]
    assert learned["queries"] == plain["queries"] == 400
    assert learned["min_candidates"] == 100
    assert learned["mrr"] > plain["mrr"] + 0.1
    assert learned["hit_at_1"] > plain["hit_at_1"]
    with pytest.raises(CosimError, match="needs positive pairs"):
        CosineMetricLearner(negatives=1).fit(pairs[:10], np.linspace(-1, 1, 10))
