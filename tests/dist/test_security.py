"""Security defaults: loopback listeners, Dask TLS through --security, no unpickling."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from distributed import Client
from helpers import dask_processes, one_line_error, tree_hash
from typer.testing import CliRunner

from cosim_dask.cli.app import app
from cosim_dask.data.ingest import generate_store
from cosim_dask.data.store import open_store
from cosim_dask.dist.cluster import ClusterConfig, close, connect
from cosim_dask.errors import ClusterError, ModelError, StoreError
from cosim_dask.fit.model import load_model

runner = CliRunner()


def _bound_hosts(http_server) -> set[str]:
    return {sock.getsockname()[0] for sock in http_server._sockets.values()}


def test_local_cluster_and_dashboards_listen_on_loopback():
    client, cluster = connect(ClusterConfig(workers=1))
    try:
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        info = client.scheduler_info(n_workers=-1)
        assert info["workers"] and all(a.startswith("tcp://127.0.0.1:") for a in info["workers"])
        assert all(w["nanny"].startswith("tcp://127.0.0.1:") for w in info["workers"].values())
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        assert _bound_hosts(cluster.scheduler.http_server) == {"127.0.0.1"}
        # Worker dashboards, where they run, bind loopback too.
        hosts = client.run(lambda dask_worker: sorted(_bound_hosts(dask_worker.http_server))
                           if getattr(dask_worker, "http_server", None) else [])
        assert all(set(h) <= {"127.0.0.1"} for h in hosts.values()), hosts
    finally:
        close(client, cluster)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A throwaway CA and one certificate per role, signed by it, for 127.0.0.1."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed: the TLS tests need it "
                    "(apt-get install -y openssl)")
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=cosim test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    files = {"ca": str(d / "ca.pem")}
    for role in ("scheduler", "worker", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={role}",
                 "-keyout", f"{role}.key", "-out", f"{role}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{role}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out",
                 f"{role}.pem", cwd=d)
        files[role] = (str(d / f"{role}.pem"), str(d / f"{role}.key"))
    config = {"distributed": {"comm": {"require-encryption": True, "tls": {
        "ca-file": files["ca"],
        **{role: {"cert": files[role][0], "key": files[role][1]}
           for role in ("scheduler", "worker", "client")}}}}}
    files["config"] = d / "security.yaml"
    files["config"].write_text(yaml.safe_dump(config))
    return files


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("sec") / "s.zarr"
    generate_store(path, pairs=3_000, dim=8, rank=2, targets="binary", seed=6,
                   chunk_rows=1_000)
    return path


@pytest.mark.slow
def test_train_through_a_tls_scheduler(tls_files, store, tmp_path):
    with dask_processes(workers=1, tls=tls_files) as (address, _):
        assert address.startswith("tls://")
        from cosim_dask.dist.cluster import load_security

        with Client(address, security=load_security(tls_files["config"]), timeout=30) as c:
            c.wait_for_workers(1, timeout=60)
            assert all(w.startswith("tls://") for w in c.scheduler_info()["workers"])
        out = tmp_path / "m.zarr"
        result = runner.invoke(app, ["train", str(store), "--out", str(out), "--steps", "3",
                                     "--scheduler", address,
                                     "--security", str(tls_files["config"])])
        assert result.exit_code == 0, result.output
        assert load_model(out).attrs["steps"] >= 1
        # Without the certificates the TLS scheduler is refused: one line, exit 2.
        result = runner.invoke(app, ["train", str(store), "--out", str(tmp_path / "n.zarr"),
                                     "--scheduler", address])
        one_line_error(result.stderr, address)
        assert result.exit_code == 2


def test_local_cluster_with_tls(tls_files):
    client, cluster = connect(ClusterConfig(workers=1, security=tls_files["config"]))
    try:
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [1, 2]).result() == 3
    finally:
        close(client, cluster)


@pytest.mark.parametrize("text,fragment", [
    ("distributed: {comm: {tls: {client: {cert: a.pem}}}}", "lacks the key 'ca-file'"),
    ("[unclosed", "is not valid YAML"),
    ("just a string", "is not a Dask TLS config"),
])
def test_bad_security_config_is_one_line(tmp_path, text, fragment):
    path = tmp_path / "sec.yaml"
    path.write_text(text)
    with pytest.raises(ClusterError, match=fragment):
        connect(ClusterConfig(scheduler="tls://127.0.0.1:1", security=str(path)))


class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    path = None

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _pickled_v2_array(folder: Path, shape, marker: Path) -> None:
    """A zarr v2 array of dtype object whose chunk is a pickle that touches ``marker``."""
    folder.mkdir(parents=True)
    (folder / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": list(shape), "chunks": list(shape), "dtype": "|O",
        "compressor": None, "fill_value": None, "filters": [{"id": "pickle"}],
        "order": "C"}))
    payload = np.empty(shape, dtype=object)
    m = _Marker()
    m.path = marker
    payload.flat[0] = m
    (folder / ("0.0" if len(shape) == 2 else "0")).write_bytes(pickle.dumps(payload))


def test_model_and_store_loading_never_unpickle(tmp_path, store):
    marker = tmp_path / "UNPICKLED"
    model = tmp_path / "evil-model"
    model.mkdir()
    (model / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (model / ".zattrs").write_text(json.dumps({"format": "cosim-model", "format_version": 1,
                                                "d": 2}))
    _pickled_v2_array(model / "A", (2, 2), marker)
    with pytest.raises(ModelError, match="array 'A' cannot be opened"):
        load_model(model)
    result = runner.invoke(app, ["evaluate", str(model), str(store), "--workers", "1"])
    one_line_error(result.stderr, "evil-model")
    # A store whose x is pickled objects, with otherwise valid attributes.
    evil = tmp_path / "evil-store"
    shutil.copytree(store, evil)
    shutil.rmtree(evil / "x")
    _pickled_v2_array(evil / "x", (3_000, 8), marker)
    before = tree_hash(evil)
    with pytest.raises(StoreError, match="evil-store"):
        open_store(evil)
    result = runner.invoke(app, ["train", str(evil), "--out", str(tmp_path / "m.zarr")])
    one_line_error(result.stderr, "evil-store")
    assert not marker.exists()
    assert tree_hash(evil) == before
    # A model whose A is a number array of the wrong kind is refused before reading it.
    import zarr

    bad = zarr.open_group(tmp_path / "int-model", mode="w")
    bad.attrs.update({"format": "cosim-model", "format_version": 1, "d": 2})
    bad.create_array("A", data=np.eye(2, dtype=np.int64))
    with pytest.raises(ModelError, match="dtype int64, expected float64"):
        load_model(tmp_path / "int-model")


def test_store_arrays_must_be_floating_point(tmp_path, store):
    import zarr

    bad = tmp_path / "int-store"
    shutil.copytree(store, bad)
    group = zarr.open_group(bad, mode="r+")
    target = group["target"]
    group.create_array("target", shape=target.shape, chunks=target.chunks, dtype="int32",
                       overwrite=True)
    with pytest.raises(StoreError, match="target has dtype int32, expected floating point"):
        open_store(bad)
