"""The two parameterisations of the metric: the full symmetric A, and a factor M with A = MᵀM.

A parameterisation turns a parameter array (A or M) into the metric A, computes a chunk's
partial with respect to its own parameters, adds the optional regularisation
λ‖A − A₀‖²_F (Nguyen & Bai, 2010), and repairs parameters after a solver step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cosim_dask.core.kernel import Partial, chunk_partial, factor_chunk_partial
from cosim_dask.core.losses import Loss, get_loss
from cosim_dask.core.negatives import augmented_partial
from cosim_dask.errors import CosimError, UnknownNameError


def project_psd(A: np.ndarray, min_eigenvalue: float = 1e-6) -> np.ndarray:
    """Nearest matrix (Frobenius) to symmetric A in {A ⪰ εI}: clip eigenvalues at ε.

    Costs one symmetric eigendecomposition, O(d³).
    """
    A = 0.5 * (A + A.T)
    w, V = np.linalg.eigh(A)
    if w[0] >= min_eigenvalue:
        return A
    w = np.maximum(w, min_eigenvalue)
    return (V * w) @ V.T


def regularization(
    A: np.ndarray, strength: float, A0: np.ndarray | None
) -> tuple[float, np.ndarray]:
    """λ‖A − A₀‖²_F and its gradient 2λ(A − A₀) with respect to A (A₀ = I by default)."""
    if strength == 0.0:
        return 0.0, np.zeros_like(A)
    diff = A - (np.eye(A.shape[0]) if A0 is None else A0)
    return float(strength * np.sum(diff * diff)), 2.0 * strength * diff


@dataclass(frozen=True)
class Parameterisation:
    """Base: subclasses define how parameters map to A and to gradients."""

    name: ClassVar[str] = ""

    def initial(self, d: int, A0: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        raise NotImplementedError

    def metric(self, params: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def chunk_partial(self, x, y, target, params, loss: str | Loss, **kw) -> Partial:
        raise NotImplementedError

    def negatives_partial(self, x, y, target, params, loss: str | Loss, partners: np.ndarray,
                          **kw) -> Partial:
        """The partial of the stored pairs and their in-chunk negatives ``partners``
        (:func:`cosim_dask.core.negatives.augmented_partial`); ``x``, ``y`` aligned rows."""
        raise NotImplementedError

    def regularization(
        self, params: np.ndarray, strength: float, A0: np.ndarray | None
    ) -> tuple[float, np.ndarray]:
        raise NotImplementedError

    def project(self, params: np.ndarray) -> np.ndarray:
        """Bring parameters back to where the similarity is defined (no-op by default)."""
        return params


@dataclass(frozen=True)
class FullMetric(Parameterisation):
    """A itself: symmetric, d(d+1)/2 free parameters; projected onto {A ⪰ εI} after steps."""

    name: ClassVar[str] = "full"
    min_eigenvalue: float = 1e-6

    def initial(self, d: int, A0: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        return np.eye(d) if A0 is None else np.array(A0, dtype=np.float64)

    def metric(self, params: np.ndarray) -> np.ndarray:
        return params

    def chunk_partial(self, x, y, target, params, loss, **kw) -> Partial:
        return chunk_partial(x, y, target, params, loss, **kw)

    def negatives_partial(self, x, y, target, params, loss, partners, **kw) -> Partial:
        return augmented_partial(x, y, target, np.asarray(params, dtype=np.float64),
                                 get_loss(loss), partners, via_factor=False, **kw)

    def regularization(self, params, strength, A0):
        return regularization(params, strength, A0)

    def project(self, params: np.ndarray) -> np.ndarray:
        return project_psd(params, self.min_eigenvalue)


@dataclass(frozen=True)
class FactorMetric(Parameterisation):
    """M of shape (k, d) with A = MᵀM: PSD by construction, rank ≤ k."""

    name: ClassVar[str] = "factor"
    rank: int | None = None

    def initial(self, d: int, A0: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
        k = d if self.rank is None else self.rank
        if not 1 <= k <= d:
            raise CosimError(f"rank={k} must be between 1 and the dimension d={d}")
        if A0 is not None:
            # The best rank-k factor of A0: its top-k eigenpairs.
            w, V = np.linalg.eigh(0.5 * (A0 + A0.T))
            w, V = np.maximum(w[::-1][:k], 0.0), V[:, ::-1][:, :k]
            # C order, as a restored checkpoint's: NumPy's sums (norms, dot products) run
            # in memory order, so a resumed run would drift from an uninterrupted one.
            return np.ascontiguousarray(np.sqrt(w)[:, None] * V.T)
        if k == d:
            return np.eye(d)
        # Rows of a random orthogonal matrix: A = MᵀM is a projection, cosine-like on a
        # k-dimensional subspace, and the start is reproducible from the seed.
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((d, k)))
        return np.ascontiguousarray(q.T)

    def metric(self, params: np.ndarray) -> np.ndarray:
        return params.T @ params

    def chunk_partial(self, x, y, target, params, loss, **kw) -> Partial:
        return factor_chunk_partial(x, y, target, params, loss, **kw)

    def negatives_partial(self, x, y, target, params, loss, partners, **kw) -> Partial:
        Mt = np.ascontiguousarray(np.asarray(params, dtype=np.float64).T)
        return augmented_partial(x, y, target, Mt, get_loss(loss), partners, via_factor=True,
                                 **kw)

    def regularization(self, params, strength, A0):
        if strength == 0.0:
            return 0.0, np.zeros_like(params)
        value, grad_A = regularization(self.metric(params), strength, A0)
        return value, 2.0 * params @ grad_A  # dL/dM = 2 M ∇_A L for symmetric ∇_A L


PARAMETERISATIONS: dict[str, type[Parameterisation]] = {
    cls.name: cls for cls in (FullMetric, FactorMetric)
}


def get_parameterisation(name: str, rank: int | None = None) -> Parameterisation:
    """Find a parameterisation by name: ``"full"`` or ``"factor"`` (with ``rank``)."""
    if name == "full":
        if rank is not None:
            raise CosimError("rank applies to the factor form only; use param='factor'")
        return FullMetric()
    if name == "factor":
        if rank is not None and rank < 1:
            raise CosimError(f"rank={rank} must be at least 1")
        return FactorMetric(rank=rank)
    raise UnknownNameError(
        f"unknown parameterisation {name!r}; choose one of: {', '.join(PARAMETERISATIONS)}"
    )
