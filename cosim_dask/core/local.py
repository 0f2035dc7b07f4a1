"""The streaming first pass: runs of chunks fitted by mini-batch Adam, then averaged.

The chunks are cut into runs of consecutive chunks (:func:`local_runs`), about
``LocalFit.run_rows`` training rows each: how many runs there are depends only on the data's
chunk sizes, never on the cluster. Each run starts from the same parameters and walks its
chunks one after the other (in a seeded order), taking Adam steps over seeded mini-batches of
each chunk's training rows (:func:`local_steps`); every mini-batch gradient is the chunk
kernel's (:meth:`Parameterisation.chunk_partial`; with in-chunk negatives,
:meth:`Parameterisation.negatives_partial` over the batch and its negatives). Every row is
read once: the phase is one pass. The runs' fitted metrics are then averaged
(:class:`MetricSum`), added in run order.
Each run's result depends only on the start, its rows and the seed, so the average does not
depend on how many workers ran the runs or when.

Why runs of about a million rows: Adam needs on the order of a hundred steps to get near the
optimum from the identity (PyTorch's recipe: ~20 steps of 8,192 at d = 64, ~240 at d = 128),
and one chunk (32k–64k rows) gives too few; averaging fits that each stopped early does not
finish them (d = 128, one 32k chunk per fit: held-out AUC 0.944–0.950 against the optimum's
0.965). Long runs are sequential, so on a big cluster the runs, not the workers, bound the
first pass's parallelism; their number grows with the data.

What is averaged is the metric A = MᵀM, each divided by its mean eigenvalue (trace / d),
weighted by the rows fitted; the factor is then refitted to the average (its top-k
eigenpairs). Averaging M itself would depend on the factor's gauge (QM gives the same A for
every orthogonal Q), and the similarity ignores the scale of A, so a run whose fit drifted to
a larger scale must not weigh more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cosim_dask.core.forms import Parameterisation
from cosim_dask.core.kernel import scratch_array, take_rows
from cosim_dask.core.losses import Loss
from cosim_dask.core.negatives import negative_partners


@dataclass(frozen=True)
class LocalFit:
    """How the first pass fits: runs of about ``run_rows`` rows, each walking its chunks'
    training rows in seeded mini-batches, with Adam (step ``lr`` in units of the parameters'
    RMS, as the ``adam`` solver's), ``batch_rows`` rows a step. A run takes at least
    ``max(min_steps, steps_per_dim · d)`` steps: more epochs over each chunk (up to
    MAX_EPOCHS) when one epoch of its rows has fewer (small data, large d). A run's result
    is the average of its parameters over the second half of its steps (Polyak averaging):
    Adam at a constant step ends in noise around the optimum, which the average removes.

    Measured on the synthetic pairs of ``scripts/bench_converge.py`` (rank 8, noise 0.3,
    binary; held-out AUC of the first pass's average against the best any method reaches):
    the last parameters instead of the average: 0.962 against 0.9640 (200,000 × 64); a step
    decaying linearly to 0 was fragile (0.952–0.964 by lr). Batches of 8,192 rather than
    4,096 (lr 0.6): 2M × 128 in two runs 0.96453 against 0.96325 (best 0.96496); one run of
    2M 0.96490 against 0.96417. The number of steps must grow with d: at 600k × 256 (best
    0.96066) 73 steps of 8,192 gave 0.95593, 146 steps 0.96016; at 200k × 64, 64–98 steps
    reach 0.9635–0.9637 (best 0.96418). lr 0.8 rather than 0.6: 0.96346 against 0.96312 at
    200k × 64 with batches of 8,192, 0.96460 against 0.96453 at 2M × 128. Smaller batches
    rather than more epochs, for the same steps, lost: 0.96248 (200k × 64, 64 steps of
    3,125) and 0.95810 (600k × 256, 128 steps of 4,218). These defaults are for binary
    labels; graded targets take :data:`GRADED_FIT` (:func:`first_pass_fit`).
    """

    run_rows: int = 1_048_576
    epochs: int = 1
    min_steps: int = 64
    steps_per_dim: float = 0.5
    batch_rows: int = 8192
    lr: float = 0.8
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


#: The first pass on graded targets: smaller batches, a smaller step, more of them. Measured
#: with ``scripts/bench_graded.py`` (rank 8, graded targets; held-out MSE of the first pass's
#: average against L-BFGS polished from it), the binary default left low-noise graded data
#: short of the 1 % target: noise 0.05, +3.7 % (300k × 64), +6.2 % (600k × 128), +1.7 %
#: (2M × 128); this fit +0.36 %, +0.55 %, +0.29 % in the same time (1.0 s against 0.9 s at
#: 600k × 128, 1 thread); at noise 0.2, +0.33 % against +0.76 % (600k × 128). Large d needs
#: the steps per dimension: 600k × 256, +1.17 % at 192 steps, +0.78 % at 2 · d (2 epochs;
#: the binary default +1.49 %, in the same 5 s). Unlike binary labels, where smaller
#: batches lost, graded targets need the steps more than the batch.
GRADED_FIT = LocalFit(batch_rows=2048, lr=0.4, min_steps=192, steps_per_dim=2.0)


def first_pass_fit(binary: bool) -> LocalFit:
    """The first pass's fit for the targets at hand: :class:`LocalFit`'s defaults for binary
    labels (and positive pairs), :data:`GRADED_FIT` for graded targets."""
    return LocalFit() if binary else GRADED_FIT


@dataclass
class LocalState:
    """A run's Adam state between chunks (parameters, moments, steps) and what it fitted."""

    params: np.ndarray
    m1: np.ndarray
    m2: np.ndarray
    step: int = 0
    loss: float = 0.0
    count: int = 0
    skipped: int = 0
    planned: int = 0  # the run's steps, about: the second half's parameters are averaged
    epochs: int = 1  # over each chunk
    tail: np.ndarray | None = None  # sum of the parameters after each step of the second half
    tail_steps: int = 0

    @classmethod
    def start(cls, params: np.ndarray, plan: RunPlan | None = None) -> LocalState:
        """A run's start from ``params``, with its ``plan`` (:func:`plan_run`)."""
        params = np.array(params, dtype=np.float64, order="C")
        plan = plan or RunPlan()
        return cls(params, np.zeros_like(params), np.zeros_like(params),
                   epochs=plan.epochs, planned=plan.steps)


@dataclass
class MetricSum:
    """Row-weighted sum of scale-normalised metrics, and what was fitted; adds across runs."""

    total: np.ndarray
    weight: float
    loss: float = 0.0
    count: int = 0
    skipped: int = 0

    def __add__(self, other: MetricSum) -> MetricSum:
        return MetricSum(self.total + other.total, self.weight + other.weight,
                         self.loss + other.loss, self.count + other.count,
                         self.skipped + other.skipped)

    def average(self) -> np.ndarray:
        """The averaged metric (mean eigenvalue 1)."""
        return self.total / self.weight


#: Where the first pass's negative draws start (``negative_partners``' ``epoch``, one per
#: batch): apart from the full passes' draws, which count epochs from 0.
LOCAL_NEGATIVES_DRAW = 1 << 40


def local_runs(rows: list[int], run_rows: int, seed: int) -> list[list[int]]:
    """The chunks of each run, in the order the run visits them.

    Consecutive chunks until a run holds ``run_rows`` rows; a last run under half that joins
    the one before. Within a run the order is drawn from ``(seed, run)``: a store written in
    sorted order (by class, by source) must not end every run on one kind of pair.
    """
    runs: list[list[int]] = [[]]
    held = 0
    for i, r in enumerate(rows):
        if held >= run_rows:
            runs.append([])
            held = 0
        runs[-1].append(i)
        held += r
    if len(runs) > 1 and held < run_rows / 2:
        runs[-2].extend(runs.pop())
    out = []
    for k, run in enumerate(runs):
        rng = np.random.default_rng([int(seed), 0x10CA1, k])
        out.append([run[j] for j in rng.permutation(len(run))])
    return [run for run in out if run]


def local_steps(x: np.ndarray, y: np.ndarray, t: np.ndarray, state: LocalState,
                form: Parameterisation, loss: Loss, fit: LocalFit, *, seed: int, chunk: int,
                include: np.ndarray | None = None, negatives: int = 0,
                positive_weight: int = 1) -> LocalState:
    """Adam over mini-batches of one chunk's ``include``d rows (all when None), continuing
    ``state``; returns the new state (``state`` is not changed).

    The batches are a permutation drawn from ``(seed, chunk)`` alone (per epoch: the state
    says how many). With ``negatives`` K, each batch's positive pairs get K negatives made
    inside the batch (:func:`~cosim_dask.core.negatives.negative_partners`, drawn from
    ``(seed, chunk)`` and the batch's number), weighed as a full pass weighs them
    (``positive_weight``): the first pass fits the objective the full passes compute, not
    the positives alone, which every similarity of 1 would fit. Invalid pairs are
    skipped here (counted in ``skipped``); the caller decides whether that is an error.
    The state's ``loss`` adds up the mini-batch losses of each chunk's last epoch; its
    ``tail`` the parameters after every step past half the run's planned steps.
    """
    rows = np.flatnonzero(include) if include is not None else np.arange(len(x))
    params, m1, m2, step = state.params.copy(), state.m1.copy(), state.m2.copy(), state.step
    total, count, skipped = state.loss, state.count, state.skipped
    tail, tail_steps = (None if state.tail is None else state.tail.copy()), state.tail_steps
    rng = np.random.default_rng([int(seed), 0x10CA1, 0xC4, int(chunk)])
    batches = 0
    for epoch in range(state.epochs):
        order = rows[rng.permutation(len(rows))]
        last = epoch == state.epochs - 1
        for lo in range(0, len(order), fit.batch_rows):
            # Sorted indices gather the rows forwards (faster); the batch is the same set.
            batch = np.sort(order[lo: lo + fit.batch_rows])
            xb, yb = gather_rows(x, y, batch)
            if negatives:
                partners = negative_partners(t[batch] > 0, negatives, seed, chunk,
                                             LOCAL_NEGATIVES_DRAW + batches)
                p = form.negatives_partial(xb, yb, t[batch], params, loss, partners,
                                           positive_weight=positive_weight, on_invalid="skip")
            else:
                p = form.chunk_partial(xb, yb, t[batch], params, loss, on_invalid="skip")
            batches += 1
            if last:
                total, count, skipped = total + p.loss, count + p.count, skipped + p.skipped
            if p.count == 0:
                continue
            grad = p.grad / p.count
            step += 1
            m1 = fit.beta1 * m1 + (1 - fit.beta1) * grad
            m2 = fit.beta2 * m2 + (1 - fit.beta2) * grad * grad
            m1_hat = m1 / (1 - fit.beta1**step)
            m2_hat = m2 / (1 - fit.beta2**step)
            scale = max(np.sqrt(np.mean(params**2)), 1e-12)
            params = form.project(params - fit.lr * scale * m1_hat / (np.sqrt(m2_hat) + fit.eps))
            if 2 * step > state.planned:
                tail = params.copy() if tail is None else tail + params
                tail_steps += 1
    return LocalState(params, m1, m2, step, total, count, skipped, state.planned,
                      state.epochs, tail, tail_steps)


def gather_rows(x: np.ndarray, y: np.ndarray, rows: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """``x[rows]`` and ``y[rows]`` in this thread's reused buffers (valid until the next call).

    A fresh 4 MiB batch every step is page-faulted in, and evicts the cache the kernel then
    reads it back through: gathering into the same buffers instead made the first pass's
    steps 13-15% faster (d = 128, batches of 8,192, one thread).
    """
    bufs = []
    for name, a in (("x", x), ("y", y)):
        out = scratch_array(("batch", name), (len(rows), a.shape[1]), a.dtype)
        bufs.append(take_rows(a, rows, out))
    return bufs[0], bufs[1]


#: Most epochs over each chunk that small data gets (``LocalFit.min_steps``).
MAX_EPOCHS = 16


@dataclass(frozen=True)
class RunPlan:
    """A run's epochs over each chunk and its steps (about: the second half is averaged)."""

    epochs: int = 1
    steps: int = 0


def plan_run(rows: int, validation: float, fit: LocalFit, d: int) -> RunPlan:
    """The plan of a run over ``rows`` rows at dimension ``d``: ``fit.epochs``, or more (up
    to MAX_EPOCHS) until the run takes ``max(min_steps, steps_per_dim · d)`` steps."""
    per_epoch = max(1, round(rows * (1.0 - validation) / fit.batch_rows))
    wanted = max(fit.min_steps, math.ceil(fit.steps_per_dim * d))
    epochs = max(fit.epochs, min(MAX_EPOCHS, -(-wanted // per_epoch)))
    return RunPlan(epochs, epochs * per_epoch)


def metric_sum(state: LocalState, form: Parameterisation) -> MetricSum:
    """A finished run's metric (of its second-half average parameters; along one run the
    factor keeps its gauge, so averaging M is sound there), scale-normalised and weighted by
    the rows it fitted."""
    params = state.tail / state.tail_steps if state.tail_steps else state.params
    A = form.metric(params)
    A = 0.5 * (A + A.T)
    mean_eig = np.trace(A) / A.shape[0]
    weight = float(state.count)
    ok = np.isfinite(A).all() and np.isfinite(mean_eig) and mean_eig > 0
    normalised = A / mean_eig if ok else np.full_like(A, np.nan)
    return MetricSum(weight * normalised, weight, state.loss, state.count, state.skipped)


def params_from_metric(form: Parameterisation, A: np.ndarray) -> np.ndarray:
    """Parameters whose metric is ``A`` (the best rank-k factor for the factor form)."""
    return form.project(form.initial(A.shape[0], A0=A))
