"""CosineMetricLearner as a scikit-learn estimator: tags, labels of y's kind, thresholds, the
real model-selection tools on digits pairs, a Pipeline, the estimator checks that apply, and
the estimator without scikit-learn installed."""

import functools
import os
import subprocess
import sys
import textwrap
import time
import warnings

import dask.array as da
import numpy as np
import pytest
from sklearn.base import clone, is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold, check_cv, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils import get_tags
from sklearn.utils.estimator_checks import estimator_checks_generator

from cosim_dask import CosineMetricLearner, pair_similarity
from cosim_dask.data.synthetic import synthetic_pairs
from cosim_dask.errors import CosimError, ShapeError

#: Few solver steps: these tests are about the scikit-learn contract, not the fit's quality.
FAST = {"max_iter": 8}


@pytest.fixture(scope="module")
def pairs_y():
    x, y, t, _ = synthetic_pairs(400, 5, rank=2, seed=11, targets="binary", noise=0.05)
    return np.stack([x, y], axis=1).astype(np.float64), t.astype(np.int64)


@pytest.fixture(scope="module")
def digits():
    """Digits pairs as pipelines/digits.py builds them (balanced, same-class +1), sorted by
    label the way a naive pair list is: unstratified folds would each hold one class."""
    from sklearn.datasets import load_digits

    X, labels = load_digits(return_X_y=True)
    X = X / 16.0
    rng = np.random.default_rng(0)
    i = rng.integers(0, len(X), 4000)
    j = rng.integers(0, len(X), 4000)
    same, diff = np.flatnonzero(labels[i] == labels[j])[:150], \
        np.flatnonzero(labels[i] != labels[j])[:150]
    index = np.concatenate([np.stack([i[same], j[same]], 1), np.stack([i[diff], j[diff]], 1)])
    y = np.repeat([1, -1], [len(same), len(diff)])
    return X, index, y


@pytest.fixture(scope="module")
def default_cv(digits):
    """5-fold CV scores (the default CV: stratified) of the default settings on digits pairs;
    the solver steps are cut to FAST's for time, in every setting compared with them."""
    X, index, y = digits
    return cross_val_score(CosineMetricLearner(**FAST), X[index], y)


def test_is_a_scikit_learn_binary_classifier_of_3d_pairs():
    model = CosineMetricLearner(rank=3)
    assert is_classifier(model)  # by protocol: scikit-learn is not imported by ours
    tags = get_tags(model)
    assert tags.estimator_type == "classifier" and not tags.classifier_tags.multi_class
    assert tags.input_tags.three_d_array and not tags.input_tags.two_d_array
    assert tags.target_tags.required
    twin = clone(model)
    assert twin is not model and twin.get_params() == model.get_params()
    # Default CV of a classifier on binary labels is stratified.
    assert isinstance(check_cv(5, np.array([1, -1] * 5), classifier=is_classifier(model)),
                      StratifiedKFold)


def test_clone_shares_the_client_and_copies_the_rest(client):
    model = CosineMetricLearner(client=client, rank=2, **FAST)
    twin = clone(model)
    assert twin.client is client and twin.get_params() == model.get_params()
    assert not hasattr(twin, "metric_")


@pytest.mark.parametrize("kind,dtype", [((-1, 1), np.int64), ((-1, 1), np.float32),
                                        ((0, 1), np.int32), ((0, 1), bool)])
def test_predict_returns_labels_of_ys_kind_and_dtype(pairs_y, kind, dtype):
    pairs, y = pairs_y
    labels = np.where(y > 0, kind[1], kind[0]).astype(dtype)
    model = CosineMetricLearner(**FAST).fit(pairs, labels)
    assert model.classes_.dtype == labels.dtype
    np.testing.assert_array_equal(model.classes_, np.array(kind).astype(dtype))
    predicted = model.predict(pairs)
    assert predicted.dtype == labels.dtype and set(predicted.tolist()) == set(kind)
    decision = model.decision_function(pairs)
    np.testing.assert_allclose(decision, model.pair_score(pairs) - model.threshold_)
    np.testing.assert_array_equal(predicted, model.classes_[(decision >= 0).astype(int)])
    assert np.mean(predicted == labels) > 0.8
    # The same for Dask pairs: a lazy array of the same labels.
    lazy = model.predict(da.from_array(pairs, chunks=(150, 2, 5)))
    assert isinstance(lazy, da.Array) and lazy.dtype == labels.dtype
    np.testing.assert_array_equal(lazy.compute(), predicted)


