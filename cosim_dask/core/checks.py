"""Shared checks of what users hand to the Python API: pair arrays, targets, fitted state.

Each raises a one-line :class:`~cosim_dask.errors.CosimError` naming the value and the fix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cosim_dask.errors import CosimError, ShapeError


def is_dask(a: Any) -> bool:
    return type(a).__module__.startswith("dask.") and hasattr(a, "chunks")


#: Values checked for NaN/Inf at a time (a block of rows, not a full-size mask).
CHECK_BLOCK_VALUES = 2**20


def check_pairs(pairs: Any, n_features: int | None = None) -> Any:
    """Validate pairs shaped (n_pairs, 2, n_features); NumPy arrays also for finiteness.

    Returns a NumPy float array (float32 kept, else float64) or the Dask array unchanged
    (its values are checked by the chunk tasks, which name the chunk and row of a bad pair).
    """
    if not is_dask(pairs):
        pairs = np.asarray(pairs)
    shape = tuple(pairs.shape)
    if len(shape) != 3 or shape[1] != 2:
        raise ShapeError(f"pairs must have shape (n_pairs, 2, n_features); got {shape}")
    if shape[0] == 0 or shape[2] == 0:
        raise ShapeError(f"pairs must hold at least one pair and one feature; got {shape}")
    if n_features is not None and shape[2] != n_features:
        raise ShapeError(
            f"pairs have {shape[2]} features but the estimator was fitted with {n_features}"
        )
    if not (np.issubdtype(pairs.dtype, np.floating) or np.issubdtype(pairs.dtype, np.integer)):
        raise ShapeError(f"pairs must hold real numbers; got dtype {pairs.dtype}")
    if is_dask(pairs):
        return pairs
    if pairs.dtype != np.float32:
        pairs = pairs.astype(np.float64, copy=False)
    # In row blocks: np.isfinite of the whole array would be a bool copy a quarter of its
    # size (float32), alive at the peak of the fit's memory.
    step = max(1, CHECK_BLOCK_VALUES // max(1, shape[1] * shape[2]))
    for lo in range(0, shape[0], step):
        finite = np.isfinite(pairs[lo : lo + step]).all(axis=(1, 2))
        if not finite.all():
            first = lo + int(np.argmax(~finite))
            raise CosimError(f"pairs have NaN or Inf values (first at pair {first})")
    return pairs


def check_targets(y: Any, n_pairs: int) -> tuple[Any, bool]:
    """Validate targets and return ``(targets, binary)``.

    The rule: targets are in [−1, 1]. Labels ±1 are binary (metric-learn's convention);
    labels {0, 1} (only those two values) are read as binary too, 0 meaning "different"
    and mapped to −1. Any other value in [−1, 1] is a graded target (0: orthogonal).
    Dask targets are checked in one pass of a few scalar reductions.
    """
    if is_dask(y):
        import dask

        y = y.reshape(-1) if y.ndim > 1 and max(y.shape[1:], default=1) == 1 else y
        _check_target_shape(y.shape, n_pairs)
        finite, lo, hi, pm1, zero_one = dask.compute(
            (~_isfinite_dask(y)).sum() == 0, y.min(), y.max(),
            ((y == 1) | (y == -1)).all(), ((y == 0) | (y == 1)).all(),
        )
        values = None
    else:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        _check_target_shape(y.shape, n_pairs)
        if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)
                or y.dtype == bool):
            raise CosimError(f"y must hold numbers in [-1, 1]; got dtype {y.dtype}")
        y = y.astype(np.float64)
        finite = bool(np.isfinite(y).all())
        values = np.unique(y) if finite else None
        lo, hi = (float(values[0]), float(values[-1])) if finite else (math.nan, math.nan)
        pm1 = finite and set(values.tolist()) <= {-1.0, 1.0}
        zero_one = finite and set(values.tolist()) <= {0.0, 1.0}
    if not finite:
        raise CosimError("y has NaN or Inf values; targets must be finite numbers in [-1, 1]")
    if lo < -1.0 or hi > 1.0:
        raise CosimError(f"y values must be in [-1, 1] (labels ±1 or graded); got range "
                         f"[{float(lo):g}, {float(hi):g}]")
    if zero_one and not pm1:
        return 2.0 * y - 1.0, True  # {0, 1} labels: 0 means "different"
    return y, bool(pm1)


def _check_target_shape(shape: tuple, n_pairs: int) -> None:
    if len(shape) != 1:
        raise ShapeError(f"y must be 1-D with one target per pair; got shape {shape}")
    if shape[0] != n_pairs:
        raise ShapeError(f"y has {shape[0]} targets but there are {n_pairs} pairs")


def _isfinite_dask(y):
    import dask.array as da

    return da.isfinite(y)


def check_is_fitted(estimator: Any) -> None:
    if not hasattr(estimator, "metric_"):
        raise CosimError(
            f"this {type(estimator).__name__} is not fitted yet; call fit(pairs, y) first"
        )
