import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def random_spd(rng, d, cond=10.0):
    """A random symmetric positive-definite matrix with eigenvalues in [1, cond]."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.linspace(1.0, cond, d)) @ q.T


def random_pairs(rng, b, d, dtype=np.float64):
    x = rng.standard_normal((b, d)).astype(dtype)
    y = rng.standard_normal((b, d)).astype(dtype)
    t = rng.uniform(-1, 1, b)
    return x, y, t
