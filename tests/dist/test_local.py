"""The streaming first pass (``stream+lbfgs``, the default solver): runs of chunks fitted by
mini-batch Adam and averaged. Same result in this process and on the shared 2-worker
cluster, persisted or streamed from a store; its passes counted; and on a small problem it
reaches the plain L-BFGS optimum's held-out AUC within two passes."""

from dataclasses import replace

import dask.array as da
import numpy as np
import pytest
import zarr
from threadpoolctl import threadpool_limits

from cosim_dask.core.forms import FactorMetric, FullMetric
from cosim_dask.core.local import MAX_EPOCHS, LocalFit, RunPlan, local_runs, plan_run
from cosim_dask.core.objective import Objective
from cosim_dask.core.solvers import get_solver
from cosim_dask.data.synthetic import synthetic_chunk, synthetic_pairs
from cosim_dask.dist import passes
from cosim_dask.dist.passes import (
    DaskPairs,
    LocalPairs,
    persisted_pieces,
    store_pieces,
    task_groups,
)
from cosim_dask.dist.tasks import score_rows
from cosim_dask.errors import InvalidPairsError
from cosim_dask.fit.config import TrainConfig
from cosim_dask.fit.loop import run_solver, state_from_attrs, state_to_attrs

#: Small runs so that 6,000 pairs in chunks of 500 make several runs.
FIT = LocalFit(run_rows=2000, batch_rows=256, min_steps=16)


@pytest.fixture(scope="module")
def data():
    x, y, t, _ = synthetic_pairs(6000, 8, rank=3, seed=4, targets="binary", noise=0.2)
    return x, y, t


def test_runs_cover_every_chunk_once_in_a_seeded_order():
    rows = [500] * 11 + [120]
    runs = local_runs(rows, 2000, seed=0)
    assert sorted(i for run in runs for i in run) == list(range(12))
    assert [len(run) for run in runs] == [4, 4, 4]  # the short tail joined the last run
    assert all(sorted(run) == list(range(4 * k, 4 * k + 4)) for k, run in enumerate(runs))
    assert local_runs(rows, 2000, seed=0) == runs
    assert local_runs(rows, 2000, seed=1) != runs
    assert local_runs([10], 2000, seed=0) == [[0]]
    # Small data and large d take more epochs, up to the cap, to make their steps.
    assert plan_run(1_000_000, 0.0, LocalFit(), 16) == RunPlan(epochs=1, steps=122)
    assert plan_run(1_000_000, 0.0, LocalFit(), 512) == RunPlan(epochs=3, steps=366)
    assert plan_run(40_000, 0.0, LocalFit(), 16).epochs == 13
    assert plan_run(1_000, 0.0, LocalFit(), 16).epochs == MAX_EPOCHS


def test_task_groups_cut_a_run_into_consecutive_chunks_of_about_the_rows():
    assert task_groups([500] * 4, 1000) == [(0, 2), (2, 4)]
    assert task_groups([500] * 5, 1000) == [(0, 2), (2, 4), (4, 5)]
    assert task_groups([500, 300, 900, 100], 1000) == [(0, 3), (3, 4)]
    assert task_groups([5000, 10], 1000) == [(0, 1), (1, 2)]  # never an empty group
    assert task_groups([500] * 3, 10**9) == [(0, 3)]


def local_pairs(data, form, **kw):
    x, y, t = data
    return LocalPairs(x, y, t, form, "mse", chunk_rows=500, **kw)


@pytest.mark.parametrize("form,negatives", [(FactorMetric(), 0), (FullMetric(), 0),
                                            (FactorMetric(), 3), (FullMetric(), 3)])
def test_first_pass_same_in_process_and_on_the_cluster(client, data, form, negatives):
    x, y, t = data
    start = form.initial(8)
    with threadpool_limits(limits=1):  # as the workers run
        local = local_pairs(data, form, validation=0.2, seed=3,
                            negatives=negatives).local_fit(start, FIT)
    pieces = persisted_pieces(client, *(da.from_array(a, chunks=(500,) + a.shape[1:])
                                        for a in (x, y, t)))
    remote = DaskPairs(client, pieces, form, "mse", validation=0.2, seed=3, negatives=negatives)
    fitted = remote.local_fit(start, FIT)
    assert fitted.count == local.count
    if not negatives:  # (with negatives, count is of the augmented pairs)
        assert local.count < 6000  # the validation rows were not fitted
    np.testing.assert_allclose(fitted.total, local.total, rtol=1e-12, atol=1e-12)
    assert fitted.weight == local.weight
    assert remote.passes == 1.0
    again = remote.local_fit(start, FIT)
    np.testing.assert_array_equal(again.total, fitted.total)  # run to run: the same bits
    other = local_pairs(data, form, validation=0.2, seed=4,
                        negatives=negatives).local_fit(start, FIT)
    assert not np.allclose(other.total, local.total)  # the seed matters


