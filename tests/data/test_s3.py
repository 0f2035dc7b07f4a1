"""Pair stores and models in object storage, against a real S3 API: moto's standalone server
started as a subprocess on loopback, with throwaway credentials in the environment (where
botocore, in this process and in every ``dask worker``, finds them)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

# s3fs and moto's server are in the test extra: missing, the module fails to import rather
# than skip (a broken setup, as a missing Chromium is).
import moto.server  # noqa: F401
import numpy as np
import pytest
import zarr
from helpers import cosim_main, dask_processes, free_port, one_line_error

from cosim_dask.data.store import create_store, open_store
from cosim_dask.errors import ModelError, StoreError
from cosim_dask.fit.model import Model, load_model, save_model
from cosim_dask.objectstore import filesystem, versions
from cosim_dask.outputs import OutputError

BUCKET = "cosim-test"
#: Throwaway credentials: the test checks that they reach no file the run writes.
SECRET = f"throwaway-secret-{uuid.uuid4().hex}"


def _clear_fs_cache() -> None:
    # fsspec keeps one filesystem per set of arguments, with the credentials it resolved.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3():
    """The endpoint of a moto S3 server holding an empty bucket :data:`BUCKET`."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "throwaway-key", "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
           # Nothing from this machine's own AWS configuration.
           "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as mp:
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                mp.delenv(key, raising=False)
            for key, value in env.items():
                mp.setenv(key, value)
            _clear_fs_cache()
            fs, _ = filesystem(f"s3://{BUCKET}")
            fs.mkdir(BUCKET)
            yield env
            _clear_fs_cache()
    finally:
        server.kill()
        server.wait(timeout=30)


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}-{name}"


