"""The work of a pass's tasks: what one chunk computes, and how a task over several
consecutive chunks adds them up.

One :class:`ChunkSpec` says what every chunk of a pass computes: the training partial on
its training rows, the score statistics of its validation rows, and (evaluation) the
statistics of the learned metric and of plain cosine on the rows of each asked split. A
task reads its chunks (if they are not in memory), computes each, and folds the results
into the nodes of the pass's reduction tree (:class:`cosim_dask.dist.tree.Tree`) that its
chunks alone cover, so the sums do not depend on how the chunks were cut into tasks.

Nothing here knows Dask or the CLI: these functions run inside a worker, or in this
process for in-process training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cosim_dask.core.forms import Parameterisation
from cosim_dask.core.kernel import (
    Partial,
    as_pair_arrays,
    indexed_similarity,
    pair_similarity,
)
from cosim_dask.core.local import (
    LocalFit,
    LocalState,
    MetricSum,
    RunPlan,
    local_steps,
    metric_sum,
)
from cosim_dask.core.losses import Loss
from cosim_dask.core.negatives import NEGATIVE_LABEL, negative_partners
from cosim_dask.core.retrieval import RetrievalStats, candidate_blocks, retrieval_stats
from cosim_dask.core.stats import ScoreStats
from cosim_dask.data.reader import StoreSlice, prefetch, read_group, read_slice
from cosim_dask.data.split import validation_mask
from cosim_dask.dist.tree import Node, Tree

#: Grouping of small chunks into one task: a group holds at most this many bytes of pairs
#: (x, y and target) and the pass keeps at least MIN_TASKS tasks. measured: ~2-5 ms overhead per
#: task, so a store of 10,000 tiny chunks must not become 10,000 tasks per pass.
GROUP_BYTES = 16 * 2**20
MIN_TASKS = 64

#: The rows each evaluation split scores.
SPLITS = ("train", "validation", "all")


@dataclass(frozen=True)
class ChunkSpec:
    """What a chunk task computes, the same for every chunk of a pass.

    ``with_train``: the loss partial (and gradient) on the training rows.
    ``with_validation``: score statistics of the validation rows (of every row when
    ``validation`` is 0) under the metric of the parameters.
    ``splits``: evaluation, with the parameters being the metric A itself: statistics of A
    and of plain cosine (A = I) on the rows of each split (:data:`SPLITS`), keyed
    ``"learned/<split>"`` and ``"plain/<split>"``.
    ``joint``: keep the joint histogram of scores and targets (for Spearman's rho).
    ``negatives``: K negatives per positive training pair, made inside the chunk
    (:mod:`cosim_dask.core.negatives`), drawn from (``seed``, chunk, ``epoch``); the stored
    pairs weigh ``positive_weight`` each, a negative 1. The validation statistics then
    count K negatives per positive validation pair too (partners among the validation
    positives, the same every pass), so that the figures that stop training measure the
    objective it fits: without them a positive-only store's validation loss rewards every
    similarity being 1 and its AUC is undefined. So do the statistics of ``splits`` (a
    training run's final figures and thresholds); ``cosim evaluate``, which knows no
    negatives, scores the stored pairs alone.
    ``retrieval``: evaluation, with the parameters being A: retrieval statistics
    (:mod:`cosim_dask.core.retrieval`) of A and of plain cosine over the positive pairs of
    the rows of ``splits[0]``, among candidate blocks of this size drawn from
    ``retrieval_seed``, keyed ``"learned"`` and ``"plain"``.
    """

    parameterisation: Parameterisation
    loss: Loss
    validation: float = 0.0
    seed: int = 0
    on_invalid: str = "raise"
    with_train: bool = True
    with_validation: bool = False
    joint: bool = False
    splits: tuple[str, ...] = ()
    negatives: int = 0
    positive_weight: int = 1
    epoch: int = 0
    retrieval: int = 0
    retrieval_seed: int = 0


@dataclass
class ChunkResult:
    """What a chunk computed (:class:`ChunkSpec`); adds like its parts."""

    train: Partial | None
    validation: ScoreStats | None
    scores: dict[str, ScoreStats] | None = None
    retrieval: dict[str, RetrievalStats] | None = None

    def __add__(self, other: ChunkResult) -> ChunkResult:
        return ChunkResult(_add(self.train, other.train),
                           _add(self.validation, other.validation),
                           _add(self.scores, other.scores),
                           _add(self.retrieval, other.retrieval))


def _add(a, b):
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        return {key: a[key] + b[key] for key in a}
    return a + b


def chunk_result(x: np.ndarray, y: np.ndarray, t: np.ndarray, params: np.ndarray,
                 spec: ChunkSpec, index: int) -> ChunkResult:
    """The work of chunk ``index`` (its rows in memory): split, then what ``spec`` asks."""
    x, y, t = as_pair_arrays(x, y, t)  # aligned, contiguous: arrays off the wire may not be
    val = validation_mask(index, len(x), spec.validation, spec.seed)
    train = validation = scores = None
    if spec.with_train and spec.negatives:
        # Partners among the positive training rows only: a validation row's y never
        # trains, a labelled negative is no one's positive partner.
        partners = negative_partners(~val & (t > 0), spec.negatives, spec.seed, index,
                                     spec.epoch)
        train = spec.parameterisation.negatives_partial(
            x, y, t, params, spec.loss, partners, positive_weight=spec.positive_weight,
            on_invalid=spec.on_invalid, chunk_id=index, include=~val if val.any() else None)
    elif spec.with_train:
        # A mask rather than x[~val]: no copy of the chunk (16 MiB and more) every step.
        train = spec.parameterisation.chunk_partial(
            x, y, t, params, spec.loss, on_invalid=spec.on_invalid, chunk_id=index,
            include=~val if val.any() else None,
        )
    if spec.retrieval:
        return ChunkResult(None, None, None, _retrieval(x, y, t, val, params, spec, index))
    if spec.with_validation or spec.splits:
        A = spec.parameterisation.metric(params)
    masks = {"train": ~val, "validation": val, "all": np.ones(len(x), bool)}

    def split_partners(split: str) -> np.ndarray | None:
        # With negatives, a split's figures count its positive pairs' in-chunk negatives too
        # (drawn as the full passes draw them, epoch 0: the same every pass).
        return (negative_partners(masks[split] & (t > 0), spec.negatives, spec.seed, index)
                if spec.negatives else None)

    if spec.with_validation:
        split = "validation" if spec.validation > 0 else "all"
        rows = np.flatnonzero(val) if spec.validation > 0 else None
        validation = score_rows(x, y, t, A, spec.loss, spec.joint, rows=rows)
        partners = split_partners(split)
        if partners is not None:
            validation = validation + score_negatives(x, y, A, spec.loss, partners, spec.joint)
    if spec.splits:
        scores = {}
        for split in spec.splits:
            # Each split scores its own rows: a pair's learned similarity can differ in its
            # last bit with the other rows of its BLAS block, and these figures must be the
            # ones the training passes and `cosim evaluate` report.
            rows = None if split == "all" else np.flatnonzero(masks[split])
            partners = split_partners(split)
            for name, metric in (("learned", A), ("plain", None)):
                stats = score_rows(x, y, t, metric, spec.loss, spec.joint, rows=rows)
                if partners is not None:
                    stats = stats + score_negatives(x, y, metric, spec.loss, partners,
                                                    spec.joint)
                scores[f"{name}/{split}"] = stats
    return ChunkResult(train, validation, scores)


def _retrieval(x, y, t, val, params, spec: ChunkSpec, index: int) -> dict[str, RetrievalStats]:
    """Retrieval statistics of the chunk's positive pairs in split ``spec.splits[0]``."""
    split = spec.splits[0] if spec.splits else "all"
    rows = {"train": ~val, "validation": val, "all": np.ones(len(x), bool)}[split]
    queries = np.flatnonzero(rows & (t > 0))
    xq, yq = x[queries], y[queries]
    blocks = candidate_blocks(len(queries), spec.retrieval, spec.retrieval_seed, index)
    A = spec.parameterisation.metric(params)
    return {"learned": retrieval_stats(xq, yq, A, blocks),
            "plain": retrieval_stats(xq, yq, None, blocks)}


def score_rows(x: np.ndarray, y: np.ndarray, t: np.ndarray, A: np.ndarray | None, loss: Loss,
               joint: bool = False, rows: np.ndarray | None = None) -> ScoreStats:
    """Score statistics of the pairs (those of ``rows`` only, when given: the same figures
    as for ``x[rows]``, without the copy) under ``A`` (None: plain cosine); invalid pairs
    and targets are left out."""
    s = pair_similarity(x, y, A, on_invalid="nan", rows=rows)
    if rows is not None:
        t = t[rows]
    ok = np.isfinite(s) & np.isfinite(t)
    s, t = s[ok], t[ok]
    values, _ = loss.pointwise(s, t)
    return ScoreStats.of(s, t, values, joint=joint)


def score_negatives(x: np.ndarray, y: np.ndarray, A: np.ndarray | None, loss: Loss,
                    partners: np.ndarray, joint: bool = False) -> ScoreStats:
    """Score statistics of in-chunk negatives (x_i, y_j), j in ``partners[:, i]`` (−1: none;
    from :func:`~cosim_dask.core.negatives.negative_partners`), each against the label of a
    negative; invalid pairs are left out."""
    k, i = np.nonzero(partners >= 0)
    s = indexed_similarity(x, y, A, i, partners[k, i])
    s = s[np.isfinite(s)]
    t = np.full(len(s), NEGATIVE_LABEL)
    values, _ = loss.pointwise(s, t)
    return ScoreStats.of(s, t, values, joint=joint)


def fold_task(data: list, params: np.ndarray, spec: ChunkSpec, tree: Tree, start: int,
              indices: Sequence[int], ahead: Sequence[StoreSlice] = ()
              ) -> dict[Node, ChunkResult]:
    """Consecutive leaves ``start ..`` of ``tree`` (chunks ``indices`` of the store, given
    as ``data``: store slices to read, or (x, y, target) tuples in memory), folded into the
    largest tree nodes they alone cover (:meth:`Tree.fold`): the very sums a task per chunk
    and the combine tasks above would make.

    ``ahead``: the chunks of a later task, whose reading starts now (:func:`prefetch`).
    """
    prefetch(ahead)
    if data and all(isinstance(p, StoreSlice) for p in data):
        # One read per array for the whole run, into this thread's reused buffers: the
        # chunks are done with when the task returns (nothing in a result points into them).
        data = read_group(data, reuse=True)
    results = (chunk_result(*chunk, params, spec, i)
               for chunk, i in zip(data, indices, strict=True))
    return tree.fold(results, start, start + len(indices))


def node_task(data: list, params: np.ndarray, spec: ChunkSpec, tree: Tree, start: int,
              indices: Sequence[int], ahead: Sequence[StoreSlice] = ()) -> Any:
    """:func:`fold_task` for a run that makes one tree node (one chunk, or an aligned group of
    a power of the fan-in): that node's value."""
    (value,) = fold_task(data, params, spec, tree, start, indices, ahead).values()
    return value


def local_task(data, state: LocalState | np.ndarray, spec: ChunkSpec, fit: LocalFit,
               index: int, ahead: Sequence[StoreSlice] = (), finish: bool = False,
               plan: RunPlan | None = None) -> LocalState | MetricSum:
    """One chunk of a first-pass run (:mod:`cosim_dask.core.local`): Adam steps over the
    training rows of chunk ``index`` (``data``: a store slice to read, or (x, y, target) in
    memory), continuing ``state`` (for a run's first chunk: the start parameters, and
    ``plan`` from :func:`cosim_dask.core.local.plan_run`). With ``finish``, the run's last
    chunk: its fitted metric, for the average.

    Invalid pairs raise as in a full pass (``spec.on_invalid``), naming the first one.
    """
    prefetch(ahead)
    # Into this thread's reused buffers (half the read time: no fresh pages to fault in):
    # the state keeps copies of the mini-batches' results, never the chunk.
    x, y, t = as_pair_arrays(*(read_slice(data, reuse=True) if isinstance(data, StoreSlice)
                               else data))
    if not isinstance(state, LocalState):
        state = LocalState.start(state, plan)
    val = validation_mask(index, len(x), spec.validation, spec.seed)
    include = ~val if val.any() else None
    skipped = state.skipped
    state = local_steps(x, y, t, state, spec.parameterisation, spec.loss, fit, seed=spec.seed,
                        chunk=index, include=include, negatives=spec.negatives,
                        positive_weight=spec.positive_weight)
    if state.skipped > skipped and spec.on_invalid == "raise":
        # The mini-batches skip invalid pairs; the chunk kernel names the first one.
        spec.parameterisation.chunk_partial(x, y, t, state.params, spec.loss, chunk_id=index,
                                            include=include)
    return metric_sum(state, spec.parameterisation) if finish else state


def local_chain_task(data: Sequence, state: LocalState | np.ndarray, spec: ChunkSpec,
                     fit: LocalFit, indices: Sequence[int], ahead: Sequence[StoreSlice] = (),
                     finish: bool = False, plan: RunPlan | None = None
                     ) -> LocalState | MetricSum:
    """:func:`local_task` over consecutive chunks of one run (``data``, ``indices``), in
    order, each starting to read the next (the last, ``ahead``). With ``finish``, the last
    chunk ends the run."""
    for k, (piece, index) in enumerate(zip(data, indices, strict=True)):
        last = k == len(indices) - 1
        later = ahead if last else [p for p in data[k + 1: k + 2] if isinstance(p, StoreSlice)]
        state = local_task(piece, state, spec, fit, index, later, finish and last, plan)
    return state


def chunks_per_task(n_chunks: int, chunk_bytes: int, split_every: int) -> int:
    """Chunks per task: the largest power of ``split_every`` whose group holds at most
    GROUP_BYTES and leaves at least MIN_TASKS tasks (1 for stores of ordinary chunks)."""
    group = 1
    while (group * split_every * chunk_bytes <= GROUP_BYTES
           and n_chunks / (group * split_every) >= MIN_TASKS):
        group *= split_every
    return group
