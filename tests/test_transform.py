"""`transform`: L·x so that plain cosine of the outputs equals the learned similarity."""

import numpy as np
import pytest
from helpers import random_spd
from typer.testing import CliRunner

from cosim_dask import pair_similarity
from cosim_dask.cli.app import app
from cosim_dask.errors import CosimError
from cosim_dask.fit.model import Model, save_model
from cosim_dask.transform import transform_file

runner = CliRunner()


def plain_cosine(u, v):
    return np.sum(u * v, 1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)


@pytest.fixture
def full_model(rng):
    return Model(A=random_spd(rng, 6, cond=50.0))


@pytest.fixture
def factor_model(rng):
    M = rng.standard_normal((3, 6))
    return Model(A=M.T @ M, M=M)


@pytest.mark.parametrize("kind", ["full_model", "factor_model"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_of_transformed_vectors_is_learned_similarity(request, tmp_path, rng, kind,
                                                             dtype):
    model = request.getfixturevalue(kind)
    X = rng.standard_normal((101, 6)).astype(dtype)
    np.save(tmp_path / "in.npy", X)
    report = transform_file(model, tmp_path / "in.npy", tmp_path / "out.npy", block_rows=7)
    Z = np.load(tmp_path / "out.npy")
    k = model.M.shape[0] if model.M is not None else 6
    assert Z.shape == (101, k) and report.rows == 101 and report.out_dim == k
    assert Z.dtype == dtype
    i, j = rng.integers(0, 101, 300), rng.integers(0, 101, 300)
    expected = pair_similarity(X[i].astype(np.float64), X[j].astype(np.float64), model.A)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(plain_cosine(Z[i].astype(np.float64), Z[j].astype(np.float64)),
                               expected, atol=tol)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "out.npy"]


def test_result_does_not_depend_on_block_size(tmp_path, rng, full_model):
    np.save(tmp_path / "in.npy", rng.standard_normal((50, 6)))
    transform_file(full_model, tmp_path / "in.npy", tmp_path / "a.npy", block_rows=1)
    transform_file(full_model, tmp_path / "in.npy", tmp_path / "b.npy", block_rows=1000)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"),
                               rtol=1e-13)


def test_bad_inputs(tmp_path, rng, full_model):
    X = rng.standard_normal((20, 6))
    np.save(tmp_path / "in.npy", X)
    np.save(tmp_path / "five.npy", X[:, :5])
    np.save(tmp_path / "ints.npy", np.ones((4, 6), dtype=np.int64))
    bad = X.copy()
    bad[13, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    (tmp_path / "exists.npy").write_bytes(b"keep me")
    cases = [
        ("missing.npy", "out1.npy", "does not exist"),
        ("five.npy", "out2.npy", "the model has d=6 but input .* has 5 features"),
        ("ints.npy", "out3.npy", "dtype int64"),
        ("nan.npy", "out4.npy", r"NaN or Inf values \(first at row 13\)"),
        ("in.npy", "exists.npy", "already exists; pass overwrite=True"),
    ]
    for src, out, message in cases:
        with pytest.raises(CosimError, match=message) as info:
            transform_file(full_model, tmp_path / src, tmp_path / out, block_rows=4)
        assert "\n" not in str(info.value)
    # Nothing half-written: no outputs, no temporary files, the existing file untouched.
    assert (tmp_path / "exists.npy").read_bytes() == b"keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".", "out"))]
    # --overwrite replaces only a .npy array: not a file of other bytes ...
    with pytest.raises(CosimError, match="refusing to replace .* not a .npy array"):
        transform_file(full_model, tmp_path / "in.npy", tmp_path / "exists.npy", overwrite=True)
    assert (tmp_path / "exists.npy").read_bytes() == b"keep me"
    # ... but an array, yes.
    np.save(tmp_path / "exists.npy", np.zeros(3))
    transform_file(full_model, tmp_path / "in.npy", tmp_path / "exists.npy", overwrite=True)
    assert np.load(tmp_path / "exists.npy").shape == (20, 6)


def test_cli_transform_writes_the_file(tmp_path, rng, factor_model):
    save_model(tmp_path / "model", factor_model, overwrite=False)
    X = rng.standard_normal((30, 6))
    np.save(tmp_path / "in.npy", X)
    result = runner.invoke(app, ["transform", str(tmp_path / "model"), str(tmp_path / "in.npy"),
                                 str(tmp_path / "out.npy")])
    assert result.exit_code == 0, result.output
    assert "wrote 30 vectors of 3" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), X @ factor_model.M.T, rtol=1e-12)
    again = runner.invoke(app, ["transform", str(tmp_path / "model"), str(tmp_path / "in.npy"),
                                str(tmp_path / "out.npy")])
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_cli_transform_missing_model(tmp_path):
    np.save(tmp_path / "in.npy", np.ones((2, 3)))
    result = runner.invoke(app, ["transform", str(tmp_path / "nope"), str(tmp_path / "in.npy"),
                                 str(tmp_path / "out.npy")])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr and not (tmp_path / "out.npy").exists()


def test_transform_a_pair_store(tmp_path, factor_model):
    """Every pair of a store is mapped; plain cosine on the new store is the learned one."""
    from cosim_dask.data.ingest import generate_store
    from cosim_dask.data.store import open_store

    src, out = tmp_path / "in.zarr", tmp_path / "out.zarr"
    model = factor_model
    generate_store(src, pairs=3000, dim=model.d, targets="binary", chunk_rows=700, seed=3)
    report = transform_file(model, src, out)
    a, b = open_store(src), open_store(out)
    assert (b.n, b.d, b.chunk_rows, b.targets) == (3000, model.components().shape[0], 700,
                                                    "binary")
    assert report.rows == 3000
    np.testing.assert_array_equal(np.asarray(b.target), np.asarray(a.target))
    learned = pair_similarity(np.asarray(a.x), np.asarray(a.y), model.A)
    plain = pair_similarity(np.asarray(b.x), np.asarray(b.y))
    np.testing.assert_allclose(plain, learned, atol=1e-5)
    with pytest.raises(CosimError, match="already exists"):
        transform_file(model, src, out)
