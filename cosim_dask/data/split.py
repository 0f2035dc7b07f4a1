"""How a pair store's rows are cut: chunks, the validation rows of each chunk, and the
chunks of a mini-batch. One definition each, used by the store, the readers, the passes and
``cosim info``.

The train/validation split needs no second copy of the data: :func:`validation_mask` draws a
seeded per-row mask for each chunk from ``(seed, chunk_index)`` alone, so every worker, every
pass and every later evaluation draws the same rows.
"""

from __future__ import annotations

import numpy as np

from cosim_dask.errors import CosimError


def chunk_slices(n: int, chunk_rows: int) -> list[slice]:
    """The row range of each chunk of ``n`` rows, in order: ``[slice(0, c), slice(c, 2c),
    ...]`` (the last may be shorter)."""
    return [slice(lo, min(lo + chunk_rows, n)) for lo in range(0, n, chunk_rows)]


def validation_mask(chunk_index: int, rows: int, fraction: float, seed: int) -> np.ndarray:
    """The validation rows of one chunk: a seeded Bernoulli(``fraction``) mask.

    Parameters
    ----------
    chunk_index : int
        Which chunk of the store (0-based).
    rows : int
        Rows in that chunk; a shorter last chunk gets a prefix of the full-length mask.
    fraction : float
        Expected share of validation rows, in [0, 1).
    seed : int
        Split seed; the mask depends on ``(seed, chunk_index)`` and nothing else.

    Returns
    -------
    numpy.ndarray
        ``(rows,)`` bool, True for validation rows; all False when ``fraction`` is 0.
    """
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise CosimError(f"validation fraction={fraction!r} must be in [0, 1)")
    if fraction == 0.0:
        return np.zeros(rows, dtype=bool)
    # A constant stream tag keeps this generator independent of the synthetic data's,
    # which seeds with [seed, 0xC, chunk].
    rng = np.random.default_rng([int(seed), 0x5A11, int(chunk_index)])
    return rng.random(rows) < fraction


def sample_chunks(n_chunks: int, batch_chunks: int, seed: int, batch: int) -> list[int]:
    """The chunks of mini-batch number ``batch``, in order: seeded by ``(seed, batch)``, so
    a resumed run draws the same."""
    rng = np.random.default_rng([seed, batch])
    k = min(batch_chunks, n_chunks)
    return sorted(rng.choice(n_chunks, size=k, replace=False).tolist())
