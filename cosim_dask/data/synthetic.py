"""Synthetic pairs whose targets come from a hidden PSD metric A* (pure NumPy).

Each chunk is generated from its own seed, so a store of any size can be written chunk by
chunk in bounded memory, and the same (seed, chunk) always gives the same pairs.
"""

from __future__ import annotations

import numpy as np

from cosim_dask.core.kernel import pair_similarity
from cosim_dask.errors import CosimError


def hidden_metric(dim: int, rank: int | None = None, seed: int = 0) -> np.ndarray:
    """A* = UUᵀ/r + δI: a random rank-r metric plus a small ridge so it is positive definite."""
    rank = dim if rank is None else rank
    if not 1 <= rank <= dim:
        raise CosimError(f"rank={rank} must be between 1 and dim={dim}")
    rng = np.random.default_rng([seed, 0xA])
    U = rng.standard_normal((dim, rank))
    A = U @ U.T / rank
    return A + 1e-3 * np.trace(A) / dim * np.eye(dim)


def synthetic_chunk(
    rows: int,
    A_star: np.ndarray,
    *,
    noise: float = 0.05,
    targets: str = "graded",
    seed: int = 0,
    chunk: int = 0,
    dtype: type = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rows`` pairs (x, y, target) drawn for chunk number ``chunk``.

    y = c·x + sqrt(1 − c²)·z with c uniform in [−1, 1], so similarities span [−1, 1]; the
    target is sim(x, y; A*) plus Gaussian noise of scale ``noise`` (graded, clipped to
    [−1, 1]) or its sign (binary ±1).
    """
    if targets not in ("graded", "binary"):
        raise CosimError(f"targets={targets!r} must be 'graded' or 'binary'")
    if noise < 0:
        raise CosimError(f"noise={noise!r} must be >= 0")
    d = A_star.shape[0]
    rng = np.random.default_rng([seed, 0xC, chunk])
    x = rng.standard_normal((rows, d))
    z = rng.standard_normal((rows, d))
    c = rng.uniform(-1.0, 1.0, size=(rows, 1))
    y = c * x + np.sqrt(1.0 - c * c) * z
    s = pair_similarity(x, y, A_star) + noise * rng.standard_normal(rows)
    t = np.clip(s, -1.0, 1.0) if targets == "graded" else np.where(s >= 0, 1.0, -1.0)
    return x.astype(dtype), y.astype(dtype), t.astype(dtype)


def synthetic_pairs(
    n: int, dim: int, *, rank: int | None = None, noise: float = 0.05,
    targets: str = "graded", seed: int = 0, chunk_rows: int = 65536,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` pairs in memory plus the hidden metric: ``(x, y, target, A_star)``."""
    A_star = hidden_metric(dim, rank, seed)
    parts = [
        synthetic_chunk(min(chunk_rows, n - lo), A_star, noise=noise, targets=targets,
                        seed=seed, chunk=i)
        for i, lo in enumerate(range(0, n, chunk_rows))
    ]
    x, y, t = (np.concatenate(p) for p in zip(*parts, strict=True))
    return x, y, t, A_star
