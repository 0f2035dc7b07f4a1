"""cosim-dask: learn a cosine-similarity metric sim(x, y; A) = xᵀAy / sqrt(xᵀAx · yᵀAy)
from labelled pairs, out of core on Dask."""

from importlib.metadata import PackageNotFoundError, version

from .errors import CosimError
from .estimator import CosineMetricLearner
from .kernel import (
    Partial,
    chunk_partial,
    factor_chunk_partial,
    loss_and_gradient,
    pair_similarity,
    tied_gradient,
)
from .losses import get_loss
from .metric import FactorMetric, FullMetric, project_psd
from .solvers import get_solver

try:
    __version__ = version("cosim-dask")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CosimError",
    "CosineMetricLearner",
    "FactorMetric",
    "FullMetric",
    "Partial",
    "__version__",
    "chunk_partial",
    "factor_chunk_partial",
    "get_loss",
    "get_solver",
    "loss_and_gradient",
    "pair_similarity",
    "project_psd",
    "tied_gradient",
]
