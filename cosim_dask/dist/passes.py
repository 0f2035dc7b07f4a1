"""One distributed evaluation: a task per chunk on the worker that holds or reads it, then a
tree reduction of the partials; only the root's sums reach the driver.

Nothing here knows the CLI. The NumPy work is :mod:`cosim_dask.core.kernel`; this module decides
where it runs and how the results add up.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask
import numpy as np

from cosim_dask.core.forms import Parameterisation
from cosim_dask.core.kernel import Partial, as_pair_arrays
from cosim_dask.core.losses import Loss, get_loss
from cosim_dask.core.objective import sample_chunks, split_rows
from cosim_dask.core.stats import ScoreStats
from cosim_dask.data.reader import StoreSlice, prefetch, read_group, read_slice
from cosim_dask.data.store import validation_mask
from cosim_dask.dist.waits import guarded, lost_scheduler_error, scheduler_gone
from cosim_dask.errors import ANY, ClusterError, WorkerLostError

if TYPE_CHECKING:  # distributed costs ~1 s to import; in-process fits never need it
    from distributed import Client

logger = logging.getLogger(__name__)

#: Pairs per task in memory; partials stay small whatever the chunk size.
DEFAULT_SPLIT_EVERY = 8
#: Grouping of small chunks into one task: a group holds at most this many bytes of pairs
#: (x, y and target) and the pass keeps at least MIN_TASKS tasks. measured: ~2-5 ms overhead per
#: task, so a store of 10,000 tiny chunks must not become 10,000 tasks per pass.
GROUP_BYTES = 16 * 2**20
MIN_TASKS = 64
#: Passes repeated when a worker holding the scattered parameters died with them, or died
#: while they were being sent.
PASS_ATTEMPTS = 3


@dataclass(frozen=True)
class ChunkSpec:
    """What a chunk task computes, the same for every chunk of a pass."""

    parameterisation: Parameterisation
    loss: Loss
    validation: float = 0.0
    seed: int = 0
    on_invalid: str = "raise"
    with_train: bool = True
    with_validation: bool = False
    joint: bool = False


@dataclass
class ChunkResult:
    """A chunk's train partial and validation statistics; adds like its parts."""

    train: Partial | None
    validation: ScoreStats | None

    def __add__(self, other: ChunkResult) -> ChunkResult:
        return ChunkResult(_add(self.train, other.train), _add(self.validation, other.validation))


def _add(a, b):
    if a is None:
        return b
    return a if b is None else a + b


def chunk_task(data, params: np.ndarray, spec: ChunkSpec, index: int,
               ahead: Sequence[StoreSlice] = ()) -> ChunkResult:
    """The work of one chunk: read (if needed), split, partial on train rows, stats on the rest.

    ``ahead``: the chunks of a later task, whose reading starts now (:func:`prefetch`).
    """
    prefetch(ahead)
    # A streamed chunk is read into this thread's reused buffers: it is done with when the
    # task returns (nothing in a ChunkResult points into it).
    x, y, t = read_slice(data, reuse=True) if isinstance(data, StoreSlice) else data
    x, y, t = as_pair_arrays(x, y, t)  # aligned, contiguous: arrays off the wire may not be
    val = validation_mask(index, len(x), spec.validation, spec.seed)
    train = None
    if spec.with_train:
        # A mask rather than x[~val]: no copy of the chunk (16 MiB and more) every step.
        train = spec.parameterisation.chunk_partial(
            x, y, t, params, spec.loss, on_invalid=spec.on_invalid, chunk_id=index,
            include=~val if val.any() else None,
        )
    stats = None
    if spec.with_validation:
        rows = val if spec.validation > 0 else np.ones(len(x), bool)
        stats = score_rows(x[rows], y[rows], t[rows], spec.parameterisation.metric(params),
                           spec.loss, spec.joint)
    return ChunkResult(train, stats)


