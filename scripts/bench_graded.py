#!/usr/bin/env python3
"""The streaming first pass on graded targets: how close its average gets to the optimum.

On synthetic graded pairs (rank 8, seeded), for each first-pass fit given (the binary
default `LocalFit()`, the graded default `GRADED_FIT`, and any extra JSON settings), prints
the held-out MSE of the first pass's average against a reference: L-BFGS polished for
`--ref-steps` steps from the best average, as a ratio (+0.5 % means 0.5 % above the
reference), and the first pass's time on one BLAS thread. The reference is computed in the
same run, so the figures compare fits rather than machines.

Usage: python scripts/bench_graded.py [--pairs N] [--dim D] [--noise S] [--ref-steps K]
                                      [--fit '{"batch_rows": 4096, "lr": 0.5}' ...]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
from threadpoolctl import threadpool_limits

from cosim_dask.core.forms import FactorMetric
from cosim_dask.core.local import GRADED_FIT, LocalFit
from cosim_dask.core.losses import get_loss
from cosim_dask.core.objective import Objective
from cosim_dask.core.solvers import get_solver
from cosim_dask.data.synthetic import synthetic_pairs
from cosim_dask.dist.passes import LocalPairs
from cosim_dask.dist.tasks import score_rows

HELD_OUT = 50_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=600_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--ref-steps", type=int, default=20)
    parser.add_argument("--fit", action="append", default=[],
                        help="extra LocalFit settings as JSON (repeatable)")
    args = parser.parse_args()
    threadpool_limits(1)

    n, d = args.pairs, args.dim
    x, y, t, _ = synthetic_pairs(n + HELD_OUT, d, rank=8, noise=args.noise, targets="graded",
                                 seed=5)
    held = x[n:], y[n:], t[n:]
    form, loss = FactorMetric(), get_loss("mse")
    source = LocalPairs(x[:n], y[:n], t[:n], form, loss,
                        chunk_rows=65_536 if n <= 500_000 else 32_768, validation=0.1, seed=0)
    objective = Objective(form, source)

    def held_mse(params: np.ndarray) -> float:
        return score_rows(*held, form.metric(params), loss).mean_loss

    fits = {"binary default": LocalFit(), "GRADED_FIT": GRADED_FIT}
    fits.update({text: replace(LocalFit(), **json.loads(text)) for text in args.fit})
    results = {}
    for name, fit in fits.items():
        start = time.perf_counter()
        average = objective.local_average(np.eye(d), fit)
        results[name] = held_mse(average), time.perf_counter() - start, average
    best = min(results.values(), key=lambda r: r[0])[2]
    solver = get_solver("lbfgs")
    solver.start(best, objective)
    for _ in range(args.ref_steps):
        solver.step(objective, form.project)
    reference = held_mse(solver.params)

    print(f"{n} pairs x {d}, noise {args.noise}: reference held-out MSE {reference:.6f} "
          f"(L-BFGS, {args.ref_steps} steps from the best average)")
    for name, (mse, seconds, _) in results.items():
        print(f"  {name:40s} {100 * (mse / reference - 1):+6.2f} %  {seconds:5.1f} s")


if __name__ == "__main__":
    main()