@pytest.mark.parametrize("task_rows", [500, 1000, 1500, 10**9])
def test_first_pass_streamed_from_a_store(client, data, tmp_path, monkeypatch, task_rows):
    # A task per chunk, per two chunks, per uneven groups, per run: the same fit.
    monkeypatch.setattr(passes, "LOCAL_TASK_ROWS", task_rows)
    root = zarr.open_group(tmp_path / "s.zarr", mode="w")
    for name, a in zip(("x", "y", "target"), data, strict=True):
        root.create_array(name, shape=a.shape, dtype=a.dtype,
                          chunks=(500,) + a.shape[1:])[...] = a
    slices = [slice(lo, lo + 500) for lo in range(0, 6000, 500)]
    streamed = DaskPairs(client, store_pieces(str(tmp_path / "s.zarr"), slices),
                         FactorMetric(), "mse")
    with threadpool_limits(limits=1):
        local = local_pairs(data, FactorMetric()).local_fit(np.eye(8), FIT)
    np.testing.assert_allclose(streamed.local_fit(np.eye(8), FIT).total, local.total,
                               rtol=1e-12, atol=1e-12)


def test_invalid_pairs_raise_in_the_first_pass(data):
    x, y, t = (a.copy() for a in data)
    x[1234] = 0.0
    with pytest.raises(InvalidPairsError, match="chunk 2"):
        local_pairs((x, y, t), FactorMetric()).local_fit(np.eye(8), FIT)


def held_auc(form, params, held):
    stats = score_rows(*held, form.metric(params), TrainConfig().make_loss(binary=True))
    return stats.auc()


def test_reaches_the_lbfgs_optimum_within_two_passes():
    """On a small problem: the first pass's average (reported by step 0 after that one pass)
    is within 0.001 held-out AUC of plain L-BFGS run to convergence; the run stops on its
    validation figures before it, still there, and every step records its passes."""
    x, y, t, A_star = synthetic_pairs(30_000, 16, rank=4, noise=0.3, targets="binary", seed=2)
    held = synthetic_chunk(20_000, A_star, noise=0.3, targets="binary", seed=2, chunk=99)
    config = TrainConfig(validation=0.1, steps=40)
    form = config.make_parameterisation()
    results = {}
    for name in ("lbfgs", "stream+lbfgs"):
        source = LocalPairs(x, y, t, form, config.make_loss(binary=True), chunk_rows=5000,
                            validation=0.1)
        solver = get_solver(name)
        seen = []
        state = run_solver(Objective(form, source), solver, form.initial(16), config,
                           on_step=lambda r, s=solver, seen=seen: seen.append(
                               (r["passes"], held_auc(form, s.params, held))))
        results[name] = state, seen
    optimum = results["lbfgs"][1][-1][1]
    state, seen = results["stream+lbfgs"]
    # Step 0 reports the first pass's average after that one pass (its validation rows are
    # scored ahead of the full pass at it, which opens step 1).
    assert seen[0][0] == 1.0 and seen[0][1] >= optimum - 0.001
    assert seen[1][0] == 3.0
    assert state.history[0]["loss"] is None and state.history[0]["val_auc"] is not None
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    assert seen[-1][1] >= optimum - 0.001
    assert state.passes == seen[-1][0] < results["lbfgs"][0].passes
    assert "gained" in state.stop_reason and "<= 0.0003" in state.stop_reason


def test_graded_targets_reach_the_optimum_mse_within_one_percent_in_two_passes():
    """Graded targets get their own first-pass fit: on low-noise graded pairs the first
    pass's average, which step 0 reports after one pass, is within 1 % of plain L-BFGS's
    held-out MSE, where the binary labels' fit stops several percent short; the estimator
    picks it from y, ends within 1 % and stops on its validation figures."""
    x, y, t, A_star = synthetic_pairs(60_000, 32, rank=8, noise=0.02, targets="graded", seed=5)
    held = synthetic_chunk(20_000, A_star, noise=0.02, targets="graded", seed=5, chunk=99)
    config = TrainConfig(validation=0.1, steps=60)
    form, loss = config.make_parameterisation(), config.make_loss(binary=False)

    def held_mse(A):
        return score_rows(*held, A, loss).mean_loss

    def last_step(solver, steps):
        source = LocalPairs(x, y, t, form, loss, chunk_rows=10_000, validation=0.1)
        seen = []
        run_solver(Objective(form, source), solver, form.initial(32), replace(config, steps=steps),
                   on_step=lambda r, s=solver: seen.append(
                       (r["passes"], held_mse(form.metric(s.params)))))
        return seen[-1]

    _, optimum = last_step(get_solver("lbfgs"), 60)
    passes, graded = last_step(config.make_solver(binary=False), 0)
    _, binary_fit = last_step(config.make_solver(binary=True), 0)
    assert passes == 1.0
    assert graded <= 1.01 * optimum < binary_fit

    from cosim_dask.estimator import CosineMetricLearner

    model = CosineMetricLearner(validation=0.1, chunk_rows=10_000, cluster="never")
    with threadpool_limits(1):
        model.fit(np.stack([x, y], axis=1), t)
    assert not model.targets_binary_
    assert held_mse(model.metric_) <= 1.01 * optimum
    assert model.history_[0]["passes"] == 1.0 and "gained" in model.stop_reason_
    # Its step 0 (the first pass's average) was already within 1 % of where it ended.
    assert model.history_[0]["val_loss"] <= 1.01 * model.history_[-1]["val_loss"]