def _write(url: str, n: int = 40, d: int = 4, *, overwrite: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((2, n, d)).astype(np.float32)
    t = np.where(rng.random(n) < 0.5, 1.0, -1.0).astype(np.float32)
    with create_store(url, d=d, chunk_rows=16, overwrite=overwrite) as w:
        w.append(x, y, t)
    return x, y, t


def test_missing_bucket_and_credentials_are_one_line(s3):
    result = cosim_main("info", "s3://no-such-bucket/p.zarr")
    assert result.exit_code == 2
    one_line_error(result.stderr, "bucket 'no-such-bucket'", "does not exist", "create it")
    result = cosim_main("generate", "s3://no-such-bucket/p.zarr", "--pairs", 10, "--dim", 2)
    assert result.exit_code == 2
    one_line_error(result.stderr, "bucket 'no-such-bucket'")
    url = _url("p.zarr")
    _write(url)
    _clear_fs_cache()
    try:
        no_keys = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
        result = cosim_main("info", url, env=no_keys)
        assert result.exit_code == 2
        one_line_error(result.stderr, "no credentials", "AWS_ACCESS_KEY_ID", "every Dask worker")
    finally:
        _clear_fs_cache()
    result = cosim_main("info", _url("none.zarr"))
    one_line_error(result.stderr, "does not exist", "cosim generate")


def test_unpublished_store_or_model_is_refused(s3):
    url = _url("p.zarr")
    writer = create_store(url, d=4, chunk_rows=16)
    w = writer.__enter__()  # a writer killed before the end: never leaves the block
    w.append(*np.ones((2, 40, 4), np.float32), np.ones(40, np.float32))
    assert len(versions(url)) == 1  # its chunks are in the bucket ...
    with pytest.raises(StoreError, match="is incomplete: its writer has not published it"):
        open_store(url)  # ... but the store is not visible
    result = cosim_main("info", url)
    one_line_error(result.stderr, "is incomplete")
    # Another writer may write the URL (no overwrite needed: nothing was published).
    x, _, _ = _write(url)
    np.testing.assert_array_equal(open_store(url).x.compute(), x)
    writer.__exit__(RuntimeError, RuntimeError("stopped"), None)  # its version is deleted
    assert len(versions(url)) == 1

    model_url = _url("m.zarr")
    from cosim_dask.outputs import MODEL, claim_output

    with claim_output(model_url, MODEL) as target:
        staged = target.staged()
        version = staged.__enter__()  # a model writer killed before publishing
        zarr.open_group(version, mode="w").create_array("A", data=np.eye(4))
        with pytest.raises(ModelError, match="is incomplete"):
            load_model(model_url)
        staged.__exit__(RuntimeError, RuntimeError("stopped"), None)
    assert versions(model_url) == []


def test_replacing_keeps_the_old_version_readable_until_published(s3):
    url = _url("p.zarr")
    x_old, _, _ = _write(url, seed=1)
    old = open_store(url)
    writer = create_store(url, d=4, chunk_rows=16, overwrite=True)
    w = writer.__enter__()
    rng = np.random.default_rng(2)
    x_new = rng.standard_normal((40, 4)).astype(np.float32)
    w.append(x_new, x_new, np.ones(40, np.float32))
    # Every chunk of the new version is written; its attributes and pointer are not.
    now = open_store(url)
    assert now.fingerprint == old.fingerprint
    np.testing.assert_array_equal(now.x.compute(), x_old)
    writer.__exit__(None, None, None)
    new = open_store(url)
    assert new.fingerprint != old.fingerprint
    np.testing.assert_array_equal(new.x.compute(), x_new)
    assert len(versions(url)) == 1  # the old version is deleted once the new one is published
    # Only its own kind: a model never replaces a store, a store never the URL's other objects.
    with pytest.raises(OutputError, match="a model replaces only a model"):
        save_model(url, Model(A=np.eye(4)), overwrite=True)
    fs, path = filesystem(url)
    fs.pipe_file(f"{path}/notes.txt", b"mine")
    with pytest.raises(OutputError, match="holds other objects"):
        _write(url, overwrite=True)


@pytest.mark.slow
def test_generate_train_evaluate_transform_on_s3(s3, tmp_path):
    """The whole tour on object storage, trained on `dask worker` processes that get the
    credentials from their environment; the same A as from the same store on local disk."""
    store, model, moved = _url("pairs.zarr"), _url("model.zarr"), _url("moved.zarr")
    result = cosim_main("generate", store, "--pairs", 3000, "--dim", 6, "--targets",
                        "binary", "--chunk-pairs", 1000)
    assert result.exit_code == 0, result.output
    local = tmp_path / "pairs.zarr"
    fs, path = filesystem(store)
    (version,) = versions(store)
    fs.get(f"{path}/{version}", str(local), recursive=True)
    assert open_store(local).fingerprint == open_store(store).fingerprint

    train = ["--steps", 4, "--cache", "stream", "--validation", 0.2]
    with dask_processes(2, extra_env=s3) as (address, _):
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
        result = cosim_main("train", store, "--out", model, "--scheduler", address, *train)
        assert result.exit_code == 0, result.output
        result = cosim_main("train", local, "--out", tmp_path / "model.zarr", "--scheduler",
                            address, *train)
        assert result.exit_code == 0, result.output
        reports = [json.loads(cosim_main("evaluate", m, s, "--scheduler", address,
                                         "--json").stdout)
                   for m, s in ((model, store), (tmp_path / "model.zarr", local))]
    A_s3, A_local = load_model(model).A, load_model(tmp_path / "model.zarr").A
    np.testing.assert_array_equal(A_s3, A_local)
    # Step 0's figures (the first pass's average): from local disk right after that pass,
    # its validation rows read and scored alone; from object storage, where that read costs
    # about a pass, with the full pass at the average, as step 0's loss. The same figures.
    first_s3, first_local = load_model(model).history[0], load_model(
        tmp_path / "model.zarr").history[0]
    assert (first_s3["passes"], first_local["passes"]) == (2.0, 1.0)
    assert first_s3["loss"] is not None and first_local["loss"] is None
    assert first_s3["val_auc"] == first_local["val_auc"] is not None
    assert first_s3["val_loss"] == first_local["val_loss"]
    assert reports[0]["split"] == "validation"
    assert reports[0]["learned"] == reports[1]["learned"]

    result = cosim_main("transform", model, store, moved)
    assert result.exit_code == 0, result.output
    L = load_model(model).components()
    np.testing.assert_allclose(open_store(moved).x.compute(),
                               open_store(local).x.compute() @ L.T, rtol=1e-5, atol=1e-6)
    # The credentials are in no object the run wrote.
    for url in (model, store, moved):
        fs, path = filesystem(url)
        for key in fs.find(path):
            assert SECRET.encode() not in fs.cat_file(key), key
    assert SECRET not in result.output
    assert not list(Path(tmp_path).glob("*.lock"))
