"""The training objective: partial sums over pairs → mean loss + regularisation, and gradient.

Where the partial sums come from (in-process chunks here, Dask tasks in :mod:`cosim_dask.step`)
is behind one callable, ``partial_sum(params, batch) -> Partial``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidPairsError
from .kernel import Partial, as_pair_arrays, combine_partials
from .losses import Loss
from .metric import Parameterisation

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


def split_rows(n: int, chunk_rows: int) -> list[slice]:
    """Row slices of at most ``chunk_rows`` covering ``range(n)``."""
    return [slice(lo, min(lo + chunk_rows, n)) for lo in range(0, n, chunk_rows)]


def sample_chunks(n_chunks: int, batch_chunks: int, seed: int, batch: int) -> list[int]:
    """The chunks of mini-batch number ``batch``: seeded, so a resumed run draws the same."""
    rng = np.random.default_rng([seed, batch])
    k = min(batch_chunks, n_chunks)
    return sorted(rng.choice(n_chunks, size=k, replace=False).tolist())


@dataclass
class InMemoryPairs:
    """Partial sums over in-memory arrays, chunk by chunk, in this process."""

    x: np.ndarray
    y: np.ndarray
    target: np.ndarray
    parameterisation: Parameterisation
    loss: Loss | str = "mse"
    chunk_rows: int = 65536
    batch_chunks: int | None = None
    seed: int = 0
    on_invalid: str = "raise"
    chunks: Sequence[slice] = field(init=False)

    def __post_init__(self) -> None:
        self.x, self.y, self.target = as_pair_arrays(self.x, self.y, self.target)
        self.chunks = split_rows(len(self.x), self.chunk_rows)

    def __call__(self, params: np.ndarray, batch: int | None = None) -> Partial:
        if batch is None or self.batch_chunks is None:
            chosen = range(len(self.chunks))
        else:
            chosen = sample_chunks(len(self.chunks), self.batch_chunks, self.seed, batch)
        return combine_partials([
            self.parameterisation.chunk_partial(
                self.x[self.chunks[i]], self.y[self.chunks[i]], self.target[self.chunks[i]],
                params, self.loss, on_invalid=self.on_invalid, chunk_id=i,
            )
            for i in chosen
        ])