def test_positive_pairs_first_pass_fits_their_negatives_too():
    """Positive pairs with in-chunk negatives: the first pass's mini-batches get their
    negatives as the full passes do, so its average is near the optimum of that objective
    (the positives alone would pull every similarity to 1: 80 % above it on larger data),
    the same for every run of the same seed, and different for another seed."""
    x, y, t, _ = synthetic_pairs(60_000, 16, rank=4, noise=0.1, targets="binary", seed=7)
    x, y = x[t > 0], y[t > 0]
    ones = np.ones(len(x))
    config = TrainConfig(negatives=4)
    form, loss = config.make_parameterisation(), config.make_loss(binary=True)

    def run(solver, steps, seed=0):
        source = LocalPairs(x, y, ones, form, loss, chunk_rows=5000, seed=seed, negatives=4,
                            positive_weight=config.positive_weight)
        state = run_solver(Objective(form, source), solver, form.initial(16),
                           replace(config, steps=steps, seed=seed))
        return state.history, solver.params

    optimum = run(get_solver("lbfgs"), 40)[0][-1]["loss"]
    history, params = run(config.make_solver(binary=True), 0)
    assert history[0]["passes"] == 2.0  # the first pass, then the full pass at its average
    assert history[0]["loss"] <= 1.01 * optimum
    again = run(config.make_solver(binary=True), 0)[1]
    np.testing.assert_array_equal(again, params)
    assert not np.allclose(run(config.make_solver(binary=True), 0, seed=1)[1], params)


class SpiedPairs(LocalPairs):
    """LocalPairs noting what each pass it runs computes (the work itself unchanged)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.runs = []

    def run(self, params, spec, chunks):
        self.runs.append((np.array(params), spec.with_train, spec.with_validation))
        return super().run(params, spec, chunks)


def test_step_0_reports_the_average_before_the_full_pass_at_it(data):
    """Step 0 comes after the first pass and a pass over the validation rows alone, with the
    average's figures; step 1 opens with the full pass at the average, which does not score
    the validation rows again; later passes do."""
    form = FactorMetric()
    source = SpiedPairs(*data, form, "mse", chunk_rows=500, validation=0.2)
    records = []
    run_solver(Objective(form, source), get_solver("stream+lbfgs", fit=FIT), form.initial(8),
               TrainConfig(validation=0.2, steps=3, tol=0),
               on_step=lambda r: records.append((dict(r), len(source.runs))))
    first, runs_by_then = records[0]
    assert runs_by_then == 1 and source.runs[0][1:] == (False, True)
    average = source.runs[0][0]
    assert first["passes"] == 1.0 and first["evaluations"] == 1
    assert first["loss"] is None and first["grad_norm"] is None
    expected = source.validate(average)  # scored afresh: the same figures
    assert first["val_auc"] == expected.auc() and first["val_loss"] == expected.mean_loss
    params, with_train, with_validation = source.runs[1]
    assert np.array_equal(params, average) and with_train and not with_validation
    step_1, runs_by_then = records[1]
    assert all(v for _, _, v in source.runs[2:runs_by_then])
    # Step 1's passes: every run since the validation rows' own (runs[0]).
    assert step_1["loss"] is not None and step_1["evaluations"] == runs_by_then - 1 >= 2
    assert step_1["passes"] == runs_by_then


def test_without_validation_rows_step_0_has_the_full_pass(data):
    form = FactorMetric()
    source = local_pairs(data, form)
    state = run_solver(Objective(form, source), get_solver("stream+lbfgs", fit=FIT),
                       form.initial(8), TrainConfig(validation=0.0, steps=1))
    first = state.history[0]
    assert first["passes"] == 2.0 and first["evaluations"] == 2
    assert first["loss"] is not None and first["grad_norm"] is not None


def test_no_steps_still_leave_a_solver_state_that_resumes_exactly(data):
    """A run of 0 steps takes the full pass at the average before it ends, so its solver
    state resumes to the very steps of a run that went on."""
    form = FactorMetric()
    config = TrainConfig(validation=0.2, steps=3, tol=0)

    def objective():
        return Objective(form, local_pairs(data, form, validation=0.2))

    whole = get_solver("stream+lbfgs", fit=FIT)
    run_solver(objective(), whole, form.initial(8), config)
    first = get_solver("stream+lbfgs", fit=FIT)
    state = run_solver(objective(), first, form.initial(8), replace(config, steps=0))
    assert state.step == 0 and state.passes == 2.0 and first.grad is not None
    resumed = get_solver("stream+lbfgs", fit=FIT)
    resumed.restore(first.state())
    state = run_solver(objective(), resumed, None, config,
                       state=state_from_attrs(state_to_attrs(state)))  # as a checkpoint
    assert state.step == 3
    np.testing.assert_array_equal(resumed.params, whole.params)
