import numpy as np
import pytest

from cosim_dask.core.losses import LOSSES, ContrastiveLoss, MSELoss, get_loss
from cosim_dask.errors import CosimError, UnknownNameError


@pytest.mark.parametrize("loss", [MSELoss(), MSELoss(negative_target=0.0), ContrastiveLoss()])
def test_pointwise_derivative_against_central_differences(rng, loss):
    s = rng.uniform(-0.99, 0.99, 500)
    t = np.where(rng.random(500) < 0.5, 1.0, -1.0)
    _, dloss = loss.pointwise(s, t)
    h = 1e-6
    fd = (loss.pointwise(s + h, t)[0] - loss.pointwise(s - h, t)[0]) / (2 * h)
    np.testing.assert_allclose(dloss, fd, rtol=1e-5, atol=1e-7)


def test_mse_values_and_negative_target():
    values, _ = MSELoss().pointwise(np.array([0.5, 0.5]), np.array([1.0, -1.0]))
    np.testing.assert_allclose(values, [0.25, 2.25])
    values, _ = MSELoss(negative_target=0.0).pointwise(np.array([0.5]), np.array([-1.0]))
    np.testing.assert_allclose(values, [0.25])


def test_contrastive_is_zero_inside_margins():
    loss = ContrastiveLoss(pos_margin=0.6, neg_margin=0.2)
    values, grads = loss.pointwise(np.array([0.7, 0.1, 0.5, 0.3]), np.array([1, -1, 1, -1.0]))
    np.testing.assert_allclose(values, [0, 0, 0.01, 0.01])
    assert grads[2] < 0 < grads[3]  # pull the positive up, push the negative down


def test_registry_by_name():
    assert set(LOSSES) == {"mse", "contrastive"}
    assert isinstance(get_loss("mse"), MSELoss)
    with pytest.raises(UnknownNameError, match="unknown loss 'hinge'; choose one of: "):
        get_loss("hinge")
    with pytest.raises(CosimError, match="negative_target=2"):
        MSELoss(negative_target=2)
    with pytest.raises(CosimError, match="margins"):
        ContrastiveLoss(pos_margin=0.1, neg_margin=0.5)
