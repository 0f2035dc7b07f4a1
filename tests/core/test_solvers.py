"""Solvers drive the loss down on an in-memory problem and checkpoint their state exactly."""

import numpy as np
import pytest

from cosim_dask.core.forms import FactorMetric, FullMetric
from cosim_dask.core.objective import Objective
from cosim_dask.core.solvers import SOLVERS, get_solver
from cosim_dask.data.synthetic import synthetic_pairs
from cosim_dask.dist.passes import LocalPairs
from cosim_dask.errors import UnknownNameError


def problem(form, batch_chunks=None):
    x, y, t, A_star = synthetic_pairs(6000, 8, rank=3, noise=0.0, seed=3, chunk_rows=1000)
    pairs = LocalPairs(x, y, t, form, "mse", chunk_rows=1000, batch_chunks=batch_chunks)
    return Objective(form, pairs), A_star


def run(solver, objective, form, params, steps):
    solver.start(params, objective)
    for _ in range(steps):
        solver.step(objective, form.project)
    return solver


@pytest.mark.parametrize("name,steps", [("lbfgs", 40), ("gd", 60), ("adam", 150)])
def test_solvers_reduce_the_loss(name, steps):
    form = FullMetric()
    objective, _ = problem(form, batch_chunks=2 if name == "adam" else None)
    start, _ = objective(np.eye(8))
    solver = run(get_solver(name, lr=0.05 if name == "adam" else None), objective, form,
                 np.eye(8), steps)
    final, _ = objective(solver.params, None)
    assert final < 0.5 * start
    assert np.linalg.eigvalsh(solver.params)[0] >= 1e-6 - 1e-12  # stayed PSD


def test_lbfgs_recovers_hidden_metric_up_to_scale():
    form = FullMetric()
    objective, A_star = problem(form)
    solver = run(get_solver("lbfgs"), objective, form, np.eye(8), 80)
    A = solver.params
    cos = np.sum(A * A_star) / np.linalg.norm(A) / np.linalg.norm(A_star)
    assert cos > 0.99


def test_factor_form_trains():
    form = FactorMetric(rank=3)
    objective, _ = problem(form)
    M0 = form.initial(8, seed=0)
    start, _ = objective(M0)
    solver = run(get_solver("lbfgs"), objective, form, M0, 40)
    assert objective(solver.params)[0] < 0.3 * start


@pytest.mark.parametrize("name", list(SOLVERS))
def test_state_round_trip_continues_identically(name):
    form = FullMetric()
    objective, _ = problem(form, batch_chunks=2)
    a = run(get_solver(name), objective, form, np.eye(8), 6)
    state = {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in a.state().items()}
    b = get_solver(name)
    b.restore(state)
    for _ in range(4):
        a.step(objective, form.project)
        b.step(objective, form.project)
    np.testing.assert_array_equal(a.params, b.params)


def test_unknown_solver():
    with pytest.raises(UnknownNameError,
                       match="unknown solver 'sgd'; choose one of: stream.lbfgs, lbfgs, gd"):
        get_solver("sgd")



@pytest.mark.parametrize("name", ["lbfgs", "stream+lbfgs"])
def test_a_fortran_ordered_start_resumes_to_the_same_bits(name):
    """A checkpoint restores C-ordered arrays; a start in Fortran order (eigh's factors are)
    must take the same steps: NumPy's norms and sums run in memory order, and a resumed run
    drifted from an uninterrupted one by ulps. Twenty starts: a single one rounds the same
    way in either order about four times in five."""
    form = FactorMetric(rank=5)
    objective, _ = problem(form)
    for seed in range(20):
        B = np.random.default_rng(seed).standard_normal((8, 8))
        M0 = form.initial(8, A0=B @ B.T)
        assert M0.flags.c_contiguous
        a = get_solver(name)
        a.start(np.asfortranarray(M0), objective)
        b = get_solver(name)
        b.restore({k: np.ascontiguousarray(v) if isinstance(v, np.ndarray) else v
                   for k, v in a.state().items()})
        a.step(objective, form.project)
        b.step(objective, form.project)
        np.testing.assert_array_equal(a.params, b.params)
