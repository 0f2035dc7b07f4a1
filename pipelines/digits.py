"""Real data: learn a cosine metric on scikit-learn's digits images and compare it with plain
cosine similarity and, where metric-learn is installed, its pair learners ITML and MMC.

The samples (not the pairs) are split into train and test, stratified by class, so no image
is in both; same-class (+1) and different-class (−1) pairs are then drawn within each split,
balanced and seeded. Every method is fitted on train pairs, its accuracy threshold calibrated
on train pairs, and scored on the held-out test pairs.

    python pipelines/digits.py            # the full run (about 3 minutes with metric-learn)
    python pipelines/digits.py --quick    # CI-sized, seconds
    python pipelines/digits.py --sweep    # the evidence for the estimator's defaults
    python pipelines/digits.py --via-store  # the learned row via cosim ingest, train, evaluate

Needs scikit-learn (for the data); metric-learn is optional and gets small compatibility
shims here for scikit-learn >= 1.8 (the package itself never imports either). ``--via-store``
writes Parquet pair lists, so it needs pyarrow (``pip install 'cosim-dask[parquet]'``).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cosim_dask import CosineMetricLearner, pair_similarity
from cosim_dask.core.stats import calibrated_threshold, roc_auc


@dataclass
class Row:
    method: str
    fit_pairs: int
    auc: float
    accuracy: float
    fit_seconds: float
    note: str = ""


@dataclass
class Sizes:
    train_pairs: int  # per class (same / different), so twice this many in all
    test_pairs: int
    itml_pairs: int  # ITML/MMC fit on a subsample of the train pairs (they are slow)
    mmc_pairs: int
    mmc_max_iter: int


FULL = Sizes(train_pairs=15_000, test_pairs=10_000, itml_pairs=5_000, mmc_pairs=200,
             mmc_max_iter=20)
QUICK = Sizes(train_pairs=2_000, test_pairs=2_000, itml_pairs=1_000, mmc_pairs=100,
              mmc_max_iter=5)


def sample_pair_index(labels: np.ndarray, n_per_class: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labelled pairs of samples: ``n_per_class`` same-label (+1) pairs, as many
    different-label (−1) pairs, shuffled.

    Returns
    -------
    index : (2 n_per_class, 2) int, rows of the samples; y : (2 n_per_class,) ±1
    """
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    first = rng.integers(0, len(labels), size=4 * n_per_class)
    same, diff = [], []
    for i in first:
        # A random partner from the same class (not i itself) or from another class.
        if len(same) < n_per_class and len(same) <= len(diff):
            members = by_class[labels[i]]
            j = members[rng.integers(len(members))]
            if j != i:
                same.append((i, j))
        elif len(diff) < n_per_class:
            j = rng.integers(len(labels))
            if labels[j] != labels[i]:
                diff.append((i, j))
        if len(same) == len(diff) == n_per_class:
            break
    index = np.array(same + diff)
    y = np.concatenate([np.ones(len(same)), -np.ones(len(diff))])
    order = rng.permutation(len(y))
    return index[order], y[order]


