"""Retrieval from positive pairs only: two views of one item, and is the true partner first?

scikit-learn's digits images (1,797 × 8 × 8) give a natural positive relation: the left half
of an image (x, 32 pixels) and its right half (y, 32 pixels) are two views of one item. The
images (not the pairs) are split 70/30, seeded; each view is centred by its training mean.
Three metrics are compared on the held-out pairs, each query's true partner ranked among the
right halves of ``--candidates`` held-out images (`cosim evaluate --retrieval`):

- plain cosine (A = I);
- learned from the positive pairs alone, with ``--negatives K`` in-chunk negatives
  (`cosim train --negatives K` on a store without targets);
- learned from labelled pairs: the same positives plus K stored random negatives per positive
  (label −1), the way negatives are materialised without this option.

Every stage is the library call behind a `cosim` command: ingest, train (on a Dask
cluster, from the stores) and the retrieval pass. ``--store`` is where the pair stores go:
a directory or an fsspec URL (an object store), so the same run can read its data from
there.

    python pipelines/retrieval.py                      # the full run (about a minute)
    python pipelines/retrieval.py --quick              # CI-sized
    python pipelines/retrieval.py --store s3://bucket/retrieval
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cosim_dask.data.ingest import ingest_arrays
from cosim_dask.dist.cluster import ClusterConfig, close, connect
from cosim_dask.fit.config import TrainConfig
from cosim_dask.fit.evaluate import retrieval_model
from cosim_dask.fit.train import train_store
from cosim_dask.outputs import is_url


@dataclass
class Row:
    method: str
    fit_pairs: int
    hit_at_1: float
    recall_at_10: float
    mrr: float
    mean_rank: float
    fit_seconds: float
    steps: int = 0


def views(quick: bool = False, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(left, right) halves of the train and test images, centred by the train means."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    if quick:
        images = images[:600]
    left = images[:, :, :4].reshape(len(images), -1)
    right = images[:, :, 4:].reshape(len(images), -1)
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(0.7 * len(images))
    train, test = order[:cut], order[cut:]
    mu_left, mu_right = left[train].mean(axis=0), right[train].mean(axis=0)
    return {name: (left[rows] - mu_left, right[rows] - mu_right)
            for name, rows in (("train", train), ("test", test))}


def labelled_pairs(x: np.ndarray, y: np.ndarray, k: int, seed: int):
    """The positives plus ``k`` stored negatives per positive: x_i with a random other y."""
    rng = np.random.default_rng(seed)
    n = len(x)
    partners = [(np.arange(n) + rng.integers(1, n, size=n)) % n for _ in range(k)]
    xs = np.concatenate([x] * (k + 1))
    ys = np.concatenate([y] + [y[p] for p in partners])
    t = np.concatenate([np.ones(n)] + [-np.ones(n)] * k)
    return xs, ys, t


def _join(prefix: str, name: str) -> str:
    return f"{prefix.rstrip('/')}/{name}" if is_url(prefix) else str(Path(prefix) / name)


def run(store: str, out: Path, *, client, quick: bool = False, negatives: int = 4,
        candidates: int = 500, steps: int = 50, seed: int = 0) -> list[Row]:
    """Ingest, train both ways and rank: the rows of the table."""
    data = views(quick, seed)
    (x, y), (xt, yt) = data["train"], data["test"]
    if not is_url(store):
        Path(store).mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    positive, labelled, test = (_join(store, f"{name}.zarr")
                                for name in ("train-positive", "train-labelled", "test"))
    ingest_arrays(positive, x, y, None, overwrite=True)
    ingest_arrays(labelled, *labelled_pairs(x, y, negatives, seed), overwrite=True)
    ingest_arrays(test, xt, yt, None, overwrite=True)

    rows: list[Row] = []
    plain = None
    for method, source, config in (
            (f"positive pairs, --negatives {negatives}", positive,
             TrainConfig(negatives=negatives, steps=steps, seed=seed)),
            (f"labelled pairs (1 : {negatives} stored)", labelled,
             TrainConfig(steps=steps, seed=seed))):
        model = out / f"model-{len(rows)}.zarr"
        result = train_store(source, str(model), config, client=client, overwrite=True,
                             dashboard=False)
        report = retrieval_model(str(model), test, client=client, candidates=candidates,
                                 seed=seed)
        plain = report["plain"]
        fit_pairs = len(x) * (negatives + 1)
        rows.append(_row(method, report["learned"], fit_pairs, result.seconds,
                         result.state.step))
    rows.insert(0, _row("plain cosine (A = I)", plain, 0, 0.0, 0))
    return rows


def _row(method: str, figures: dict[str, Any], fit_pairs: int, seconds: float,
         steps: int) -> Row:
    return Row(method, fit_pairs, figures["hit_at_1"], figures["recall_at_10"], figures["mrr"],
               figures["mean_rank"], seconds, steps)


def render(rows: list[Row], queries: int, candidates: int) -> str:
    lines = [f"{queries:,} held-out queries, {candidates:,} candidates each", "",
             "| metric | fit pairs | hit@1 | recall@10 | MRR | mean rank | fit (s) | steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.method} | {r.fit_pairs:,} | {r.hit_at_1:.4f} | {r.recall_at_10:.4f} | "
              f"{r.mrr:.4f} | {r.mean_rank:.1f} | {r.fit_seconds:.2f} | {r.steps} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None, client=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None,
                        help="directory or URL for the pair stores (default: a temporary "
                             "directory)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the models (default: a temporary directory)")
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="600 images, CI-sized")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or str(Path(tmp) / "stores")
        out = args.out or Path(tmp) / "models"
        owned = None
        if client is None:
            client, cluster = connect(ClusterConfig(workers=args.workers))
            owned = (client, cluster)
        try:
            started = time.perf_counter()
            rows = run(store, out, client=client, quick=args.quick, negatives=args.negatives,
                       candidates=args.candidates, steps=args.steps, seed=args.seed)
        finally:
            if owned:
                close(*owned)
    queries = len(views(args.quick, args.seed)["test"][0])
    print(render(rows, queries, min(args.candidates, queries)))
    print(f"\n(whole run {time.perf_counter() - started:.1f} s)")
    return rows


if __name__ == "__main__":
    main()