def group_task(data: list, params: np.ndarray, spec: ChunkSpec, indices: list[int],
               split_every: int, ahead: Sequence[StoreSlice] = ()) -> ChunkResult:
    """Several consecutive chunks in one task, summed in the very tree the scheduler would
    build over them one task each (``len(data)`` is a power of ``split_every``): the result is
    bitwise the same as with one task per chunk."""
    prefetch(ahead)
    if all(isinstance(p, StoreSlice) for p in data):
        data = read_group(data, reuse=True)
    results = [chunk_task(p, params, spec, i) for p, i in zip(data, indices, strict=True)]
    while len(results) > 1:
        results = [combine_results(*results[j : j + split_every])
                   for j in range(0, len(results), split_every)]
    return results[0]


def chunks_per_task(n_chunks: int, chunk_bytes: int, split_every: int) -> int:
    """Chunks per task: the largest power of ``split_every`` whose group holds at most
    GROUP_BYTES and leaves at least MIN_TASKS tasks (1 for stores of ordinary chunks)."""
    group = 1
    while (group * split_every * chunk_bytes <= GROUP_BYTES
           and n_chunks / (group * split_every) >= MIN_TASKS):
        group *= split_every
    return group


def score_rows(x, y, t, A, loss: Loss, joint: bool = False) -> ScoreStats:
    from cosim_dask.core.kernel import pair_similarity

    s = pair_similarity(x, y, A, on_invalid="nan")
    ok = np.isfinite(s) & np.isfinite(t)
    s, t = s[ok], t[ok]
    values, _ = loss.pointwise(s, t)
    return ScoreStats.of(s, t, values, joint=joint)


def combine_results(*results: ChunkResult) -> ChunkResult:
    total = results[0]
    for r in results[1:]:
        total = total + r
    return total


def tree_depth(n_leaves: int, split_every: int) -> int:
    """Levels of combine tasks above the leaves: ⌈log_k(n)⌉ (0 for a single leaf)."""
    return 0 if n_leaves <= 1 else math.ceil(math.log(n_leaves) / math.log(split_every) - 1e-12)


def tree_reduce(leaves: list, split_every: int, token: str, combine=None):
    """Sum delayed leaves k at a time, level by level: a tree, never a chain.

    Groups are consecutive and the order within each is fixed, so the float64 sums — and
    the result — do not depend on which worker finishes first.
    """
    if split_every < 2:
        raise ValueError(f"split_every={split_every} must be at least 2")
    combine = combine or combine_results
    level = 0
    while len(leaves) > 1:
        level += 1
        leaves = [
            dask.delayed(combine)(
                *leaves[j : j + split_every], dask_key_name=f"cosim-combine-{token}-{level}-{j}"
            )
            for j in range(0, len(leaves), split_every)
        ]
    return leaves[0]


