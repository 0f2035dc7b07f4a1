"""One set of defaults: the estimator and `cosim train` learn the same metric on the same pairs."""

import numpy as np
import pytest
from distributed import LocalCluster
from typer.testing import CliRunner

from cosim_dask import CosineMetricLearner
from cosim_dask.cli.app import app
from cosim_dask.data.ingest import ingest_arrays
from cosim_dask.data.synthetic import synthetic_pairs
from cosim_dask.fit.config import TrainConfig
from cosim_dask.fit.model import load_model


@pytest.fixture(scope="module")
def scheduler():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster.scheduler_address


def trace_normalised(A: np.ndarray) -> np.ndarray:
    return A * A.shape[0] / np.trace(A)


def test_estimator_and_cosim_train_learn_the_same_metric(scheduler, tmp_path):
    # Binary pairs on which the default solver's stopping rule (the training loss's gain per
    # step, no validation rows) fires well before 50 steps, so a tolerance, a negative target
    # or a validation default that differs shows in A.
    x, y, t, _ = synthetic_pairs(20000, 16, rank=3, noise=0.3, targets="binary", seed=3)
    store = tmp_path / "pairs.zarr"
    ingest_arrays(store, x, y, t)
    fitted = CosineMetricLearner().fit(np.stack([x, y], axis=1), t)
    assert fitted.stop_reason_.startswith("training loss (relative) gained")

    out = tmp_path / "model.zarr"
    result = CliRunner().invoke(app, ["train", str(store), "--out", str(out),
                                      "--validation", "0", "--scheduler", scheduler])
    assert result.exit_code == 0, (result.output, result.exception)
    model = load_model(out)

    assert model.attrs["steps"] == fitted.n_iter_
    np.testing.assert_allclose(trace_normalised(fitted.metric_), trace_normalised(model.A),
                               rtol=1e-4, atol=1e-4 * np.abs(model.A).max())
    # The settings the two recorded are the same TrainConfig, defaults included.
    assert fitted.to_model().attrs["settings"] == model.attrs["settings"]
    assert TrainConfig.from_settings(model.attrs["settings"]) == TrainConfig(validation=0.0)


def test_estimator_model_file_has_the_attributes_cosim_train_writes(tmp_path):
    """The estimator's saved model goes through the same builder: A at trace d, M with
    MᵀM = A, and typed attributes, settings included, that load back and rebuild its loss."""
    x, y, t, _ = synthetic_pairs(3000, 6, rank=2, noise=0.1, targets="binary", seed=1)
    fitted = CosineMetricLearner(max_iter=5, negative_target=-1.0).fit(
        np.stack([x, y], axis=1), t)
    fitted.save(tmp_path / "m.zarr")
    model = load_model(tmp_path / "m.zarr")
    assert np.trace(model.A) == pytest.approx(6)
    np.testing.assert_allclose(model.M.T @ model.M, model.A, atol=1e-10)
    np.testing.assert_allclose(model.A, fitted.metric_)
    config = TrainConfig.from_settings(model.attrs["settings"])
    assert config.negative_target == -1.0 and config.steps == 5
    assert model.attrs["settings_key"] == config.key()
    assert model.attrs["threshold"] == pytest.approx(fitted.threshold_)
    assert model.attrs["targets"] == "binary" and model.attrs["complete"] is True


def test_negative_target_none_means_the_default_for_every_entry_point():
    """None is the documented default (0.0, "unrelated") in the estimator too, not −1."""
    x, y, t, _ = synthetic_pairs(2000, 6, rank=2, noise=0.1, targets="binary", seed=2)
    pairs = np.stack([x, y], axis=1)
    none = CosineMetricLearner(max_iter=5, negative_target=None).fit(pairs, t)
    zero = CosineMetricLearner(max_iter=5, negative_target=0.0).fit(pairs, t)
    np.testing.assert_array_equal(none.metric_, zero.metric_)
