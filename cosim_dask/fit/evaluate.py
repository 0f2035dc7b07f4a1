"""Out-of-core evaluation of a metric on a pair dataset, beside plain cosine (A = I).

One pass on the cluster: each chunk scores its rows under the learned metric and under the
identity and returns histogram statistics per split; the tree reduction adds them. Retrieval
figures of positive pairs (:func:`retrieval_model`) are one such pass as well.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from distributed import Client

from cosim_dask.core.forms import FullMetric
from cosim_dask.core.losses import Loss
from cosim_dask.core.stats import ScoreStats
from cosim_dask.data.store import PairStore, open_store
from cosim_dask.dist.passes import DaskPairs, Pieces, store_pieces
from cosim_dask.dist.tasks import SPLITS
from cosim_dask.errors import CosimError, ModelError
from cosim_dask.fit.config import TrainConfig
from cosim_dask.fit.model import Model, load_model

#: Candidates per query of retrieval figures (:func:`retrieval_model`).
DEFAULT_CANDIDATES = 1000


def score_pieces(
    client: Client,
    pieces: Pieces,
    A: np.ndarray,
    *,
    loss: Loss | str = "mse",
    validation: float = 0.0,
    seed: int = 0,
    splits: tuple[str, ...] = ("all",),
    joint: bool = False,
    split_every: int | None = None,
    negatives: int = 0,
) -> dict[str, ScoreStats]:
    """ScoreStats keyed ``"learned/<split>"`` and ``"plain/<split>"``: one evaluation pass
    (:meth:`cosim_dask.dist.passes.Pairs.score`); with ``negatives``, each split's positive
    pairs' in-chunk negatives count too (a run trained with them: its final figures)."""
    pairs = DaskPairs(client, pieces, FullMetric(), loss, validation=validation, seed=seed,
                      split_every=split_every, negatives=negatives)
    return pairs.score(A, splits, joint=joint)


def summarize(stats: dict[str, ScoreStats], split: str, *, binary: bool,
              thresholds: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Figures per metric (``learned``, ``plain``) for one split: loss, MSE, AUC, accuracy at
    the given (or best) threshold, Spearman for graded targets."""
    out = {}
    for name in ("learned", "plain"):
        s = stats[f"{name}/{split}"]
        row: dict[str, Any] = {"pairs": s.count, "loss": s.mean_loss, "mse": s.mse}
        if binary:
            threshold = (thresholds or {}).get(name)
            if threshold is None or not math.isfinite(threshold):
                threshold = s.best_threshold()
            row.update(auc=s.auc(), threshold=threshold, accuracy=s.accuracy(threshold))
        if s.joint_hist is not None:
            row["spearman"] = s.spearman()
        out[name] = row
    return out


#: What a table of figures scores, by split: a title that says which rows they are.
SPLIT_TITLES = {"validation": "validation pairs", "train": "training pairs",
                "all": "all pairs"}


def split_title(split: str, validation: float = 0.0) -> str:
    """The title of a table of figures on ``split``'s rows: ``"validation pairs"``,
    ``"training pairs"`` or ``"all pairs"``. With no validation rows (``validation`` 0)
    the training rows are every pair, and the title says so."""
    if split == "train" and not validation:
        return "training pairs (all pairs: no validation rows)"
    return SPLIT_TITLES[split]


def roc_points(stats: ScoreStats, max_points: int = 201) -> dict[str, list[float]]:
    """The ROC curve, thinned to at most ``max_points`` points, for the model file."""
    fpr, tpr = stats.roc()
    keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).astype(int))
    return {"fpr": fpr[keep].round(6).tolist(), "tpr": tpr[keep].round(6).tolist()}


#: In-chunk negatives per pair when evaluating a store of positive pairs with a model
#: trained without them.
EVALUATE_NEGATIVES = 4


def evaluate_model(
    model_path: str | Model, store_path: str, *, client: Client, split: str = "auto",
    split_every: int | None = None,
) -> dict[str, Any]:
    """Figures of a saved model (a path, or one already loaded) on a store, beside plain
    cosine, computed on the cluster. The report's ``"model"`` is the path (None for a
    loaded model).

    ``split="auto"`` uses the validation rows when the store is the one the model was trained
    on (and it held rows out), else every row. Accuracy uses the thresholds calibrated on the
    training rows at training time.

    Positive pairs alone are one class: on a store of them, each pair is scored with
    in-chunk negatives (``"negatives"`` in the report), as many as the model was trained
    with (else :data:`EVALUATE_NEGATIVES`), drawn from its seed: on its training store the
    figures are its training run's final ones.
    """
    model, store, split, fraction = _model_and_rows(model_path, store_path, split)
    settings = model.attrs.get("settings", {})
    binary = store.targets == "binary"
    loss = _model_loss(model.attrs, binary)
    negatives = (int(settings.get("negatives") or 0) or EVALUATE_NEGATIVES
                 if store.positive_only else 0)
    pieces = store_pieces(store.source, store.chunk_slices(), identity=store.fingerprint)
    stats = score_pieces(client, pieces, model.A,
                         loss=loss, validation=fraction, seed=int(settings.get("seed", 0)),
                         splits=(split,), joint=not binary, split_every=split_every,
                         negatives=negatives)
    thresholds = {"learned": model.attrs.get("threshold"),
                  "plain": model.attrs.get("plain_threshold")}
    report = summarize(stats, split, binary=binary, thresholds=thresholds)
    return {"split": split, "model": _shown(model_path), "store": str(store_path),
            "negatives": negatives, **report}


def _model_and_rows(model_path: str | Model, store_path: str, split: str
                    ) -> tuple[Model, PairStore, str, float]:
    """The model, the opened store, the split to score (``"auto"`` resolved) and the
    model's validation share; errors for a split the store cannot give."""
    model = model_path if isinstance(model_path, Model) else load_model(model_path)
    store = open_store(store_path)
    if store.d != model.d:
        raise ModelError(
            f"the model has d={model.d} but the store {store_path!r} has d={store.d}"
        )
    settings = model.attrs.get("settings", {})
    fraction = float(settings.get("validation") or 0.0)
    same_store = model.attrs.get("store_fingerprint") == store.fingerprint
    if split == "auto":
        split = "validation" if same_store and fraction > 0 else "all"
    if split not in SPLITS:
        raise CosimError(f"split={split!r} must be one of auto, {', '.join(SPLITS)}")
    if split in ("train", "validation") and not same_store:
        raise CosimError(
            f"split={split!r} applies only to the model's training store; use {{split}}",
            params={"split": "all"})
    if split == "validation" and fraction == 0:
        raise CosimError("the model was trained without validation rows; use {split}",
                         params={"split": "all"})
    return model, store, split, fraction