@pytest.mark.parametrize("y,classes", [(np.ones(40, np.uint8), [0, 1]),
                                       (np.ones(40, bool), [False, True]), (np.ones(40), [-1, 1])])
def test_a_y_of_one_label_keeps_both_labels_of_its_kind(pairs_y, y, classes):
    # Positive pairs alone need negatives made for them (see the next test).
    model = CosineMetricLearner(max_iter=2, negatives=2).fit(pairs_y[0][:40], y)
    assert model.classes_.dtype == y.dtype and model.classes_.tolist() == classes
    assert set(model.predict(pairs_y[0]).tolist()) <= set(classes)


def test_positive_pairs_alone_are_refused_without_negatives(pairs_y):
    """All +1 and no negatives would fit every similarity to 1, all "different" every one
    to the negative target: a one-line error naming the way out (scikit-learn's check for
    one-label fits looks for "class" in it); with negatives, predict tells the pairs from
    random pairings."""
    pairs = pairs_y[0][pairs_y[1] > 0]
    with pytest.raises(CosimError, match="one class only .* pass negatives=K"):
        CosineMetricLearner(max_iter=2).fit(pairs, np.ones(len(pairs)))
    for y in (np.zeros(len(pairs), int), -np.ones(len(pairs))):
        with pytest.raises(CosimError, match="one class only .* labelled \\+1"):
            CosineMetricLearner(max_iter=2, negatives=2).fit(pairs, y)
        with pytest.raises(CosimError, match="one class only"):
            CosineMetricLearner(max_iter=2).fit(da.from_array(pairs), da.from_array(y))
    model = CosineMetricLearner(negatives=4).fit(pairs, np.ones(len(pairs)))
    # score on positive pairs: each against its in-chunk negatives, as a labelled set of the
    # pairs and those negatives written out would score.
    from cosim_dask.core.negatives import negative_partners

    partners = negative_partners(np.ones(len(pairs), bool), 4, model.random_state, 0)
    k, i = np.nonzero(partners >= 0)
    written = np.concatenate([pairs, np.stack([pairs[i, 0], pairs[partners[k, i], 1]], 1)])
    labels = np.r_[np.ones(len(pairs)), -np.ones(len(i))]
    auc = model.score(pairs, np.ones(len(pairs)))
    assert 0.6 < auc == pytest.approx(model.score(written, labels), abs=1e-12)
    # calibrate_threshold likewise: on positives alone it would fall below every score.
    for strategy in ("accuracy", "f_beta"):
        on_pairs = model.calibrate_threshold(pairs, np.ones(len(pairs)), strategy).threshold_
        on_written = model.calibrate_threshold(written, labels, strategy).threshold_
        assert on_pairs == on_written and np.min(model.pair_score(pairs)) < on_pairs
    shuffled = np.stack([pairs[:, 0], pairs[np.random.default_rng(0).permutation(len(pairs)),
                                             1]], axis=1)
    assert np.mean(model.predict(pairs) > 0) > np.mean(model.predict(shuffled) > 0) + 0.2


def test_graded_targets_have_no_classes_and_predict_plus_minus_one(pairs_y):
    pairs, y = pairs_y
    model = CosineMetricLearner(**FAST).fit(pairs, y)
    assert hasattr(model, "classes_")
    graded = np.clip(pair_similarity(pairs[:, 0], pairs[:, 1]) + 0.1 * y, -1, 1)
    model.fit(pairs, graded)  # a refit on graded targets drops the classes
    assert not hasattr(model, "classes_")
    predicted = model.predict(pairs)
    assert predicted.dtype == np.float64 and set(predicted.tolist()) <= {-1.0, 1.0}


def test_set_threshold_overrides_and_fit_recalibrates(pairs_y):
    pairs, y = pairs_y
    model = CosineMetricLearner(**FAST).fit(pairs, y)
    calibrated = model.threshold_
    assert model.set_threshold(-1.0) is model and model.threshold_ == -1.0
    assert (model.predict(pairs) == 1).all()  # every similarity is >= -1
    model.set_threshold(1.5)
    assert (model.predict(pairs) == -1).all()
    assert model.fit(pairs, y).threshold_ == pytest.approx(calibrated)
    for bad in (float("nan"), "0.5", True):
        with pytest.raises(CosimError, match="must be a finite number"):
            model.set_threshold(bad)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        CosineMetricLearner().set_threshold(0.2)


