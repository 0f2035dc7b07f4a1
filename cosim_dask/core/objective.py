"""The training objective: partial sums over pairs → mean loss + regularisation, and gradient.

Where the partial sums come from (in-process chunks, or Dask tasks in
:mod:`cosim_dask.dist.passes`) is behind one callable, ``partial_sum(params, batch) -> Partial``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cosim_dask.core.forms import Parameterisation
from cosim_dask.core.kernel import Partial
from cosim_dask.core.local import LocalFit, params_from_metric
from cosim_dask.errors import InvalidPairsError

PartialSum = Callable[[np.ndarray, int | None], Partial]


@dataclass
class Objective:
    """Mean loss over the pairs plus λ‖A − A₀‖²_F; remembers the last pass's counts."""

    parameterisation: Parameterisation
    partial_sum: PartialSum
    regularization: float = 0.0
    A0: np.ndarray | None = None
    last_count: int = field(default=0, init=False)
    last_skipped: int = field(default=0, init=False)
    evaluations: int = field(default=0, init=False)

    def __call__(self, params: np.ndarray, batch: int | None = None) -> tuple[float, np.ndarray]:
        partial = self.partial_sum(params, batch)
        self.evaluations += 1
        self.last_count, self.last_skipped = partial.count, partial.skipped
        if partial.count == 0:
            raise InvalidPairsError(
                "no valid pairs to train on: every pair was skipped as invalid"
            )
        reg_value, reg_grad = self.parameterisation.regularization(
            params, self.regularization, self.A0
        )
        loss = partial.loss / partial.count + reg_value
        grad = partial.grad / partial.count + reg_grad
        return loss, grad

    def local_average(self, params: np.ndarray, fit: LocalFit) -> np.ndarray:
        """One pass of local fits from ``params`` (the ``partial_sum``'s ``local_fit``):
        the parameters of the averaged metric. The regularisation is not part of the local
        fits; the full-batch steps that follow see it."""
        fitted = self.partial_sum.local_fit(params, fit)
        self.evaluations += 1
        self.last_count, self.last_skipped = fitted.count, fitted.skipped
        if fitted.count == 0:
            raise InvalidPairsError(
                "no valid pairs to train on: every pair was skipped as invalid"
            )
        average = fitted.average()
        if not np.isfinite(average).all():  # a run's fit ran off: the caller's check says so
            return np.full_like(np.asarray(params, dtype=np.float64), np.nan)
        return params_from_metric(self.parameterisation, average)

    def validate_ahead(self, params: np.ndarray) -> bool:
        """Score the validation rows at ``params`` now, ahead of the full pass there, when
        the ``partial_sum`` can (its ``validate_ahead``; the figures go to its
        ``last_validation``): True when it did."""
        ahead = getattr(self.partial_sum, "validate_ahead", None)
        return bool(ahead is not None and ahead(params))
