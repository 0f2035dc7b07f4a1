"""One pass over a pair dataset: a task per run of chunks on the worker that holds or reads
them, then the rest of the reduction tree; only the root's sums reach the driver.

A dataset of chunks is a :class:`Pairs`: the objective's ``partial_sum`` (training passes,
with the validation statistics of full passes), :meth:`Pairs.validate` and
:meth:`Pairs.score` (evaluation). Its :meth:`Pairs.run` computes one pass, in this process
(:class:`LocalPairs`) or on a Dask cluster (:class:`DaskPairs`); both do the same chunk work
(:mod:`cosim_dask.dist.tasks`) and add it in the same tree (:mod:`cosim_dask.dist.tree`), so
they give the same bits.

Nothing here knows the CLI. The NumPy work is :mod:`cosim_dask.core.kernel`; this module
decides where it runs and how the results add up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import dask
import numpy as np
from dask._task_spec import List, Task, TaskRef
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from cosim_dask.core.forms import FullMetric, Parameterisation
from cosim_dask.core.kernel import Partial, as_pair_arrays
from cosim_dask.core.local import LocalFit, MetricSum, local_runs, plan_run
from cosim_dask.core.losses import Loss, get_loss
from cosim_dask.core.retrieval import RetrievalStats
from cosim_dask.core.stats import ScoreStats
from cosim_dask.data.reader import StoreSlice, read_group, read_slice, store_identity
from cosim_dask.data.split import chunk_slices, sample_chunks
from cosim_dask.dist.tasks import (
    ChunkResult,
    ChunkSpec,
    chunks_per_task,
    fold_task,
    local_chain_task,
    local_task,
    node_task,
)
from cosim_dask.dist.tree import Tree, add, combine_key, resolve_split_every
from cosim_dask.dist.waits import (
    guarded,
    lost_scheduler_error,
    probe,
    scheduler_gone,
    wait_future,
)
from cosim_dask.errors import ANY, ClusterError, CosimError, WorkerLostError
from cosim_dask.outputs import is_url

if TYPE_CHECKING:  # distributed costs ~1 s to import; in-process fits never need it
    from distributed import Client

logger = logging.getLogger(__name__)

#: Parameters travel inside the pass's graph, a copy in every task, while those copies take
#: at most this many bytes; beyond, they are scattered to every worker first. The scatter is
#: a wait of its own (a probe of the workers, then the copies) before the pass can start:
#: 117 ms against 25 ms for a task's round trip on a loaded machine; a copy in each task
#: also spares the workers fetching one from another. For 8 MB (d = 1,024) a scatter and
#: a graph constant cost about the same (51-64 against 63-67 ms).
PARAMS_IN_GRAPH_BYTES = 2**20

#: Passes repeated when a worker holding the scattered parameters died with them, or died
#: while they were being sent.
PASS_ATTEMPTS = 3
#: Rows a streamed first-pass task fits (whole chunks of one run, at least one): a run of
#: a task per chunk waited a scheduler round trip between its tasks, ~0.15 s of a 2.3 s
#: run of 1M rows in 31 chunks (d = 128); a quarter of a run's rows per task (8 tasks for
#: 62 chunks) gave those back and still shows the pass's progress.
LOCAL_TASK_ROWS = 262_144


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


class Pairs:
    """A pair dataset in chunks, summed in passes; the ``partial_sum`` of an Objective.

    Calling it with parameters gives the training partial of every chunk (a full pass,
    which also records :attr:`last_validation`) or of mini-batch ``batch``'s chunks
    (``batch_chunks`` chunks drawn by :func:`cosim_dask.data.split.sample_chunks`).
    Subclasses say where a pass runs: :meth:`run`.
    """

    def __init__(self, rows: list[int], parameterisation: Parameterisation, loss: Loss | str,
                 *, validation: float = 0.0, seed: int = 0, batch_chunks: int | None = None,
                 split_every: int | None = None, on_invalid: str = "raise",
                 negatives: int = 0, positive_weight: int = 1) -> None:
        self.rows = rows
        self.spec = ChunkSpec(parameterisation, get_loss(loss), validation, seed, on_invalid,
                              negatives=negatives, positive_weight=positive_weight)
        self.batch_chunks = batch_chunks
        self.split_every = resolve_split_every(split_every)
        #: Validation statistics of the last full pass (None before one).
        self.last_validation: ScoreStats | None = None
        #: Pairs the last pass went over.
        self.last_pairs = 0
        #: Pairs every training pass so far went over (full passes, mini-batches, local fits).
        self.pairs_read = 0
        #: Parameters whose validation figures :meth:`validate_ahead` computed: the next
        #: full pass, if it is at these, does not score the validation rows again.
        self._validated: np.ndarray | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.rows)

    @property
    def passes(self) -> float:
        """Training passes over the data so far: pairs read / pairs in the dataset (a
        mini-batch counts as its share)."""
        return self.pairs_read / max(sum(self.rows), 1)

    def run(self, params: np.ndarray, spec: ChunkSpec, chunks: Sequence[int]) -> ChunkResult:
        """One pass: ``spec``'s work on ``chunks`` (in order), added in the pass's tree."""
        raise NotImplementedError

    def __call__(self, params: np.ndarray, batch: int | None = None) -> Partial:
        full = batch is None or self.batch_chunks is None
        chunks = (list(range(self.n_chunks)) if full
                  else sample_chunks(self.n_chunks, self.batch_chunks, self.spec.seed, batch))
        known = self._validated is not None and np.array_equal(params, self._validated)
        self._validated = None
        # Negatives are drawn anew for each mini-batch, and stay fixed across the passes of
        # a full-batch solver (L-BFGS's line search and steps need one objective).
        spec = replace(self.spec, with_validation=full and self.spec.validation > 0
                       and not known, epoch=0 if batch is None else batch)
        result = self.run(params, spec, chunks)
        self.last_pairs = sum(self.rows[i] for i in chunks)
        self.pairs_read += self.last_pairs
        if result.validation is not None:
            self.last_validation = result.validation
        return result.train

    def local_fit(self, params: np.ndarray, fit: LocalFit) -> MetricSum:
        """The streaming first pass (:mod:`cosim_dask.core.local`): every run of chunks
        (:func:`local_runs`) fits its training rows from ``params``; the runs' fitted
        metrics, added in run order."""
        runs = local_runs(self.rows, fit.run_rows, self.spec.seed)
        result = self.run_local(params, fit, runs)
        self.last_pairs = sum(self.rows)
        self.pairs_read += self.last_pairs
        return result

    def run_local(self, params: np.ndarray, fit: LocalFit, runs: list[list[int]]) -> MetricSum:
        """The first pass's work: each run's chunks in turn (:func:`local_task`)."""
        raise NotImplementedError

    @property
    def cheap_to_read(self) -> bool:
        """Reading every chunk costs little beside a training pass (data in memory, or a
        local store: a training pass is compute-bound there)."""
        return True

    def validate(self, params: np.ndarray) -> ScoreStats:
        """Validation statistics alone (one pass over the validation rows)."""
        spec = replace(self.spec, with_train=False, with_validation=True)
        return self.run(params, spec, range(self.n_chunks)).validation

    def validate_ahead(self, params: np.ndarray) -> bool:
        """The validation figures at ``params`` (:attr:`last_validation`) ahead of the full
        pass there, which then skips them: False (nothing done) without validation rows.

        The first pass's average is scored this way, so its figures come a pass sooner: the
        validation rows alone are scored (a tenth of the rows by default; a read of each
        chunk where it streams) and the full pass after scores none. Not where a read of the
        data costs about a pass (:attr:`cheap_to_read`): there the figures wait for the full
        pass, as they did before.
        """
        if self.spec.validation <= 0 or not self.cheap_to_read:
            return False
        self.last_validation = self.validate(params)
        self._validated = np.array(params, copy=True)
        return True

    def score(self, A: np.ndarray, splits: Sequence[str] = ("all",), *,
              joint: bool = False) -> dict[str, ScoreStats]:
        """Statistics of the metric ``A`` and of plain cosine on each split's rows, keyed
        ``"learned/<split>"`` and ``"plain/<split>"`` (one pass)."""
        # The parameters of a full metric are A itself.
        spec = replace(self.spec, parameterisation=FullMetric(), with_train=False,
                       splits=tuple(splits), joint=joint)
        return self.run(np.asarray(A, dtype=np.float64), spec, range(self.n_chunks)).scores

    def retrieval(self, A: np.ndarray, split: str = "all", *, candidates: int = 1000,
                  seed: int = 0) -> dict[str, RetrievalStats]:
        """Retrieval statistics of the metric ``A`` and of plain cosine over the positive
        pairs of ``split``'s rows, among seeded in-chunk candidate blocks of ``candidates``
        (:mod:`cosim_dask.core.retrieval`), keyed ``"learned"`` and ``"plain"`` (one pass)."""
        spec = replace(self.spec, parameterisation=FullMetric(), with_train=False,
                       splits=(split,), retrieval=candidates, retrieval_seed=seed)
        return self.run(np.asarray(A, dtype=np.float64), spec, range(self.n_chunks)).retrieval


class LocalPairs(Pairs):
    """The in-process twin of :class:`DaskPairs`: the same chunk work on the same chunks and
    the same reduction tree, run in this process.

    Parameters
    ----------
    x, y : (n, d) arrays
    target : (n,) array
    """

    def __init__(self, x, y, target, parameterisation: Parameterisation, loss: Loss | str,
                 *, chunk_rows: int = 65536, validation: float = 0.0,
                 seed: int = 0, batch_chunks: int | None = None, split_every: int | None = None,
                 on_invalid: str = "raise", negatives: int = 0, positive_weight: int = 1) -> None:
        # Each chunk is made contiguous and aligned once, not on every pass.
        self.chunks = [as_pair_arrays(x[s], y[s], target[s])
                       for s in chunk_slices(len(x), chunk_rows)]
        super().__init__([len(c[0]) for c in self.chunks], parameterisation, loss,
                         validation=validation, seed=seed, batch_chunks=batch_chunks,
                         split_every=split_every, on_invalid=on_invalid, negatives=negatives,
                         positive_weight=positive_weight)

    def run(self, params: np.ndarray, spec: ChunkSpec, chunks: Sequence[int]) -> ChunkResult:
        chunks = list(chunks)
        tree = Tree(len(chunks), self.split_every)
        return node_task([self.chunks[i] for i in chunks], params, spec, tree, 0, chunks)

    def run_local(self, params: np.ndarray, fit: LocalFit, runs: list[list[int]]) -> MetricSum:
        ends = []
        for run in runs:
            state = params
            plan = plan_run(sum(self.rows[i] for i in run), self.spec.validation, fit,
                            np.shape(params)[-1])
            for k, i in enumerate(run):
                state = local_task(self.chunks[i], state, self.spec, fit, i,
                                   finish=k == len(run) - 1, plan=plan)
            ends.append(state)
        return sum_in_order(ends)


class DaskPairs(Pairs):
    """Passes over a pair dataset on a Dask cluster.

    ``pieces`` hold either :class:`StoreSlice` items (streaming: each task reads its rows from
    the store) or tuples of delayed (x, y, target) chunks (data persisted in worker memory).
    A pass runs as one task per chunk, per group of ``chunks_per_task`` chunks (a power of
    the fan-in; None: small chunks are grouped, :func:`chunks_per_task`), or, over persisted
    chunks and with ``worker_runs``, one task per worker's run of chunks.

    ``broadcast``: how each pass's parameters reach the workers: ``"inline"`` a copy in
    every task, ``"graph"`` one key of the pass's graph, ``"scatter"`` to every worker
    before the pass, ``"auto"`` inline while the copies take at most
    :data:`PARAMS_IN_GRAPH_BYTES`, else scatter.
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
        broadcast: str = "auto",
        chunks_per_task: int | None = None,
        read_ahead: int | None = None,
        worker_runs: bool = True,
        negatives: int = 0,
        positive_weight: int = 1,
    ) -> None:
        super().__init__(pieces.rows, parameterisation, loss, validation=validation, seed=seed,
                         batch_chunks=batch_chunks, split_every=split_every,
                         on_invalid=on_invalid, negatives=negatives,
                         positive_weight=positive_weight)
        self.client = client
        self.source = pieces
        self.pieces = pieces.items
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
        #: Full passes over persisted chunks as one task per worker's run.
        self.worker_runs = worker_runs

    @property
    def cheap_to_read(self) -> bool:
        # From object storage a read of the store takes about as long as a training pass.
        return not (self.source.streaming and is_url(self.pieces[0].path))

    def _params_ref(self, params: np.ndarray, n_tasks: int = 1):
        mode = self.broadcast
        if mode == "auto":
            mode = "inline" if params.nbytes * n_tasks <= PARAMS_IN_GRAPH_BYTES else "scatter"
        if mode == "scatter":
            # One copy to every worker per step; a task reference, not a graph constant.
            return broadcast_params(self.client, params)
        if mode == "inline":
            return params  # an argument of every task: no key to fetch between workers
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

    def tasks(self, params: np.ndarray, chunks: Sequence[int]) -> list[tuple[int, int, object]]:
        """How a pass over ``chunks`` is cut into tasks: ``(start, stop, data)`` for each
        run of leaves ``start .. stop − 1`` (positions in ``chunks``) one task computes."""
        chunks = list(chunks)
        full = chunks == list(range(self.n_chunks))
        if full and self.worker_runs and self.source.runs is not None:
            # One task per worker's run of persisted chunks: 71 tasks a step (62 chunks)
            # became about a dozen.
            return [(start, stop, self.pieces[start:stop]) for start, stop in self.source.runs]
        # Mini-batches sample scattered chunks: group only full, consecutive passes.
        group = self.group_size(params) if full else 1
        bounds = [(j, min(j + group, len(chunks))) for j in range(0, len(chunks), group)]
        if full and self.source.groups is not None and group == self.source.group:
            return [(a, b, self.source.groups[a // group]) for a, b in bounds]
        return [(a, b, [self.pieces[i] for i in chunks[a:b]]) for a, b in bounds]

    def graph(self, ref, spec: ChunkSpec, chunks: Sequence[int], token: str,
              tasks: list[tuple[int, int, object]], read_ahead: int = 0,
              places: list[str] | None = None):
        """The delayed root of a pass: ``tasks`` (:meth:`tasks`), each folding its chunks
        into the tree nodes it alone covers, then the combine tasks of the nodes above.

        Written as a plain task dict rather than through ``dask.delayed``, which tokenized
        and unpacked every argument of every task: 80 ms a pass for a graph of two tasks on
        a loaded machine, now about 1 ms. ``ref`` is the parameters: a future, or a delayed
        value whose graph is merged in.

        ``places``: task n goes to worker ``places[n % len(places)]`` (a loose restriction:
        elsewhere if that worker is gone).
        """
        chunks = list(chunks)
        tree = Tree(len(chunks), self.split_every)
        dsk: dict = {}
        inputs: dict = {}

        def ref_of(item):
            # A delayed value (persisted chunks are delayed over the workers' futures): the
            # task refers to its key, and its graph comes along. A future (the scattered
            # parameters) is an argument as it is; distributed resolves it.
            if isinstance(item, Delayed):
                inputs.update(item.__dask_graph__())
                return TaskRef(item.key)
            return item

        params = ref_of(ref)
        nodes: dict = {}
        task_annotations: dict = {}
        for n, (start, stop, data) in enumerate(tasks):
            ahead = read_ahead_of([d for *_, d in tasks], n, read_ahead)
            data = List(*map(ref_of, data)) if isinstance(data, list) else ref_of(data)
            args = (data, params, spec, tree, start, chunks[start:stop], ahead)
            tops = tree.top_nodes(start, stop)
            if len(tops) == 1:
                key = f"cosim-chunk-{token}-{start}"
                dsk[key] = Task(key, node_task, *args)
                nodes[tops[0]] = key
            else:
                key = f"cosim-run-{token}-{start}"
                dsk[key] = Task(key, fold_task, *args)
                for level, j in tops:
                    node = f"cosim-node-{token}-{level}-{j}"
                    dsk[node] = Task(node, operator.getitem, TaskRef(key), (level, j))
                    nodes[level, j] = node
            # Tasks in chunk order (highest priority first): read-ahead guesses the chunks
            # that start next, and partials meet their tree siblings soon. Left to itself the
            # scheduler ran them in no useful order (55, 54, 53, ..., 0, 59, 58).
            task_annotations[key] = {"priority": len(tasks) - n}
            if places:
                task_annotations[key].update(workers=[places[n % len(places)]],
                                             allow_other_workers=True)

        def make_node(node, children):
            key = combine_key(tree, token, node)
            dsk[key] = Task(key, add, *map(TaskRef, children))
            return key

        root = tree.build(nodes, make_node)
        # One layer per task for its annotations (what ``dask.annotate`` made), over
        # a layer of inputs (parameters, persisted chunks) and under the layer of the tree
        # nodes above the tasks: the layers' dependencies decide what the graph keeps.
        name = f"cosim-inputs-{token}"
        layers = {name: MaterializedLayer(inputs)}
        dependencies = {name: set()}
        for key, marks in task_annotations.items():
            layers[key] = MaterializedLayer({key: dsk.pop(key)}, annotations=marks)
            dependencies[key] = {name}
        if dsk:
            layers[root] = MaterializedLayer(dsk)
            dependencies[root] = set(layers) - {root}
        graph = HighLevelGraph(layers, dependencies)
        return Delayed(root, graph, layer=root)

    def run(self, params: np.ndarray, spec: ChunkSpec, chunks: Sequence[int]) -> ChunkResult:
        """One pass over ``chunks`` (see :func:`run_pass` for what survives what)."""
        chunks = list(chunks)
        tasks = self.tasks(params, chunks)
        remote = self.source.streaming and is_url(self.pieces[0].path)
        read_ahead = (0 if not self.source.streaming
                      else self.read_ahead if self.read_ahead is not None
                      else read_ahead_tasks(self.client, remote=remote))
        # Object storage: chunks are read ahead into the reading worker's memory, so task n
        # must run where task n - read_ahead ran: tasks are dealt to the workers in turn.
        places = stream_placement(self.client) if remote and read_ahead else None
        return run_pass(self.client, params,
                        lambda ref, token: self.graph(ref, spec, chunks, token, tasks,
                                                      read_ahead, places),
                        send=lambda p: self._params_ref(p, len(tasks)))


    def run_local(self, params: np.ndarray, fit: LocalFit, runs: list[list[int]]) -> MetricSum:
        """The runs as chains of tasks, summed at the end: a task per chunk when persisted
        (each on the worker that holds its chunk), else a task per :data:`LOCAL_TASK_ROWS`
        rows of the run's chunks, each chunk starting to read the next."""

        def root(ref, token):
            ends = []
            for r, run in enumerate(runs):
                state = ref
                plan = plan_run(sum(self.rows[i] for i in run), self.spec.validation, fit,
                                np.shape(params)[-1])
                groups = (task_groups([self.rows[i] for i in run], LOCAL_TASK_ROWS)
                          if self.source.streaming else [(k, k + 1) for k in range(len(run))])
                for lo, hi in groups:
                    group = run[lo:hi]
                    later = self.pieces[run[hi]] if hi < len(run) else None
                    ahead = [later] if isinstance(later, StoreSlice) else []
                    state = dask.delayed(local_chain_task)(
                        [self.pieces[i] for i in group], state, self.spec, fit, group, ahead,
                        hi == len(run), plan, dask_key_name=f"cosim-local-{token}-{r}-{lo}")
                ends.append(state)
            return dask.delayed(sum_in_order)(ends, dask_key_name=f"cosim-local-sum-{token}")

        return run_pass(self.client, params, root, send=self._params_ref)


def task_groups(rows: Sequence[int], task_rows: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` runs of consecutive items holding about ``task_rows`` rows each (at
    least one item each)."""
    groups, lo, held = [], 0, 0
    for k, r in enumerate(rows):
        held += r
        if held >= task_rows:
            groups.append((lo, k + 1))
            lo, held = k + 1, 0
    if lo < len(rows):
        groups.append((lo, len(rows)))
    return groups


def sum_in_order(parts: Sequence[MetricSum]) -> MetricSum:
    """The runs' results added in run order (the same bits wherever they ran)."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def read_ahead_of(task_data: list, k: int, distance: int) -> list[StoreSlice]:
    """The store chunks task ``k`` reads ahead: those of the task ``distance`` places on
    (each task's data a piece, or a list of pieces; data held in memory needs no reading)."""
    if not distance or k + distance >= len(task_data):
        return []
    later = task_data[k + distance]
    return [p for p in (later if isinstance(later, list) else [later])
            if isinstance(p, StoreSlice)]


def read_ahead_tasks(client: Client, *, remote: bool = False) -> int:
    """How many tasks ahead a streaming task starts reading: the tasks that run at once (the
    next to start is that many places on, most often on the thread that frees up first).

    A local store: only when every worker shares one machine, and so one page cache;
    elsewhere a chunk read ahead on one host may be needed on another, and reading it twice
    would cost more than the overlap gains. A store in object storage (``remote``) is read
    ahead into the reading worker's memory on any cluster: no cache is shared anyway, and a
    guess that misses costs one extra read of a task's chunks."""
    try:
        nthreads = guarded(client, client.nthreads, "asking the scheduler for its workers")
    except Exception:  # noqa: BLE001 - a read-ahead guess is never worth a failed pass
        return 0
    hosts = {address.rsplit(":", 1)[0] for address in nthreads}
    return sum(nthreads.values()) if len(hosts) == 1 or remote else 0


def stream_placement(client: Client) -> list[str] | None:
    """The workers that streaming tasks from object storage are dealt to in turn, each worker
    once per thread, so that with read-ahead :func:`read_ahead_tasks` places on, a task's
    chunks are read ahead by the worker that runs it (the scheduler, left to itself, ran
    them in no predictable order: 1 read-ahead in 15 was used). None when unknown."""
    try:
        nthreads = guarded(client, client.nthreads, "asking the scheduler for its workers")
    except Exception:  # noqa: BLE001 - the placement is only an optimisation
        return None
    workers = sorted(nthreads)
    # Worker-major is wrong here: the T threads of a worker run T consecutive dealt tasks
    # at once, so deal one task per worker in turn and let threads take the next ones.
    return [w for _ in range(max(nthreads.values(), default=1)) for w in workers
            if nthreads[w] > _] or None


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
    repeated when a lost worker took them along (scattered data has no lineage), died
    while they were being sent, or a connection broke while the scheduler still answers; a
    scheduler that is lost or stops answering becomes a
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
        except OSError as exc:
            if getattr(future, "status", None) == "error":
                raise  # the chunk work's own error, reported as it is
            # A connection broke: the scheduler's (the client may not have noticed its death
            # yet, so ask it) or a worker's (the pass is repeated, as for a lost worker).
            if scheduler_lost(client) or probe(client) is None:
                raise lost_scheduler_error(
                    client, f"{type(exc).__name__}, then no answer to a probe") from None
            first = (str(exc).splitlines() or [""])[0]
            if attempt == PASS_ATTEMPTS:
                raise ClusterError(f"a pass failed {attempt} times in a row on a broken "
                                   f"connection ({type(exc).__name__}: {first}); run the "
                                   "same command again") from None
            logger.warning("a connection broke during a pass (%s: %s); repeating the pass "
                           "(%d/%d)", type(exc).__name__, first, attempt + 1, PASS_ATTEMPTS)
        except (Exception, asyncio.CancelledError) as exc:
            if type(exc).__name__ == "KilledWorker":
                raise ClusterError(
                    f"workers died again and again running a chunk task "
                    f"({str(exc).splitlines()[0]}); they may be running out of memory: "
                    "use smaller chunks or a larger {memory_limit}",
                    params={"memory_limit": ANY}) from None
            if isinstance(exc, CosimError) or getattr(future, "status", None) == "error":
                raise  # ours, or the chunk work's own error: reported as it is
            if scheduler_lost(client):
                raise lost_scheduler_error(client) from None
            # Anything else came from distributed itself: one line naming the step.
            step = ("sending the parameters to the workers" if ref is None else
                    "submitting the pass" if future is None else "waiting for a pass")
            first = (str(exc).splitlines() or [""])[0]
            raise ClusterError(f"a pass failed inside distributed while {step} "
                               f"({type(exc).__name__}: {first}); run the same command "
                               "again") from exc
        finally:
            if not scheduler_lost(client):
                for held in (future, ref):
                    if hasattr(held, "release"):
                        held.release()
    raise AssertionError("unreachable")  # pragma: no cover

def wait_result(client: Client, future):
    """``future.result()`` that gives up when the scheduler is gone or stops answering (a
    future submitted while the client reconnects is never cancelled and would wait forever);
    a long pass on a scheduler that answers waits as long as it takes. A wait that distributed
    cuts short is repeated or ends in a one-line error
    (:func:`cosim_dask.dist.waits.wait_future`)."""
    return wait_future(client, future, "waiting for a pass")


def store_pieces(path: str, slices: Sequence[slice], identity: str | None = None) -> Pieces:
    """Streaming pieces: every task reads its own rows from the store, every pass.

    A local ``path`` is made absolute here, on the driver: a worker resolves a relative path
    against its own working directory, where another store (or none) may lie. Every piece
    carries the store's fingerprint, ``identity`` (default: the store's now), which each
    read checks (:func:`cosim_dask.data.reader.check_identity`); pass the fingerprint of the
    store the run opened and checked, so a store replaced since is caught too.
    """
    path = str(path) if is_url(path) else os.path.abspath(path)
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
    the first levels of the reduction tree on one worker (:meth:`DaskPairs.tasks`). The placement
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