def test_cross_val_score_default_cv_is_stratified_on_label_sorted_pairs(digits, default_cv):
    X, index, y = digits
    pairs = X[index]
    assert (np.diff(y) <= 0).all()  # sorted: plain KFold folds would hold one class
    assert len(default_cv) == 5 and np.isfinite(default_cv).all() and default_cv.min() > 0.7
    accuracy = cross_val_score(CosineMetricLearner(**FAST), pairs, y, scoring="accuracy")
    assert np.isfinite(accuracy).all() and accuracy.min() > 0.6


def test_grid_search_on_digits_pairs_matches_or_beats_the_defaults(digits, default_cv):
    """The grid holds the default settings, so its best CV score is at least theirs."""
    X, index, y = digits
    pairs = X[index]
    grid = GridSearchCV(CosineMetricLearner(**FAST),
                        [{"rank": [None, 16]}, {"negative_target": [-1.0]}])
    grid.fit(pairs, y)
    assert grid.n_splits_ == 5 and np.isfinite(grid.cv_results_["mean_test_score"]).all()
    assert grid.best_score_ >= default_cv.mean() - 1e-12
    row = grid.cv_results_["params"].index({"rank": None})
    assert grid.cv_results_["mean_test_score"][row] == pytest.approx(default_cv.mean())
    assert grid.predict(pairs).dtype == y.dtype
    assert grid.best_estimator_.get_params()["rank"] == grid.best_params_["rank"]


def test_pipeline_looks_up_index_pairs_in_a_table(digits):
    """A FunctionTransformer turns (n, 2) row indices into (n, 2, d) pairs: metric-learn's
    preprocessor, as a scikit-learn step."""
    X, index, y = digits
    lookup = FunctionTransformer(functools.partial(np.take, X, axis=0))
    pipe = Pipeline([("lookup", lookup), ("metric", CosineMetricLearner(**FAST))])
    assert is_classifier(pipe)
    pipe.fit(index, y)
    direct = CosineMetricLearner(**FAST).fit(X[index], y)
    np.testing.assert_array_equal(pipe.predict(index), direct.predict(X[index]))
    assert pipe.score(index, y) == pytest.approx(direct.score(X[index], y))
    assert np.isfinite(cross_val_score(pipe, index, y, cv=3)).all()


# --------------------------------------------------------------- scikit-learn's estimator checks


class AnchoredPairs(CosineMetricLearner):
    """Test-only view for scikit-learn's estimator checks, which feed 2-D X only (and skip an
    estimator whose tags say it takes 3-D pairs): row x of X becomes the pair (x, ones), so
    the learned similarity is x's cosine to a fixed direction under A. Works for any number
    of features; not a convention of the package."""

    @staticmethod
    def _pairs(X):
        X = np.asarray(X)
        if X.ndim != 2:
            raise ShapeError(f"X must be 2-D; got shape {X.shape}")
        return np.stack([X, np.ones_like(X)], axis=1)

    def fit(self, X, y):
        return super().fit(self._pairs(X), y)

    def pair_score(self, X):  # predict, decision_function and score go through it
        return super().pair_score(self._pairs(X))

    @property
    def transform(self):  # maps vectors, not pairs: not a transformer of X
        raise AttributeError("transform")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array, tags.input_tags.three_d_array = True, False
        return tags


LABELS = "labels {k, k + 1} other than ±1 / {0, 1}: which one means similar would be a guess"
WORDING = "the estimator's own one-line error (it names pairs), not scikit-learn's wording"
SPARSE = "pairs are dense 3-D arrays: no scipy sparse input"
#: The checks that do not apply to a pairs learner, and why. Every other check passes.
NOT_APPLICABLE = {
    "check_estimators_dtypes": LABELS,
    "check_classifier_data_not_an_array": LABELS,
    "check_fit2d_1feature": LABELS,
    "check_classifiers_classes": "string labels: targets are numbers (±1, {0, 1} or graded)",
    "check_classifier_not_supporting_multiclass": "multiclass y: " + WORDING,
    "check_classifiers_regression_target": "a continuous y in [-1, 1] is a graded target "
                                           "(similarity regression), not an error",
    "check_supervised_y_2d": "an (n, 1) y is read as 1-D without a DataConversionWarning",
    "check_n_features_in_after_fitting": "a feature-count mismatch: " + WORDING,
    "check_complex_data": "complex input: " + WORDING,
    "check_dtype_object": "object input: " + WORDING,
    "check_estimators_empty_data_messages": "0 features: " + WORDING,
    "check_fit2d_predict1d": "1-D input: " + WORDING,
    "check_estimator_sparse_tag": SPARSE,
    "check_estimator_sparse_array": SPARSE,
    "check_estimator_sparse_matrix": SPARSE,
}


