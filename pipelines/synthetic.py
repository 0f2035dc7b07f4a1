"""Demo: learn a hidden cosine metric from generated pairs, in memory, with the NumPy core.

Run with `make demo`. Later stages of the project grow this into the full Dask pipeline.
"""

from __future__ import annotations

import time

import numpy as np

from cosim_dask import pair_similarity
from cosim_dask.metric import FullMetric
from cosim_dask.objective import InMemoryPairs, Objective
from cosim_dask.solvers import get_solver
from cosim_dask.synthetic import synthetic_pairs


def main(n_pairs: int = 100_000, dim: int = 32, rank: int = 4, steps: int = 40) -> None:
    x, y, t, A_star = synthetic_pairs(n_pairs, dim, rank=rank, noise=0.02, seed=0)
    train, test = slice(0, int(0.8 * n_pairs)), slice(int(0.8 * n_pairs), n_pairs)
    form = FullMetric()
    objective = Objective(form, InMemoryPairs(x[train], y[train], t[train], form, "mse"))
    solver = get_solver("lbfgs")
    started = time.perf_counter()
    info = solver.start(np.eye(dim), objective)
    print(f"{n_pairs:,} pairs, d={dim}, hidden metric of rank {rank}")
    print(f"step {0:3d}  loss {info.loss:.6f}  |grad| {info.grad_norm:.2e}")
    for step in range(1, steps + 1):
        info = solver.step(objective, form.project)
        if step % 5 == 0 or step == steps:
            print(f"step {step:3d}  loss {info.loss:.6f}  |grad| {info.grad_norm:.2e}")
    elapsed = time.perf_counter() - started
    A = solver.params
    rows = []
    for name, metric in (("plain cosine (A = I)", None), ("learned A", A)):
        s = pair_similarity(x[test], y[test], metric)
        mse = float(np.mean((s - t[test]) ** 2))
        corr = float(np.corrcoef(s, t[test])[0, 1])
        rows.append((name, mse, corr))
    print(f"\nheld-out pairs ({len(t[test]):,}); trained in {elapsed:.1f} s")
    print(f"{'metric':24s} {'MSE':>10s} {'Pearson r':>10s}")
    for name, mse, corr in rows:
        print(f"{name:24s} {mse:10.5f} {corr:10.4f}")
    cos = np.sum(A * A_star) / np.linalg.norm(A) / np.linalg.norm(A_star)
    print(f"cosine between learned A and hidden A*: {cos:.4f}")


if __name__ == "__main__":
    main()
