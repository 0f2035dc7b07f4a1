"""The deterministic train / validation split: a seeded mask per chunk, so a held-out set
needs no second copy of the data and any fraction works."""

from __future__ import annotations

import numpy as np

from .errors import CosimError


def validation_mask(chunk_index: int, rows: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean (rows,) mask of the validation rows of chunk ``chunk_index``.

    Depends only on (seed, chunk_index, rows, fraction), never on the cluster or the order of
    work, so every pass and every resumed run sees the same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise CosimError(f"validation fraction {fraction!r} must be in [0, 1)")
    if fraction == 0.0:
        return np.zeros(rows, dtype=bool)
    rng = np.random.default_rng([seed, 0x5B, chunk_index])
    return rng.random(rows) < fraction