def fold_run(results: Iterable, start: int, stop: int, split_every: int, n_leaves: int,
             combine: Callable = combine_results) -> dict[tuple[int, int], Any]:
    """Fold the leaf results of ``start .. stop − 1`` (in order) into every node of the tree
    :func:`tree_reduce` builds over ``n_leaves`` leaves whose leaves all lie in the run; return
    the largest such nodes, keyed ``(level, index)``.

    Each node adds its children as ``tree_reduce`` does (``combine(*children)``, in order),
    and is formed as soon as its last child is, so at most ``split_every`` results per level
    are held at once.
    """
    k = split_every
    done: dict[tuple[int, int], Any] = {}
    for i, value in zip(range(start, stop), results, strict=True):
        level, j = 0, i
        done[0, i] = value
        while True:
            width = -(-n_leaves // k**level)  # nodes at this level
            parent = j // k
            last = min(parent * k + k, width) - 1
            covers = (parent * k ** (level + 1), min((parent + 1) * k ** (level + 1), n_leaves))
            if width == 1 or j != last or covers[0] < start or covers[1] > stop:
                break
            children = [done.pop((level, c)) for c in range(parent * k, last + 1)]
            done[level + 1, parent] = combine(*children)
            level, j = level + 1, parent
    return done


def stitch_tree(nodes: dict[tuple[int, int], Any], split_every: int, n_leaves: int,
                make_node: Callable) -> Any:
    """The root of :func:`tree_reduce`'s tree over ``n_leaves`` leaves, given some of its
    nodes (``(level, index)`` → value, every leaf under one of them): the missing nodes are
    ``make_node(level, index, children)``."""
    k = split_every

    def node(level: int, j: int):
        if (level, j) in nodes:
            return nodes[level, j]
        width = -(-n_leaves // k ** (level - 1))  # nodes one level down
        return make_node(level, j, [node(level - 1, c)
                                    for c in range(j * k, min(j * k + k, width))])

    return node(tree_depth(n_leaves, k), 0)


def run_task(items: list, params: np.ndarray, spec: ChunkSpec, start: int, stop: int,
             split_every: int, n_leaves: int) -> dict[tuple[int, int], ChunkResult]:
    """Chunks ``start .. stop − 1`` held by one worker, folded into the largest tree nodes
    they alone cover (:func:`fold_run`): one task instead of one per chunk and the combine
    tasks below those nodes, with the very same sums."""
    results = (chunk_task(item, params, spec, i) for i, item in zip(range(start, stop), items,
                                                                      strict=True))
    return fold_run(results, start, stop, split_every, n_leaves)


@dataclass
class Pieces:
    """The chunks of a dataset as tasks see them, their row counts, and what keeps them alive."""

    items: list
    rows: list[int]
    held: tuple = ()
    streaming: bool = field(init=False)
    #: Persisted groups of ``group`` consecutive chunks (one key each); full passes use them.
    groups: list | None = None
    group: int = 1
    #: Persisted chunks: the consecutive runs ``(start, stop)`` placed on one worker each.
    runs: list[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        self.streaming = bool(self.items) and isinstance(self.items[0], StoreSlice)


def tree_sum(items: list, split_every: int, combine: Callable = None) -> Any:
    """Add items k at a time, level by level: the same grouping as
    :func:`cosim_dask.dist.passes.tree_reduce`, so in-process sums round like the cluster's."""
    combine = combine or combine_results
    while len(items) > 1:
        items = [combine(*items[j : j + split_every]) for j in range(0, len(items), split_every)]
    return items[0]


class LocalPairs:
    """The in-process twin of :class:`cosim_dask.dist.passes.DaskPairs`: the same chunk task on the
    same chunks and the same reduction tree, run in this process.

    Parameters
    ----------
    x, y : (n, d) arrays
    target : (n,) array
    """

    def __init__(self, x, y, target, parameterisation: Parameterisation, loss,
                 *, chunk_rows: int = 65536, validation: float = 0.0,
                 seed: int = 0, batch_chunks: int | None = None, split_every: int = 8,
                 on_invalid: str = "raise") -> None:
        # Each chunk is made contiguous and aligned once, not on every pass.
        self.chunks = [as_pair_arrays(x[s], y[s], target[s]) for s in split_rows(len(x),
                                                                                chunk_rows)]
        self.rows = [len(c[0]) for c in self.chunks]
        self.spec = ChunkSpec(parameterisation, get_loss(loss), validation, seed, on_invalid)
        self.batch_chunks = batch_chunks
        self.split_every = split_every
        self.last_validation: ScoreStats | None = None
        self.last_pairs = 0

    def __call__(self, params: np.ndarray, batch: int | None = None):
        full = batch is None or self.batch_chunks is None
        chosen = (range(len(self.chunks)) if full
                  else sample_chunks(len(self.chunks), self.batch_chunks, self.spec.seed, batch))
        spec = ChunkSpec(**{**self.spec.__dict__,
                            "with_validation": full and self.spec.validation > 0})
        result = tree_sum([chunk_task(self.chunks[i], params, spec, i) for i in chosen],
                          self.split_every)
        self.last_pairs = sum(self.rows[i] for i in chosen)
        if result.validation is not None:
            self.last_validation = result.validation
        return result.train


class DaskPairs:
    """Partial sums over a pair dataset on a Dask cluster; the ``partial_sum`` of an Objective.

    ``pieces`` hold either :class:`StoreSlice` items (streaming: each task reads its rows from
    the store) or tuples of delayed (x, y, target) chunks (data persisted in worker memory).
    """

    def __init__(
        self,
        client: Client,
        pieces: Pieces,
        parameterisation: Parameterisation,
        loss: Loss | str = "mse",
        *,
        validation: float = 0.0,
        seed: int = 0,
        batch_chunks: int | None = None,
        split_every: int | None = None,
        on_invalid: str = "raise",
        broadcast: str = "scatter",
        chunks_per_task: int | None = None,
        read_ahead: int | None = None,
        worker_runs: bool = True,
    ) -> None:
        self.client = client
        self.source = pieces
        self.pieces = pieces.items
        self.rows = pieces.rows
        self.spec = ChunkSpec(parameterisation, get_loss(loss), validation, seed, on_invalid)
        self.batch_chunks = batch_chunks
        self.split_every = resolve_split_every(split_every)
        if self.split_every < 2:
            raise ValueError(f"split_every={self.split_every} must be at least 2")
        self.broadcast = broadcast
        if chunks_per_task is not None and (
                chunks_per_task < 1 or
                self.split_every ** round(math.log(chunks_per_task, self.split_every))
                != chunks_per_task):
            raise ValueError(f"chunks_per_task={chunks_per_task} must be a power of "
                             f"split_every={self.split_every}")
        self.chunks_per_task = chunks_per_task
        #: Streaming tasks read ahead this many tasks (None: :func:`read_ahead_tasks`).
        self.read_ahead = read_ahead
        #: Full passes over persisted chunks as one task per worker's run (:func:`run_task`).
        self.worker_runs = worker_runs
        self.last_validation: ScoreStats | None = None
        self.last_pairs = 0

    @property
    def n_chunks(self) -> int:
        return len(self.pieces)

    def _params_ref(self, params: np.ndarray):
        if self.broadcast == "scatter":
            # One copy to every worker per step; a task reference, not a graph constant.
            return broadcast_params(self.client, params)
        return dask.delayed(params, name=f"cosim-params-{uuid.uuid4().hex}")

    def group_size(self, params: np.ndarray) -> int:
        if self.chunks_per_task is None and self.source.groups is not None:
            self.chunks_per_task = self.source.group
        if self.chunks_per_task is None:
            d = params.shape[-1]
            chunk_bytes = max(self.rows, default=0) * (2 * d + 1) * 4
            self.chunks_per_task = chunks_per_task(self.n_chunks, chunk_bytes,
                                                   self.split_every)
        return self.chunks_per_task

    def _leaves(self, ref, spec: ChunkSpec, chunks: list[int], token: str, group: int,
                read_ahead: int = 0) -> list:
        if self.source.groups is not None and group == self.source.group:
            tasks = [(self.source.groups[j // group], chunks[j : j + group])
                    for j in range(0, len(chunks), group)]
        else:
            tasks = [([self.pieces[i] for i in chunks[j : j + group]], chunks[j : j + group])
                    for j in range(0, len(chunks), group)]
        leaves = []
        for k, (data, indices) in enumerate(tasks):
            ahead = read_ahead_of([data for data, _ in tasks], k, read_ahead)
            # Leaves in chunk order (highest priority first): read-ahead guesses the chunks
            # that start next, and partials meet their tree siblings soon. Left to itself the
            # scheduler ran them in no useful order (55, 54, 53, ..., 0, 59, 58).
            with dask.annotate(priority=len(tasks) - k):
                if group == 1:
                    leaves.append(dask.delayed(chunk_task)(
                        data[0], ref, spec, indices[0], ahead,
                        dask_key_name=f"cosim-chunk-{token}-{indices[0]}"))
                else:
                    leaves.append(dask.delayed(group_task)(
                        data, ref, spec, indices, self.split_every, ahead,
                        dask_key_name=f"cosim-chunk-{token}-{k * group}"))
        return leaves

    def _runs_root(self, ref, spec: ChunkSpec, token: str):
        """The pass as one task per worker's run of persisted chunks (:func:`run_task`), then
        the nodes of the tree that span runs: the same sums, in the same order, as a task per
        chunk, with 71 tasks a step (62 chunks) cut to about a dozen."""
        n, k = self.n_chunks, self.split_every
        emitted = {}
        for start, stop in self.source.runs:
            task = dask.delayed(run_task)(self.pieces[start:stop], ref, spec, start, stop, k, n,
                                          dask_key_name=f"cosim-run-{token}-{start}")
            for level, j in fold_run([None] * (stop - start), start, stop, k, n,
                                     combine=lambda *_: None):
                emitted[level, j] = dask.delayed(operator.getitem)(
                    task, (level, j), dask_key_name=f"cosim-node-{token}-{level}-{j}")

        return stitch_tree(emitted, k, n, lambda level, j, children: dask.delayed(
            combine_results)(*children, dask_key_name=f"cosim-combine-{token}-{level}-{j * k}"))

    def run(self, params: np.ndarray, spec: ChunkSpec, chunks: Sequence[int]) -> ChunkResult:
        """One pass over ``chunks`` (see :func:`run_pass` for what survives what)."""
        chunks = list(chunks)
        # Mini-batches sample scattered chunks: group only full, consecutive passes.
        group = self.group_size(params) if chunks == list(range(self.n_chunks)) else 1

        read_ahead = (0 if not self.source.streaming
                      else self.read_ahead if self.read_ahead is not None
                      else read_ahead_tasks(self.client))
        by_runs = (self.worker_runs and self.source.runs is not None
                   and chunks == list(range(self.n_chunks)))

        def root(ref, token: str):
            if by_runs:
                return self._runs_root(ref, spec, token)
            return tree_reduce(self._leaves(ref, spec, chunks, token, group, read_ahead),
                               self.split_every, token)

        return run_pass(self.client, params, root, send=self._params_ref)

    def __call__(self, params: np.ndarray, batch: int | None = None) -> Partial:
        full = batch is None or self.batch_chunks is None
        chunks = (range(self.n_chunks) if full
                  else sample_chunks(self.n_chunks, self.batch_chunks, self.spec.seed, batch))
        spec = ChunkSpec(**{**self.spec.__dict__,
                            "with_validation": full and self.spec.validation > 0})
        result = self.run(params, spec, list(chunks))
        self.last_pairs = sum(self.rows[i] for i in chunks)
        if result.validation is not None:
            self.last_validation = result.validation
        return result.train

    def validate(self, params: np.ndarray) -> ScoreStats:
        """Validation statistics alone (one pass over the validation rows)."""
        spec = ChunkSpec(**{**self.spec.__dict__, "with_train": False, "with_validation": True})
        return self.run(params, spec, list(range(self.n_chunks))).validation


def read_ahead_of(task_data: list, k: int, distance: int) -> list[StoreSlice]:
    """The store chunks task ``k`` reads ahead: those of the task ``distance`` places on
    (each task's data a piece, or a list of pieces; data held in memory needs no reading)."""
    if not distance or k + distance >= len(task_data):
        return []
    later = task_data[k + distance]
    return [p for p in (later if isinstance(later, list) else [later])
            if isinstance(p, StoreSlice)]


def read_ahead_tasks(client: Client) -> int:
    """How many tasks ahead a streaming task starts reading: the tasks that run at once (the
    next to start is that many places on). Only when every worker shares one machine, and
    so one page cache; elsewhere a chunk read ahead on one host may be needed on another,
    and reading it twice would cost more than the overlap gains."""
    try:
        nthreads = guarded(client, client.nthreads, "asking the scheduler for its workers")
    except Exception:  # noqa: BLE001 - a read-ahead guess is never worth a failed pass
        return 0
    hosts = {address.rsplit(":", 1)[0] for address in nthreads}
    return sum(nthreads.values()) if len(hosts) == 1 else 0


def scheduler_lost(client: Client) -> bool:
    """True once the client has lost its scheduler (reconnecting, closed, or a wait gave up
    on it: :func:`cosim_dask.dist.waits.guarded`)."""
    return scheduler_gone(client)


def broadcast_params(client: Client, params: np.ndarray):
    """The parameters scattered to every worker: a future of one key on each.

    A worker that dies during the broadcast would make it wait forever (the scheduler keeps
    copying to the dead worker while the key is wanted): the wait raises
    :class:`WorkerLostError` instead, after releasing the key, which ends the copying, and
    :func:`run_pass` sends the parameters again.
    """
    from distributed import Future

    key = f"cosim-params-{uuid.uuid4().hex}"
    try:
        return guarded(client, lambda: client.scatter({key: params}, broadcast=True,
                                                      hash=False)[key],
                       "sending the parameters to every worker", watch_workers=True)
    except WorkerLostError:
        Future(key, client).release()
        raise


def run_pass(client: Client, params: np.ndarray, root: Callable, *, send: Callable | None = None):
    """Compute ``root(ref, token)``, a reduction over tasks that use the parameters ``ref``.

    The parameters are scattered to every worker (``send`` may choose otherwise). The pass is
    repeated when a lost worker took them along (scattered data has no lineage) or died
    while they were being sent, and a scheduler that is lost or stops answering becomes a
    :class:`~cosim_dask.errors.SchedulerLostError` instead of a hang
    (:mod:`cosim_dask.dist.waits` has the bound).
    """
    send = send or (lambda p: broadcast_params(client, p))
    for attempt in range(1, PASS_ATTEMPTS + 1):
        token = uuid.uuid4().hex[:12]
        ref = future = None
        try:
            ref = send(params)
            future = client.compute(root(ref, token))
            return wait_result(client, future)
        except (CancelledError, WorkerLostError) as exc:
            if scheduler_lost(client):
                raise lost_scheduler_error(client) from None
            if attempt == PASS_ATTEMPTS:
                raise ClusterError(f"a pass was cancelled {attempt} times in a row: workers "
                                   "keep dying, or the work was cancelled") from None
            logger.warning("%s; sending the parameters again and repeating the pass (%d/%d)",
                           "a pass was cancelled (a worker holding the parameters died)"
                           if isinstance(exc, CancelledError) else exc,
                           attempt + 1, PASS_ATTEMPTS)
        except OSError:
            if scheduler_lost(client):
                raise lost_scheduler_error(client) from None
            raise
        except Exception as exc:
            if type(exc).__name__ == "KilledWorker":
                raise ClusterError(
                    f"workers died again and again running a chunk task "
                    f"({str(exc).splitlines()[0]}); they may be running out of memory: "
                    "use smaller chunks or a larger {memory_limit}",
                    params={"memory_limit": ANY}) from None
            raise
        finally:
            if not scheduler_lost(client):
                for held in (future, ref):
                    if hasattr(held, "release"):
                        held.release()
    raise AssertionError("unreachable")  # pragma: no cover

def wait_result(client: Client, future):
    """``future.result()`` that gives up when the scheduler is gone or stops answering (a
    future submitted while the client reconnects is never cancelled and would wait forever);
    a long pass on a scheduler that answers waits as long as it takes."""
    return guarded(client, future.result, "waiting for a pass")


def store_pieces(path: str, slices: Sequence[slice], identity: str | None = None) -> Pieces:
    """Streaming pieces: every task reads its own rows from the store, every pass.

    A local ``path`` is made absolute here, on the driver: a worker resolves a relative path
    against its own working directory, where another store (or none) may lie. Every piece
    carries the store's fingerprint, ``identity`` (default: the store's now), which each
    read checks (:func:`cosim_dask.data.reader.check_identity`); pass the fingerprint of the
    store the run opened and checked, so a store replaced since is caught too.
    """
    from cosim_dask.data.reader import store_identity

    path = str(path) if "://" in str(path) else os.path.abspath(path)
    if identity is None:
        identity = store_identity(path)
    pieces = [StoreSlice(path, i, s.start, s.stop, identity) for i, s in enumerate(slices)]
    return Pieces(pieces, [s.stop - s.start for s in slices])


def persisted_store_pieces(client: Client, path: str, slices: Sequence[slice],
                           group: int = 1, identity: str | None = None) -> Pieces:
    """Chunks of a store read once into the workers' memory through :func:`read_group`: the
    same checks as streaming, and a lost worker's chunks are read again from the store
    (persisted data keeps its lineage). The chunks are spread evenly over the workers
    (:func:`persist_spread`).

    ``group`` > 1 (a power of the fan-in, :func:`chunks_per_task`): one key per group of
    consecutive chunks, which full passes use; mini-batches and other per-chunk passes
    stream their chunks from the store.
    """
    streamed = store_pieces(path, slices, identity)
    token = uuid.uuid4().hex[:12]
    chunks = streamed.items
    if group == 1:
        items, runs = persist_spread(client, [[dask.delayed(read_slice)(
            p, dask_key_name=f"cosim-read-{token}-{i}")] for i, p in enumerate(chunks)])
        items = [item for (item,) in items]
        return Pieces(items, streamed.rows, tuple(items), runs=runs)
    groups, _ = persist_spread(client, [[dask.delayed(read_group)(
        chunks[j : j + group], dask_key_name=f"cosim-read-{token}-{j}")]
        for j in range(0, len(chunks), group)])
    groups = [g for (g,) in groups]
    return Pieces(chunks, streamed.rows, tuple(groups), groups=list(groups), group=group)


def persist_spread(client: Client, items: list[list]) -> tuple[list[list], list[tuple[int, int]]]:
    """Persist ``items`` (each a list of delayed values that belong together), placing
    consecutive runs of them on each worker in proportion to its threads; return the
    persisted items and the runs ``[(start, stop), ...]``.

    Left to itself the scheduler put 24 of 60 equal chunks on one worker and 36 on the
    other, and every step then waited ~35% longer for the busier one. Consecutive runs keep
    the first levels of the reduction tree on one worker (:func:`run_task`). The placement
    is a preference (``allow_other_workers``): a lost worker's chunks are recomputed anywhere.
    """
    workers = sorted(guarded(client, lambda: client.scheduler_info(n_workers=-1),
                             "asking the scheduler for its workers")["workers"].items())
    if len(workers) < 2 or len(items) < 2:
        blocks = [(None, 0, len(items))]
    else:
        threads = [info.get("nthreads", 1) or 1 for _, info in workers]
        bounds = [0] + [round(len(items) * sum(threads[: k + 1]) / sum(threads))
                        for k in range(len(workers) - 1)] + [len(items)]
        blocks = [(address, bounds[k], bounds[k + 1]) for k, (address, _) in enumerate(workers)]
    out: list[list] = []
    runs = []
    for address, start, stop in blocks:
        block = items[start:stop]
        if not block:
            continue
        where = {} if address is None else {"workers": [address], "allow_other_workers": True}
        it = iter(guarded(client, lambda b=block, w=where: client.persist(
            [v for group in b for v in group], **w), "persisting the chunks"))
        out.extend([next(it) for _ in group] for group in block)
        runs.append((start, stop))
    return out, runs


def resolve_split_every(split_every: int | None) -> int:
    return split_every or dask.config.get("split_every", None) or DEFAULT_SPLIT_EVERY


def persisted_pieces(client: Client, x, y, target) -> Pieces:
    """Pieces of Dask arrays persisted in the workers' memory (read once, reused each step):
    one key per chunk holding its x, y and target, spread evenly over the workers.

    One key, not three: three keys of one chunk can land on different workers, and the
    scheduler's memory manager drops the copies a step makes, so every step moved them again.
    Persisted chunks keep their lineage: a lost worker's chunks are recomputed from the
    store (unlike data scattered from the client).
    """
    import dask.array as da

    if x.chunks[0] != y.chunks[0] or x.chunks[0] != target.chunks[0]:
        raise ValueError("x, y and target must share their row chunks")
    x = x.rechunk({1: -1}) if x.numblocks[1] > 1 else x
    y = y.rechunk({1: -1}) if y.numblocks[1] > 1 else y
    xs, ys, ts = x.to_delayed().ravel(), y.to_delayed().ravel(), target.to_delayed().ravel()
    token = uuid.uuid4().hex[:12]
    items, runs = persist_spread(client, [
        [dask.delayed(_chunk_tuple)(*triple, dask_key_name=f"cosim-pairs-{token}-{i}")]
        for i, triple in enumerate(zip(xs, ys, ts, strict=True))])
    items = [item for (item,) in items]
    # ``held`` keeps the futures (or the workers drop the data), as whole arrays again for
    # callers that compute on them.
    rows = list(x.chunks[0])
    held = tuple(
        da.concatenate([da.from_delayed(item[k], shape=(r, *arr.shape[1:]), dtype=arr.dtype)
                        for item, r in zip(items, rows, strict=True)])
        for k, arr in enumerate((x, y, target)))
    return Pieces(items, rows, held, runs=runs)


def _chunk_tuple(x: np.ndarray, y: np.ndarray, target: np.ndarray) -> tuple:
    return x, y, target