def retrieval_model(
    model_path: str | Model, store_path: str, *, client: Client, split: str = "auto",
    candidates: int = DEFAULT_CANDIDATES, seed: int = 0, split_every: int | None = None,
) -> dict[str, Any]:
    """Retrieval figures of a saved model on the positive pairs of a store, beside plain
    cosine, computed chunk by chunk on the cluster (:mod:`cosim_dask.core.retrieval`).

    Each query x_i is ranked against the y of ``candidates`` positive pairs of its chunk
    (a seeded block that holds its own partner; fewer when the chunk's split has fewer
    positive pairs): hit rate@1, recall@10, MRR and mean rank; ties count against the
    query. ``split`` chooses the rows as for :func:`evaluate_model`.
    """
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 2:
        raise CosimError(f"candidates={candidates!r} must be a whole number >= 2")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise CosimError(f"seed={seed!r} must be a whole number in [0, 2**32)")
    model, store, split, fraction = _model_and_rows(model_path, store_path, split)
    settings = model.attrs.get("settings", {})
    if store.targets != "binary":
        raise CosimError(f"retrieval needs positive pairs; {store_path!r} has graded targets")
    pieces = store_pieces(store.source, store.chunk_slices(), identity=store.fingerprint)
    pairs = DaskPairs(client, pieces, FullMetric(), validation=fraction,
                      seed=int(settings.get("seed", 0)), split_every=split_every)
    stats = pairs.retrieval(model.A, split, candidates=candidates, seed=seed)
    return {"split": split, "model": _shown(model_path), "store": str(store_path),
            "candidates": candidates, "seed": seed,
            **{name: stats[name].summary() for name in ("learned", "plain")}}


def _shown(model_path: str | Model) -> str | None:
    """The model's path for a report; a model already loaded has none to give."""
    return None if isinstance(model_path, Model) else str(model_path)


def _model_loss(attrs: dict, binary: bool) -> Loss:
    """The loss the model was trained with, rebuilt from its settings."""
    return TrainConfig.from_settings(attrs.get("settings", {})).make_loss(binary)
