import numpy as np
import pytest
from helpers import random_pairs, random_spd

from cosim_dask.core.forms import (
    FactorMetric,
    FullMetric,
    get_parameterisation,
    project_psd,
    regularization,
)
from cosim_dask.errors import CosimError, UnknownNameError


def test_projection_clips_eigenvalues(rng):
    d = 6
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w = np.array([-2.0, -0.1, 0.0, 0.5, 1.0, 3.0])
    A = (q * w) @ q.T
    P = project_psd(A, 1e-3)
    np.testing.assert_allclose(np.linalg.eigvalsh(P), np.sort(np.maximum(w, 1e-3)), atol=1e-12)
    np.testing.assert_allclose(P, P.T)
    S = random_spd(rng, d)
    np.testing.assert_allclose(project_psd(S), S)  # already inside: unchanged


def test_regularization_gradient_against_differences(rng):
    d = 5
    A, A0 = random_spd(rng, d), random_spd(rng, d)
    _, g = regularization(A, 0.3, A0)
    D = rng.standard_normal((d, d))
    D = D + D.T
    h = 1e-6
    fd = (regularization(A + h * D, 0.3, A0)[0] - regularization(A - h * D, 0.3, A0)[0]) / (2 * h)
    assert np.sum(g * D) == pytest.approx(fd, rel=1e-7)


def test_factor_regularization_gradient(rng):
    d, k = 5, 3
    form = FactorMetric(rank=k)
    M = rng.standard_normal((k, d))
    _, g = form.regularization(M, 0.2, None)
    D = rng.standard_normal((k, d))
    h = 1e-6
    fd = (form.regularization(M + h * D, 0.2, None)[0]
          - form.regularization(M - h * D, 0.2, None)[0]) / (2 * h)
    assert np.sum(g * D) == pytest.approx(fd, rel=1e-6)


def test_factor_initial_and_metric(rng):
    A0 = random_spd(rng, 6)
    M = FactorMetric(rank=6).initial(6, A0)
    np.testing.assert_allclose(M.T @ M, A0, atol=1e-10)
    M3 = FactorMetric(rank=3).initial(6, seed=1)
    np.testing.assert_allclose(M3 @ M3.T, np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(M3, FactorMetric(rank=3).initial(6, seed=1))
    with pytest.raises(CosimError, match="rank=7 must be between 1 and the dimension d=6"):
        FactorMetric(rank=7).initial(6)


def test_parameterisations_agree_on_the_same_metric(rng):
    x, y, t = random_pairs(rng, 100, 6)
    M = rng.standard_normal((6, 6))
    full, factor = FullMetric(), FactorMetric()
    pf = full.chunk_partial(x, y, t, factor.metric(M), "mse")
    pm = factor.chunk_partial(x, y, t, M, "mse")
    assert pf.loss == pytest.approx(pm.loss, rel=1e-12)


def test_registry_and_validation():
    assert isinstance(get_parameterisation("full"), FullMetric)
    assert get_parameterisation("factor", 4).rank == 4
    with pytest.raises(UnknownNameError, match="choose one of: full, factor"):
        get_parameterisation("diag")
    with pytest.raises(CosimError, match="rank applies to the factor form"):
        get_parameterisation("full", 3)