def digits_pairs(sizes: Sizes, seed: int = 0, test_size: float = 0.3) -> dict[str, Any]:
    """Train and test pairs from a class-stratified split of the digits samples.

    ``train`` and ``test`` are ``(pairs, y)``; ``table`` is every image (1,797 × 64) and
    ``train_index`` / ``test_index`` the same pairs as (n, 2) rows of it, for a pair list.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, labels = load_digits(return_X_y=True)
    X = X / 16.0  # pixels in [0, 1]; cosine does not care, ITML's bounds are scale-aware anyway
    idx_train, idx_test = train_test_split(np.arange(len(X)), test_size=test_size,
                                           stratify=labels, random_state=seed)
    assert not set(idx_train) & set(idx_test)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"table": X, "n_train_samples": len(idx_train),
                           "n_test_samples": len(idx_test)}
    for split, rows, n_per_class in (("train", idx_train, sizes.train_pairs),
                                     ("test", idx_test, sizes.test_pairs // 2)):
        index, y = sample_pair_index(labels[rows], n_per_class, rng)
        index = rows[index]  # rows of the whole table
        out[split] = (np.stack([X[index[:, 0]], X[index[:, 1]]], axis=1), y)
        out[f"{split}_index"] = index
    return out


def _row(method, fit_pairs, seconds, test_scores, y_test, threshold, note="") -> Row:
    accuracy = float(np.mean(np.where(test_scores >= threshold, 1.0, -1.0) == y_test))
    return Row(method, fit_pairs, roc_auc(test_scores, y_test), accuracy, seconds, note)


def plain_cosine(data) -> Row:
    (p_tr, y_tr), (p_te, y_te) = data["train"], data["test"]
    started = time.perf_counter()
    threshold = calibrated_threshold(pair_similarity(p_tr[:, 0], p_tr[:, 1]), y_tr)
    seconds = time.perf_counter() - started
    return _row("plain cosine (A = I)", 0, seconds,
                pair_similarity(p_te[:, 0], p_te[:, 1]), y_te, threshold)


def learned(data, **params) -> tuple[Row, CosineMetricLearner]:
    (p_tr, y_tr), (p_te, y_te) = data["train"], data["test"]
    model = CosineMetricLearner(**params)
    started = time.perf_counter()
    model.fit(p_tr, y_tr)
    seconds = time.perf_counter() - started
    note = f"{model.n_iter_} steps, {model.fit_backend_}"
    row = _row("CosineMetricLearner" + (f" {params}" if params else " (defaults)"), len(y_tr),
               seconds, model.pair_score(p_te), y_te, model.threshold_, note)
    return row, model


#: The cluster of the via-store row: the README's LocalCluster of 2 single-thread workers.
CLUSTER_ARGS = ("--workers", "2", "--threads-per-worker", "1")


def cluster_args() -> tuple[str, ...]:
    """:data:`CLUSTER_ARGS`, or none when a scheduler is named in the environment
    (``DASK_SCHEDULER_ADDRESS``): cosim then runs on that cluster, and refuses options that
    only shape a LocalCluster."""
    return () if os.environ.get("DASK_SCHEDULER_ADDRESS") else CLUSTER_ARGS


#: Train on every train pair, as the other rows do (`cosim train` holds 10% out by default).
TRAIN_ARGS = ("--validation", "0")


def cosim(*args: object) -> str:
    """Run ``cosim ARGS`` as a user would (``python -m cosim_dask``, a subprocess); its stdout.

    A failing command raises ``RuntimeError`` with the command and its one-line error.
    """
    argv = [str(a) for a in args]
    proc = subprocess.run([sys.executable, "-m", "cosim_dask", *argv], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        said = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"`cosim {shlex.join(argv)}` exited {proc.returncode}: {said}")
    return proc.stdout


def via_store(data) -> Row:
    """The learned metric through the out-of-core path: the images as an embedding table
    (``.npy``) and each split's pairs as a Parquet pair list, ``cosim ingest`` into two pair
    stores, ``cosim train`` on a LocalCluster, ``cosim evaluate --split all`` on the test store.

    The fit time is that of ingesting the train pairs plus training (each a fresh process,
    training with its cluster's start-up), as a user would wait for them.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cosim_dask.fit.model import load_model

    (_, y_tr), (_, y_te) = data["train"], data["test"]
    with tempfile.TemporaryDirectory(prefix="cosim-digits-") as tmp:
        folder = Path(tmp)
        table = folder / "digits.npy"
        np.save(table, data["table"])
        for split in ("train", "test"):
            index, y = data[f"{split}_index"], data[split][1]
            pq.write_table(pa.table({"i": index[:, 0], "j": index[:, 1], "target": y}),
                           folder / f"{split}-pairs.parquet")

        def ingest(split: str) -> Path:
            store = folder / f"{split}.zarr"
            # The targets are ±1: binary as they are (no --zero-is-negative, which is for 0/1).
            cosim("ingest", store, "--embeddings", table, "--pairs",
                  folder / f"{split}-pairs.parquet", "--targets", "binary")
            return store

        model = folder / "model.zarr"
        started = time.perf_counter()
        cosim("train", ingest("train"), "--out", model, *TRAIN_ARGS, *cluster_args())
        seconds = time.perf_counter() - started
        report = json.loads(cosim("evaluate", model, ingest("test"), "--split", "all",
                                  "--json", *cluster_args()))
        attrs = load_model(model).attrs
    learned = report["learned"]
    if learned["pairs"] != len(y_te):
        raise RuntimeError(f"cosim evaluate scored {learned['pairs']:,} of {len(y_te):,} "
                           "test pairs")
    note = (f"{attrs['steps']} steps in {attrs['train_seconds']:.2f} s; time: ingest + train, "
            "2 workers")
    return Row("cosim train (via store)", len(y_tr), learned["auc"], learned["accuracy"],
               seconds, note)


def metric_learn_module():
    """metric-learn, patched for scikit-learn >= 1.8, or None when it is not installed.

    metric-learn 0.7.0 passes ``force_all_finite`` (renamed ``ensure_all_finite`` in
    scikit-learn 1.6, removed in 1.8) and calls the deprecated ``stable_cumsum``.
    """
    try:
        import metric_learn
        import metric_learn._util as util
        import metric_learn.base_metric as base
        from sklearn.utils.validation import check_array
    except ImportError:
        return None
    if "force_all_finite" not in inspect.signature(check_array).parameters:
        def renamed(f):
            @functools.wraps(f)
            def wrapper(*args, **kwargs):
                if "force_all_finite" in kwargs:
                    kwargs["ensure_all_finite"] = kwargs.pop("force_all_finite")
                return f(*args, **kwargs)
            return wrapper

        if not getattr(util.check_array, "_cosim_shim", False):
            util.check_array, util.check_X_y = renamed(util.check_array), renamed(util.check_X_y)
            util.check_array._cosim_shim = True
        base.stable_cumsum = lambda a, axis=None: np.cumsum(a, axis=axis, dtype=np.float64)
    return metric_learn


def metric_learn_rows(data, sizes: Sizes, seed: int = 0) -> list[Row]:
    ml = metric_learn_module()
    if ml is None:
        return []
    (p_tr, y_tr), (p_te, y_te) = data["train"], data["test"]
    rows = []
    for name, make, n, note in (
        ("metric-learn ITML", lambda: ml.ITML(random_state=seed), sizes.itml_pairs, ""),
        ("metric-learn MMC", lambda: ml.MMC(random_state=seed, max_iter=sizes.mmc_max_iter),
         sizes.mmc_pairs, f"max_iter={sizes.mmc_max_iter}"),
    ):
        n = min(n, len(y_tr))
        model = make()
        started = time.perf_counter()
        model.fit(p_tr[:n], y_tr[:n])  # the pairs are shuffled: a prefix is a random subsample
        seconds = time.perf_counter() - started
        # metric-learn's own threshold is calibrated on its (subsampled) train pairs; we
        # calibrate on all train pairs like the others.
        threshold = calibrated_threshold(model.decision_function(p_tr), y_tr)
        subsample = f"subsample of {n:,} train pairs" if n < len(y_tr) else ""
        rows.append(_row(name, n, seconds, model.decision_function(p_te), y_te, threshold,
                         ", ".join(s for s in (subsample, note) if s)))
    return rows


def run(quick: bool = False, seed: int = 0, baselines: bool = True, store: bool = False,
        **params: Any) -> list[Row]:
    """Every method on the same pairs; returns the table's rows (plain cosine first, then the
    learned metric: the in-memory estimator, or with ``store`` :func:`via_store`)."""
    if store and params:
        raise ValueError(f"the via-store row trains with cosim train's options, not {params}")
    sizes = QUICK if quick else FULL
    data = digits_pairs(sizes, seed)
    rows = [plain_cosine(data), via_store(data) if store else learned(data, **params)[0]]
    if baselines:
        rows += metric_learn_rows(data, sizes, seed)
    return rows


#: The settings compared when choosing the estimator's defaults (``--sweep``).
SWEEP: list[dict[str, Any]] = [
    {},
    {"param": "full"},
    {"param": "full", "negative_target": -1.0},
    {"param": "full", "loss": "contrastive"},
    {"param": "full", "regularization": 1e-2},
    {"param": "full", "solver": "gd"},
    {"negative_target": -1.0},
    {"loss": "contrastive"},
    {"regularization": 1e-3},
    {"rank": 16},
    {"max_iter": 100},
    {"tol": 1e-4},
]


def sweep(quick: bool = False, seed: int = 0) -> list[Row]:
    """The learner under each of :data:`SWEEP`'s settings, on the same pairs."""
    data = digits_pairs(QUICK if quick else FULL, seed)
    return [plain_cosine(data)] + [learned(data, **params)[0] for params in SWEEP]


def render(rows: list[Row]) -> str:
    lines = ["| method | fit pairs | test AUC | test accuracy | fit time (s) | note |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.fit_pairs:,} | {r.auc:.4f} | {r.accuracy:.4f} | "
                     f"{r.fit_seconds:.2f} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, CI-sized run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip metric-learn's learners even when installed")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true",
                      help="compare the learner's candidate default settings instead")
    mode.add_argument("--via-store", action="store_true",
                      help="learn through pair stores: cosim ingest, train (LocalCluster, "
                      "2 workers), evaluate, instead of the in-memory estimator")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    print(f"digits: {2 * sizes.train_pairs:,} train pairs, {sizes.test_pairs:,} test pairs "
          f"(samples split 70/30, stratified; seed {args.seed})")
    if args.sweep:
        print(render(sweep(args.quick, args.seed)))
    else:
        print(render(run(args.quick, args.seed, not args.no_baselines, args.via_store)))


if __name__ == "__main__":
    main()
