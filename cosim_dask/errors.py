"""One error hierarchy for the package; the CLI turns each into one line and a non-zero exit."""

from __future__ import annotations


class CosimError(ValueError):
    """Base of every error cosim-dask raises on purpose (bad input, bad state)."""


class InvalidPairsError(CosimError):
    """Pairs whose similarity is undefined: zero, NaN/Inf vectors or xᵀAx ≤ 0."""


class ShapeError(CosimError):
    """Arrays whose shapes or dtypes do not fit together."""


class UnknownNameError(CosimError):
    """A loss, solver or other registry entry that does not exist."""


class StoreError(CosimError):
    """A pair store that is missing, malformed or cannot be written."""


class ModelError(CosimError):
    """A model file that is missing, malformed or does not fit the data."""


class TrainingError(CosimError):
    """Training that cannot start or cannot go on (diverged, bad resume, ...)."""


class ClusterError(CosimError):
    """A Dask cluster that cannot be reached or started."""


class SchedulerLostError(ClusterError):
    """The Dask scheduler went away or stopped answering during a run."""


class WorkerLostError(ClusterError):
    """A worker left while a request needed every worker (a broadcast); the request is
    repeated."""


class DivergedError(TrainingError):
    """A solver whose parameters ran off (inf/nan, or a degenerate metric): the step size is
    too large for the problem, not the data at fault."""
