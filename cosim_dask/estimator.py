"""A scikit-learn / metric-learn style estimator over the training loop: ``CosineMetricLearner``.

Small NumPy problems are fitted in this process (no cluster start-up, no per-step scheduling);
large ones, Dask inputs, or a given ``distributed.Client`` go through the cluster. Both run
the same chunk work (:func:`cosim_dask.dist.tasks.chunk_result`) over the same chunks and add the
partials in the same tree order, so the two give the same metric on the same data.

scikit-learn is not a dependency, and importing this module does not import it (scikit-learn
and the SciPy it pulls in take ~0.8 s to import, more than a small fit). The estimator is a
scikit-learn binary classifier by protocol rather than by inheritance: ``get_params`` /
``set_params``, ``__sklearn_tags__`` (a classifier whose input is 3-D pairs, built when
scikit-learn asks for it) and ``__sklearn_clone__``; ``clone``, ``GridSearchCV`` and
``cross_val_score`` with their default (stratified) folds, and ``Pipeline`` work. The CLI and
Dask workers never import this module.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from cosim_dask.core.checks import check_is_fitted, check_pairs, check_targets, is_dask
from cosim_dask.core.forms import FullMetric
from cosim_dask.core.kernel import indexed_similarity, pair_similarity
from cosim_dask.core.negatives import negative_partners
from cosim_dask.core.objective import Objective
from cosim_dask.core.stats import calibrated_threshold, roc_auc
from cosim_dask.data.split import chunk_slices
from cosim_dask.dist.passes import DaskPairs, LocalPairs, persisted_pieces
from cosim_dask.dist.tree import resolve_split_every
from cosim_dask.errors import CosimError, ShapeError
from cosim_dask.fit.config import TrainConfig
from cosim_dask.fit.loop import TrainState, run_solver
from cosim_dask.fit.model import Model, build_model, save_model

logger = logging.getLogger(__name__)

#: NumPy inputs with fewer floats than this are fitted in-process when ``cluster="auto"``:
#: the fit takes views of the caller's pairs (no copy), and with the default solver's few
#: passes it ends before a LocalCluster has started. Measured on 2 cores: 160,000 pairs ×
#: 64 (2e7 floats) fit in 1.7–2.1 s in-process, against ~8 s through a new LocalCluster
#: (start-up, per-step scheduling, shutdown); 6.4e7 floats are 500,000 pairs at d = 64.
IN_PROCESS_MAX_FLOATS = 64_000_000
#: Pairs per chunk for NumPy inputs (Dask inputs keep their own row chunks by default).
DEFAULT_CHUNK_ROWS = 65536
CLUSTER_MODES = ("auto", "never", "always")


# ------------------------------------------------------------------------------- estimator


class _Params:
    """scikit-learn's parameter protocol (``BaseEstimator``'s, without importing it)."""

    @classmethod
    def _get_param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return sorted(p.name for p in signature.parameters.values()
                      if p.name != "self" and p.kind == p.POSITIONAL_OR_KEYWORD)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's parameters by name (``deep`` is accepted for scikit-learn)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any) -> Any:
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default
                    for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items()
                   if not (v is defaults[k] or (type(v) is type(defaults[k]) and v == defaults[k]))]
        return f"{type(self).__name__}({', '.join(changed)})"


class NotFittedError(CosimError, AttributeError):
    """A method that needs a fitted estimator was called before ``fit`` (a ValueError and an
    AttributeError, as scikit-learn's ``NotFittedError``; raised as one of those too when
    scikit-learn has been imported, so that its tools and ``except`` clauses catch it)."""

    def __reduce__(self):  # rebuilt where it lands (the class made for scikit-learn's too)
        return _not_fitted, (str(self),)


_NOT_FITTED: dict[type, type] = {}


def _not_fitted(message: str) -> NotFittedError:
    """The error to raise: ours, and scikit-learn's too if scikit-learn is imported (looked
    up, never imported: a user who catches its error has imported it)."""
    sklearn_exceptions = sys.modules.get("sklearn.exceptions")
    base = getattr(sklearn_exceptions, "NotFittedError", None)
    if not isinstance(base, type):
        return NotFittedError(message)
    if base not in _NOT_FITTED:
        _NOT_FITTED[base] = type("NotFittedError", (NotFittedError, base),
                                 {"__module__": __name__, "__doc__": NotFittedError.__doc__})
    return _NOT_FITTED[base](message)


def _check_fitted(estimator: Any) -> None:
    try:
        check_is_fitted(estimator)
    except CosimError as error:
        raise _not_fitted(str(error)) from None


class CosineMetricLearner(_Params):
    """Learn sim(x, y; A) = xᵀAy / sqrt(xᵀAx · yᵀAy), A ⪰ 0, from labelled pairs.

    A pairs learner in metric-learn's style: ``fit(pairs, y)`` with pairs shaped
    (n_pairs, 2, n_features) and y in {−1, +1} (or {0, 1}, or graded in [−1, 1]).

    With binary labels it is a binary classifier of pairs (similar / different): ``predict``
    returns labels of y's kind and dtype (``classes_``), ``decision_function`` is the learned
    similarity minus ``threshold_``. ``score`` is ROC AUC, as in metric-learn (ranking quality,
    independent of the threshold); ``GridSearchCV`` ranks settings by it unless given another
    ``scoring`` (e.g. ``"accuracy"``). Graded targets make it a similarity regressor: no
    ``classes_``, and ``predict`` says +1.0 / −1.0 at the threshold calibrated on ``y > 0``.

    Parameters
    ----------
    Every training default is :class:`~cosim_dask.fit.config.TrainConfig`'s, the same as
    ``cosim train``'s (whose module says why each was chosen), so this estimator and
    ``cosim train --validation 0`` learn the same A on the same pairs.

    loss : ``"mse"`` (squared error against the targets) or ``"contrastive"``.
    negative_target : mse with binary labels only: the target a label −1 stands for (None:
        0.0, "unrelated": "different" pairs asked to be orthogonal rather than opposite;
        −1.0: opposite). Ignored for graded targets, which are never remapped.
    param : ``"factor"`` (A = MᵀM, M k × d: PSD by construction, no projection) or ``"full"``
        (A itself, projected onto A ⪰ εI after each step).
    rank : k for ``param="factor"`` (None: k = d).
    solver : ``"stream+lbfgs"`` (one streaming pass of mini-batch runs, averaged, then
        L-BFGS until the figures stop improving), ``"lbfgs"``, ``"gd"`` or ``"adam"``
        (mini-batches of ``batch_chunks`` chunks).
    lr : the solver's step size (None: its default).
    max_iter : solver steps at most.
    tol : stop when the relative loss change of a step is below this.
    regularization : λ in λ‖A − I‖²_F, added to the mean loss.
    validation : fraction of pairs held out (seeded per chunk) for a validation score.
    patience : stop after this many steps without a better validation score.
    batch_chunks : chunks per mini-batch for stochastic solvers.
    negatives : K > 0 gives every positive pair K negatives made inside its chunk, by
        pairing its x with the y of other positive pairs of the chunk (seeded; never the
        pair itself), with the target of a label −1: for positive pairs only (``y`` all +1),
        which are refused without it (alone they would fit every similarity to 1).
    chunk_rows : pairs per chunk (None: 65,536 for NumPy inputs, a Dask input's own chunks).
    split_every : fan-in of the reduction tree (None: Dask's ``split_every`` config, or 8).
    client : a ``distributed.Client`` to fit on; always used when given.
    cluster : without a client, ``"auto"`` fits small NumPy inputs in-process and anything
        else on a cluster (the current client if there is one, else a new LocalCluster);
        ``"never"`` always fits in-process (a Dask input is computed into memory);
        ``"always"`` always uses a cluster.
    blas_threads : BLAS threads for an in-process fit (None: leave BLAS alone). One thread
        by default: the GEMMs of an in-process fit are small (2,048-row blocks), and on a
        shared machine multi-threaded BLAS collapsed (digits fit 3.3 s with 2 threads,
        0.85 s with 1, measured).
    random_state : seed of the validation split, mini-batches and the factor's start.
    verbose : log each step (loss, gradient norm) to the ``cosim_dask.estimator`` logger.

    Attributes
    ----------
    metric_ : (d, d) the learned A, scaled to trace d unless ``regularization`` is set (the
        scale changes no similarity), as in a model file.
    components_ : (k, d) L with A = LᵀL (M for the factor form, A^½ for the full form):
        plain cosine similarity of ``transform(X)`` rows equals the learned similarity.
    threshold_ : similarity threshold of :meth:`predict`, calibrated for accuracy on the
        training pairs (with ``negatives``, and their negatives, at the resolution of the
        score histograms; :meth:`calibrate_threshold` and :meth:`set_threshold` change it).
    classes_ : binary labels only: (2,) the labels of y's kind in y's dtype, ``[-1, 1]`` or
        ``[0, 1]`` (both even if y held one of them); ``classes_[1]`` means similar.
    n_iter_ : solver steps taken.
    loss_history_ : (n_iter_ + 1,) training objective at the start and after every step;
        NaN at the start of the default solver with validation rows, whose step 0 reports
        the first pass's validation figures before its training loss is computed.
    history_ : one dict per step (loss, gradient norm, validation AUC, timing; None for a
        figure the step did not compute).
    stop_reason_ : why training stopped.
    fit_backend_ : ``"in-process"`` or ``"cluster"``.
    n_features_in_ : d.
    """

    def __init__(
        self,
        loss: str = TrainConfig.loss,
        negative_target: float | None = TrainConfig.negative_target,
        param: str = TrainConfig.param,
        rank: int | None = TrainConfig.rank,
        solver: str = TrainConfig.solver,
        lr: float | None = TrainConfig.lr,
        max_iter: int = TrainConfig.steps,
        tol: float = TrainConfig.tol,
        regularization: float = TrainConfig.regularization,
        validation: float = TrainConfig.validation,
        patience: int | None = TrainConfig.patience,
        batch_chunks: int | None = TrainConfig.batch_chunks,
        negatives: int = TrainConfig.negatives,
        chunk_rows: int | None = None,
        split_every: int | None = None,
        client: Any = None,
        cluster: str = "auto",
        blas_threads: int | None = 1,
        random_state: int = TrainConfig.seed,
        verbose: bool = False,
    ) -> None:
        self.loss = loss
        self.negative_target = negative_target
        self.param = param
        self.rank = rank
        self.solver = solver
        self.lr = lr
        self.max_iter = max_iter
        self.tol = tol
        self.regularization = regularization
        self.validation = validation
        self.patience = patience
        self.batch_chunks = batch_chunks
        self.negatives = negatives
        self.chunk_rows = chunk_rows
        self.split_every = split_every
        self.client = client
        self.cluster = cluster
        self.blas_threads = blas_threads
        self.random_state = random_state
        self.verbose = verbose

    # -- scikit-learn's protocols

    def set_params(self, **params: Any) -> CosineMetricLearner:
        """Set constructor parameters; an unknown name raises :class:`CosimError`."""
        valid = self._get_param_names()
        for name in params:
            if name not in valid:
                raise CosimError(f"invalid parameter {name!r} for {type(self).__name__}; "
                                 f"valid parameters: {', '.join(valid)}")
        return super().set_params(**params)

    def __sklearn_clone__(self) -> CosineMetricLearner:
        """scikit-learn's ``clone``: the parameters copied, except ``client``, which is shared
        (a live connection to a scheduler, that ``clone``'s deep copy would break)."""
        from sklearn.base import clone  # only scikit-learn calls this

        params = {name: clone(value, safe=False) if name != "client" else value
                  for name, value in self.get_params(deep=False).items()}
        return type(self)(**params)

    def __sklearn_tags__(self) -> Any:
        """A binary classifier of 3-D pairs (n_pairs, 2, n_features) that needs y: the tags
        of ``ClassifierMixin`` and ``BaseEstimator`` with those four changes.

        Only scikit-learn calls this (so only with scikit-learn imported); scikit-learn's
        estimator checks feed 2-D X and therefore skip an estimator that does not take it.
        """
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    transformer_tags=None, regressor_tags=None,
                    classifier_tags=ClassifierTags(multi_class=False),
                    input_tags=InputTags(two_d_array=False, three_d_array=True))

    # -- fitting

    def _config(self, binary: bool = True) -> TrainConfig:
        if self.cluster not in CLUSTER_MODES:
            raise CosimError(f"cluster={self.cluster!r} must be one of: "
                             f"{', '.join(CLUSTER_MODES)}")
        whole = isinstance(self.max_iter, int | np.integer) or (
            isinstance(self.max_iter, float | np.floating) and np.isfinite(self.max_iter)
            and int(self.max_iter) == self.max_iter)
        if not whole or isinstance(self.max_iter, bool):
            raise CosimError(f"max_iter={self.max_iter!r} must be a whole number >= 0")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise CosimError(f"chunk_rows={self.chunk_rows!r} must be >= 1")
        resolve_split_every(self.split_every)
        # Graded targets mean what they say: only binary labels −1 are remapped (a graded
        # target clipped to exactly −1 must stay −1).
        negative = self.negative_target if self.loss == "mse" and binary else None
        config = TrainConfig(
            loss=self.loss, negative_target=negative, param=self.param, rank=self.rank,
            solver=self.solver, lr=self.lr, steps=int(self.max_iter), tol=self.tol,
            regularization=self.regularization, validation=self.validation,
            patience=self.patience, batch_chunks=self.batch_chunks, seed=self.random_state,
            negatives=self.negatives,
        )
        config.check()
        if config.negatives and not binary:
            raise CosimError(f"negatives={config.negatives} needs positive pairs (y all +1, "
                             "or ±1 labels); got graded targets")
        return config

    def fit(self, pairs: Any, y: Any) -> CosineMetricLearner:
        """Learn the metric from labelled pairs.

        Parameters
        ----------
        pairs : (n_pairs, 2, n_features) NumPy or Dask array
        y : (n_pairs,) targets: ±1 labels, {0, 1} labels (0 = different), or graded in [−1, 1].
            Binary labels set ``classes_``; a y holding only 1s reads as ±1 labels (positive
            pairs: fitted with ``negatives``, refused without).

        Returns
        -------
        self
        """
        self._config()  # parameter errors before any work on the data
        if y is None:  # scikit-learn's wording, which its tools recognise
            raise CosimError(f"{type(self).__name__} requires y to be passed, but the target "
                             f"y is None; give one target per pair")
        pairs = check_pairs(pairs)
        n, _, d = pairs.shape
        raw = y if is_dask(y) else np.asarray(y)
        y, binary = check_targets(y, n)
        if binary:
            has_zero = (raw == 0).any()
            classes = _labels(raw.dtype, bool(self._compute(has_zero) if is_dask(raw)
                                              else has_zero))
        config = self._config(binary)
        if binary:
            _check_both_classes(y, config.negatives, self._compute)
        form = config.make_parameterisation()
        params0 = form.initial(d, seed=self.random_state)
        in_process = self.client is None and (
            self.cluster == "never"
            or (self.cluster == "auto" and not is_dask(pairs) and not is_dask(y)
                and pairs.size < IN_PROCESS_MAX_FLOATS)
        )
        if in_process:
            state, solver, self.threshold_ = self._fit_in_process(pairs, y, config, form,
                                                                  params0)
        else:
            state, solver, self.threshold_ = self._fit_on_cluster(pairs, y, config, form,
                                                                  params0)
        self._set_learned(build_model(form, solver.params, config, state,
                                      targets="binary" if binary else "graded"),
                          state, d, "in-process" if in_process else "cluster")
        self.targets_binary_ = binary
        if binary:
            self.classes_ = classes
        elif hasattr(self, "classes_"):  # a refit on graded targets: no classes any more
            del self.classes_
        return self

    def _run(self, source, config: TrainConfig, form, params0, binary: bool):
        objective = Objective(form, source, config.regularization)
        solver = config.make_solver(binary)
        on_step = self._log_step if self.verbose else None
        state = run_solver(objective, solver, params0, config, on_step=on_step,
                           targets_binary=binary)
        return state, solver

    def _fit_in_process(self, pairs, y, config, form, params0):
        if is_dask(pairs):
            pairs = check_pairs(pairs.compute())
        y = np.asarray(y.compute() if is_dask(y) else y, dtype=np.float64)
        x0, x1 = pairs[:, 0, :], pairs[:, 1, :]
        source = LocalPairs(x0, x1, y, form, config.make_loss(_binary(y)),
                            chunk_rows=self.chunk_rows or DEFAULT_CHUNK_ROWS,
                            validation=config.validation, seed=config.seed,
                            batch_chunks=config.batch_chunks, split_every=self.split_every,
                            negatives=config.negatives, positive_weight=config.positive_weight)

        with threadpool_limits(limits=self.blas_threads):
            state, solver = self._run(source, config, form, params0, _binary(y))
            if config.negatives:
                return state, solver, _negatives_threshold(source, form.metric(solver.params))
        scores = pair_similarity(x0, x1, form.metric(solver.params), on_invalid="nan")
        return state, solver, calibrated_threshold(scores, y, "accuracy")

    def _fit_on_cluster(self, pairs, y, config, form, params0):
        client, owned = self._client()
        try:
            x0, x1, t = _dask_columns(pairs, y, self.chunk_rows)
            pieces = persisted_pieces(client, x0, x1, t)
            targets = client.compute(pieces.held[2]).result()
            source = DaskPairs(client, pieces, form, config.make_loss(_binary(targets)),
                               validation=config.validation, seed=config.seed,
                               batch_chunks=config.batch_chunks, split_every=self.split_every,
                               negatives=config.negatives,
                               positive_weight=config.positive_weight)
            targets = client.compute(pieces.held[2]).result()
            state, solver = self._run(source, config, form, params0, _binary(targets))
            if config.negatives:
                threshold = _negatives_threshold(source, form.metric(solver.params))
            else:
                scores = client.compute(_dask_scores(pieces.held[0], pieces.held[1],
                                                     form.metric(solver.params))).result()
                threshold = calibrated_threshold(scores, targets, "accuracy")
        finally:
            if owned is not None:
                # Deferred, as in _client: importing cosim_dask does not load distributed.
                from cosim_dask.dist.cluster import close

                close(*owned)
        return state, solver, threshold

    def _client(self):
        """(client, owned): the given client, the current one, or a new LocalCluster's.

        distributed is imported here, not at the top: ``import cosim_dask`` and in-process
        fits stay free of it (a second of start-up)."""
        if self.client is not None:
            return self.client, None
        try:
            from distributed import get_client

            return get_client(), None
        except ValueError:  # no client in this process
            from cosim_dask.dist.cluster import ClusterConfig, connect

            client, cluster = connect(ClusterConfig())
            return client, (client, cluster)

    def _set_learned(self, model: Model, state: TrainState, d: int, backend: str) -> None:
        # The model file's A and M (one builder owns their scale) and its attributes, kept
        # for to_model.
        self._model = model
        self.metric_ = model.A
        self.components_ = model.components()
        self.n_iter_ = state.step
        self.history_ = state.history
        self.loss_history_ = np.array([np.nan if r["loss"] is None else r["loss"]
                                       for r in state.history], dtype=np.float64)
        self.stop_reason_ = state.stop_reason
        self.fit_backend_ = backend
        self.n_features_in_ = d

    @staticmethod
    def _log_step(record: dict[str, Any]) -> None:
        val = record.get("val_auc")
        loss, grad = record["loss"], record["grad_norm"]  # None: not computed at this step
        logger.info("step %d%s%s%s", record["step"],
                    "" if loss is None else f"  loss {loss:.6g}",
                    "" if grad is None else f"  |grad| {grad:.3g}",
                    "" if val is None else f"  val AUC {val:.4f}")

    # -- using the metric

    def pair_score(self, pairs: Any) -> Any:
        """Learned similarity of every pair: higher means more similar.

        Parameters
        ----------
        pairs : (n_pairs, 2, n_features) NumPy or Dask array

        Returns
        -------
        (n_pairs,) float64 in [−1, 1] (a Dask array for a Dask input); NaN for pairs with a
        zero vector.
        """
        _check_fitted(self)
        pairs = check_pairs(pairs, self.n_features_in_)
        if is_dask(pairs):
            x0, x1, _ = _dask_columns(pairs, None, self.chunk_rows)
            return _dask_scores(x0, x1, self.metric_)
        return pair_similarity(pairs[:, 0, :], pairs[:, 1, :], self.metric_, on_invalid="nan")

    def decision_function(self, pairs: Any) -> Any:
        """Learned similarity minus ``threshold_``: ≥ 0 is predicted similar (``classes_[1]``).

        Returns
        -------
        (n_pairs,) float64 (a Dask array for a Dask input); NaN for pairs with a zero vector.
        """
        return self.pair_score(pairs) - self.threshold_

    def predict(self, pairs: Any) -> Any:
        """Similar (``classes_[1]``) where the learned similarity is ≥ ``threshold_``, else
        different (``classes_[0]``); a pair with a zero vector is predicted different.

        Returns
        -------
        (n_pairs,) labels of the training y's kind and dtype (a Dask array for a Dask input);
        ±1.0 (float64) after a fit on graded targets.
        """
        similar = self.pair_score(pairs) >= self.threshold_
        labels = getattr(self, "classes_", None)
        if labels is None:
            return np.where(similar, 1.0, -1.0)
        return np.where(similar, labels[1], labels[0]).astype(labels.dtype, copy=False)

    def set_threshold(self, threshold: float) -> CosineMetricLearner:
        """Set ``threshold_`` by hand (metric-learn's API); :meth:`fit` calibrates it again.

        Parameters
        ----------
        threshold : similarity threshold, a finite number (similarities lie in [−1, 1])

        Returns
        -------
        self
        """
        _check_fitted(self)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
                or not math.isfinite(threshold):
            raise CosimError(f"threshold={threshold!r} must be a finite number")
        self.threshold_ = float(threshold)
        return self

    def _materialised(self, pairs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """The pairs' similarities and targets, in memory, undefined ones left out. Positive
        pairs only (``y`` all +1) of a model fitted with ``negatives``: with each pair's
        in-chunk negatives (label −1) made as in the fit, so that a score or a threshold
        has both classes to go by."""
        scores = self.pair_score(pairs)
        y, _ = check_targets(y, pairs.shape[0])
        if is_dask(scores):
            scores = self._compute(scores)
        if is_dask(y):
            y = self._compute(y)
        y = np.asarray(y, dtype=np.float64)
        if self.negatives and len(y) and (y > 0).all():
            negative = self._negative_scores(pairs)
            scores, y = np.concatenate([scores, negative]), np.r_[y, -np.ones(len(negative))]
        ok = np.isfinite(scores)
        return scores[ok], y[ok]

    def _negative_scores(self, pairs: Any) -> np.ndarray:
        """Similarities of the pairs' in-chunk negatives: ``negatives`` per pair, chunks of
        ``chunk_rows``, drawn from ``random_state`` as the fit's full passes draw them."""
        pairs = check_pairs(pairs)
        if is_dask(pairs):
            pairs = check_pairs(self._compute(pairs))
        x0, x1 = pairs[:, 0, :], pairs[:, 1, :]
        out = [np.empty(0)]
        with threadpool_limits(limits=self.blas_threads):
            for chunk, rows in enumerate(chunk_slices(len(pairs),
                                                      self.chunk_rows or DEFAULT_CHUNK_ROWS)):
                partners = negative_partners(np.ones(rows.stop - rows.start, bool),
                                             self.negatives, self.random_state, chunk)
                k, i = np.nonzero(partners >= 0)
                out.append(indexed_similarity(x0[rows], x1[rows], self.metric_, i,
                                              partners[k, i]))
        return np.concatenate(out)

    def _compute(self, array):
        return self.client.compute(array).result() if self.client is not None else \
            array.compute()

    def calibrate_threshold(self, pairs: Any, y: Any, strategy: str = "accuracy",
                            min_rate: float | None = None, beta: float = 1.0
                            ) -> CosineMetricLearner:
        """Set ``threshold_`` from labelled pairs (metric-learn's strategies).

        The n similarities are materialised in memory (8 bytes a pair). Positive pairs only
        (``y`` all +1, a model fitted with ``negatives``): calibrated on the pairs and their
        in-chunk negatives, as :meth:`score` scores them.

        Parameters
        ----------
        pairs : (n_pairs, 2, n_features)
        y : (n_pairs,) labels
        strategy : ``"accuracy"``, ``"f_beta"``, ``"max_tpr"`` or ``"max_tnr"``
        """
        scores, y = self._materialised(pairs, y)
        self.threshold_ = calibrated_threshold(scores, y, strategy, min_rate=min_rate,
                                               beta=beta)
        return self

    def score(self, pairs: Any, y: Any) -> float:
        """ROC AUC of the learned similarity for ``y > 0`` (similar) against the rest.

        metric-learn's score for pair learners, kept rather than scikit-learn's classifier
        accuracy: it ranks metrics without depending on ``threshold_``. Pairs whose similarity
        is undefined (a zero vector) are left out. Positive pairs only (``y`` all +1, a
        model fitted with ``negatives``): the AUC of each pair against its in-chunk
        negatives, made as in the fit (``negatives`` per pair, chunks of ``chunk_rows``,
        ``random_state``), so that a search over positive pairs ranks its candidates.
        """
        scores, y = self._materialised(pairs, y)
        return roc_auc(scores, y)

    def score_retrieval(self, pairs: Any, *, candidates: int = 1000, seed: int = 0
                        ) -> dict[str, dict[str, float]]:
        """Retrieval figures of positive pairs, learned metric beside plain cosine.

        Each pair's x is a query whose true partner is its own y, ranked among the y of
        ``candidates`` pairs (a seeded block holding it, cut within chunks of ``chunk_rows``
        pairs; fewer when there are fewer pairs). Ties count against the query.

        Returns
        -------
        ``{"learned": {...}, "plain": {...}}``, each with ``hit_at_1``, ``recall_at_10``,
        ``mrr``, ``mean_rank``, ``queries``, ``candidates`` (mean), ``min_candidates`` and
        ``skipped`` (queries whose own similarity is undefined).
        """
        check_is_fitted(self)
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
            raise CosimError(f"candidates={candidates!r} must be a whole number >= 2")
        pairs = check_pairs(pairs)
        if is_dask(pairs):
            pairs = check_pairs(pairs.compute())
        x0, x1 = pairs[:, 0, :], pairs[:, 1, :]
        source = LocalPairs(x0, x1, np.ones(len(pairs)), FullMetric(), "mse",
                            chunk_rows=self.chunk_rows or DEFAULT_CHUNK_ROWS)
        with threadpool_limits(limits=self.blas_threads):
            stats = source.retrieval(self.metric_, candidates=candidates, seed=seed)
        return {name: stats[name].summary() for name in ("learned", "plain")}

    def transform(self, X: Any) -> Any:
        """Map vectors so that their plain cosine similarity is the learned similarity.

        Parameters
        ----------
        X : (n, n_features) NumPy or Dask array

        Returns
        -------
        (n, k) array ``X @ components_.T`` (k = rank for the factor form, else d)
        """
        _check_fitted(self)
        if not is_dask(X):
            X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ShapeError(f"X must have shape (n, {self.n_features_in_}); got "
                             f"{tuple(X.shape)}")
        return X @ self.components_.T

    def get_metric(self) -> Callable[[np.ndarray, np.ndarray], float]:
        """A function ``(u, v) -> similarity`` of two 1-D vectors under the learned metric."""
        _check_fitted(self)
        A, d = self.metric_.copy(), self.n_features_in_

        def similarity(u: np.ndarray, v: np.ndarray) -> float:
            u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
            if u.shape != (d,) or v.shape != (d,):
                raise ShapeError(f"u and v must have shape ({d},); got {u.shape} and {v.shape}")
            return float(pair_similarity(u[None], v[None], A)[0])

        return similarity

    def get_mahalanobis_matrix(self) -> np.ndarray:
        """The learned A (metric-learn's name)."""
        _check_fitted(self)
        return self.metric_

    def to_model(self) -> Model:
        """The fitted metric as a :class:`~cosim_dask.fit.model.Model` (for ``save_model``):
        the same A, M and typed attributes (settings included) as ``cosim train`` writes,
        with the current ``threshold_``."""
        _check_fitted(self)
        model = self._model
        attrs = {**model.attrs, "threshold": float(self.threshold_)}
        return Model(A=model.A.copy(), M=None if model.M is None else model.M.copy(),
                     attrs=attrs)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the fitted metric as a model file (``cosim evaluate``/``transform`` read it),
        through the same output policy as ``cosim train``: an existing ``path`` is replaced only
        with ``overwrite`` and only when it is a model, never left half-written."""
        save_model(path, self.to_model(), overwrite=overwrite)


# --------------------------------------------------------------------------------- helpers


def _labels(dtype: np.dtype, has_zero: bool) -> np.ndarray:
    """(2,) the labels of binary targets in their dtype: ``[0, 1]`` if they hold a 0 or
    cannot hold −1 (bool, unsigned), else ``[-1, 1]`` (``check_targets`` has checked that
    they are one or the other)."""
    zero_one = has_zero or np.dtype(dtype).kind in "bu"
    return np.array([0 if zero_one else -1, 1]).astype(dtype)


def _check_both_classes(y, negatives: int, compute) -> None:
    """Binary labels of one class alone fit a useless metric (+1 only: every similarity
    pulled to 1; −1 only: to the negative target): a one-line error naming the way out.
    Positive pairs with ``negatives`` have their other class made for them."""
    if is_dask(y):
        import dask.array as da

        lo, hi = compute(da.stack([y.min(), y.max()]))  # one pass over y
    else:
        lo, hi = y.min(), y.max()
    has_pos, has_neg = hi > 0, lo < 0
    if not has_pos:
        raise CosimError("y holds one class only (-1: every pair different), which says "
                         "nothing of what a match looks like; give some pairs labelled +1")
    if not has_neg and not negatives:
        raise CosimError("y holds one class only (+1: positive pairs), which says nothing "
                         "of what a non-match looks like; pass negatives=K (e.g. 4) to "
                         "pair each x with the y of K other pairs of its chunk")


def _negatives_threshold(source, A: np.ndarray) -> float:
    """The accuracy-best threshold of a fit with in-chunk negatives: on the training pairs
    and their negatives (one scoring pass, binned at the score histograms' resolution, 2/8192).
    On the stored pairs alone, all positive, it would fall below every score and ``predict``
    would call every pair similar."""
    return source.score(A, ("train",))["learned/train"].best_threshold()


def _binary(y: np.ndarray) -> bool:
    return bool(np.isin(y, (-1.0, 1.0)).all())


def _dask_columns(pairs, y, chunk_rows: int | None):
    """x, y (n, d) and target (n,) Dask arrays chunked along pairs only (whole rows)."""
    import dask.array as da  # deferred: only Dask inputs and cluster fits need it

    if not is_dask(pairs):
        pairs = da.from_array(pairs, chunks=(chunk_rows or DEFAULT_CHUNK_ROWS, -1, -1))
    elif chunk_rows is not None:
        pairs = pairs.rechunk((chunk_rows, -1, -1))
    else:
        pairs = pairs.rechunk({1: -1, 2: -1})
    x0, x1 = pairs[:, 0, :], pairs[:, 1, :]
    if y is None:
        return x0, x1, None
    rows = pairs.chunks[0]
    t = y.rechunk((rows,)) if is_dask(y) else da.from_array(np.asarray(y, np.float64),
                                                             chunks=(rows,))
    return x0, x1, t.astype(np.float64)


def _dask_scores(x0, x1, A: np.ndarray):
    """Lazy (n,) learned similarities, one task per row chunk."""
    import dask.array as da  # deferred: only Dask inputs need it

    def block(xb, yb, A):
        return pair_similarity(xb, yb, A, on_invalid="nan")

    return da.map_blocks(block, x0, x1, A, drop_axis=1, dtype=np.float64)
