"""cosim-dask: learn a cosine-similarity metric sim(x, y; A) = xᵀAy / sqrt(xᵀAx · yᵀAy)
from labelled pairs, out of core on Dask."""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

# First: the modules below read it while the package is being imported.
try:
    __version__ = version("cosim-dask")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from cosim_dask.core.forms import FactorMetric, FullMetric, project_psd
from cosim_dask.core.kernel import (
    Partial,
    chunk_partial,
    factor_chunk_partial,
    loss_and_gradient,
    pair_similarity,
    tied_gradient,
)
from cosim_dask.core.losses import get_loss
from cosim_dask.core.solvers import get_solver
from cosim_dask.errors import CosimError

if TYPE_CHECKING:
    from cosim_dask.estimator import CosineMetricLearner


def __getattr__(name: str):
    # The estimator is imported on first use: with scikit-learn installed it imports
    # scikit-learn (a second or two), which the CLI and Dask workers never need.
    if name == "CosineMetricLearner":
        from cosim_dask.estimator import CosineMetricLearner

        return CosineMetricLearner
    raise AttributeError(f"module 'cosim_dask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