#: Checks scikit-learn itself skips unless the environment asks for them (array API input
#: needs SCIPY_ARRAY_API=1 set before SciPy is imported).
NOT_RUN_HERE = {"check_array_api_input"}


def check_name(check) -> str:
    return (check.func if isinstance(check, functools.partial) else check).__name__


#: scikit-learn warns that an estimator not derived from its BaseEstimator "might lead to
#: unexpected behavior": ours follows the protocol instead (importing scikit-learn costs
#: ~0.8 s), and these checks are what shows that the protocol is enough.
NOT_DERIVED = "ignore:Estimator AnchoredPairs does not inherit:UserWarning"


def all_checks(estimator):
    with warnings.catch_warnings():
        warnings.filterwarnings(*NOT_DERIVED.split(":", 2)[:2], category=UserWarning)
        return list(estimator_checks_generator(estimator))


#: Every check scikit-learn has for this estimator, but those that do not apply (each listed
#: above with why): they are not run at all, rather than run to fail.
CHECKS = [(estimator, check) for estimator, check in all_checks(AnchoredPairs(max_iter=20))
          if check_name(check) not in NOT_APPLICABLE.keys() | NOT_RUN_HERE]


def test_every_check_not_applicable_is_one_scikit_learn_has():
    names = {check_name(check) for _, check in all_checks(AnchoredPairs())}
    assert NOT_APPLICABLE.keys() <= names
    assert len(CHECKS) >= 35


@pytest.mark.filterwarnings(NOT_DERIVED)
@pytest.mark.parametrize(("estimator", "check"), CHECKS,
                         ids=[check_name(check) for _, check in CHECKS])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# -------------------------------------------------------------------- without scikit-learn


def run_python(script: str) -> None:
    """Run ``script`` in a fresh Python with this checkout importable; it must print ok."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_importing_the_estimator_does_not_import_scikit_learn():
    """scikit-learn (and SciPy) cost ~0.8 s to import, more than a small fit: ours does not
    import it; once the user has, an unfitted call raises scikit-learn's NotFittedError."""
    script = textwrap.dedent("""
        import pickle
        import sys
        from cosim_dask import CosineMetricLearner
        from cosim_dask.estimator import NotFittedError as Ours
        assert not [m for m in sys.modules if m.split(".")[0] in ("sklearn", "scipy")]
        from sklearn.exceptions import NotFittedError
        for call in (lambda m: m.predict([[[0.0], [1.0]]]), lambda m: m.set_threshold(0.1)):
            try:
                call(CosineMetricLearner())
            except NotFittedError as error:
                assert isinstance(error, Ours) and isinstance(error, ValueError)
                again = pickle.loads(pickle.dumps(error))  # as from a joblib worker
                assert isinstance(again, NotFittedError) and str(again) == str(error)
        print("ok")
    """)
    run_python(script)


def test_works_without_scikit_learn(tmp_path):
    """A Python where scikit-learn cannot be imported: the estimator still fits, predicts and
    keeps the parameter protocol."""
    script = textwrap.dedent("""
        import sys
        sys.modules["sklearn"] = None  # any `import sklearn...` now raises ImportError
        import numpy as np
        from cosim_dask import CosineMetricLearner
        assert [c.__name__ for c in CosineMetricLearner.__mro__] == \\
            ["CosineMetricLearner", "_Params", "object"]
        rng = np.random.default_rng(0)
        pairs = rng.standard_normal((60, 2, 4))
        y = np.where(rng.random(60) < 0.5, 1, -1)
        model = CosineMetricLearner(max_iter=3).set_params(rank=2)
        assert model.get_params()["rank"] == 2 and repr(model) == \\
            "CosineMetricLearner(max_iter=3, rank=2)"
        model.fit(pairs, y)
        assert model.predict(pairs).dtype == y.dtype and list(model.classes_) == [-1, 1]
        assert model.set_threshold(-1.0).predict(pairs).min() == 1
        assert "sklearn" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
        print("ok")
    """)
    started = time.perf_counter()
    run_python(script)
    assert time.perf_counter() - started < 60
