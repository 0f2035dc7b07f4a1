"""`cosim generate / ingest / info` end to end: real stores on disk, messages, exit codes."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import zarr
from helpers import cosim_main

from cosim_dask.cli.options import Codec
from cosim_dask.data.store import CODECS, open_store


def cosim(*args):
    return cosim_main(*args)


def leftovers(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_generate_then_info(tmp_path):
    store = tmp_path / "g.zarr"
    result = cosim("generate", store, "--pairs", 2500, "--dim", 8, "--rank", 3, "--targets",
                   "binary", "--seed", 4, "--chunk-pairs", 1000)
    assert result.exit_code == 0, result.output
    assert "generated 2,500 pairs x 8" in result.stdout
    opened = open_store(store)
    assert opened.x.chunks[0] == (1000, 1000, 500) and opened.targets == "binary"
    assert opened.hidden_metric.shape == (8, 8)
    info = cosim("info", store)
    assert info.exit_code == 0, info.output
    for text in ("2,500 x d=8", "3 of 1,000 pairs, codec none", "binary: +1",
                 "hidden A*    rank 3", '"seed": 4'):
        assert text in info.stdout
    split = cosim("info", store, "--validation", 0.2, "--seed", 5)
    assert "split        validation 0.2 (seed 5)" in split.stdout
    data = json.loads(cosim("info", store, "--json", "--validation", 0.2, "--seed", 5).stdout)
    v = data["validation"]
    assert v["validation_pairs"] + v["train_pairs"] == 2500
    assert 400 < v["validation_pairs"] < 600
    bad = cosim("info", store, "--validation", 1.5)
    assert bad.exit_code == 2 and "must be in [0, 1)" in bad.stderr
    assert data["n"] == 2500 and data["hidden_metric"]["rank"] == 3
    stats = data["target_stats"]
    assert stats["count_pos"] + stats["count_neg"] == 2500
    assert data["bytes_on_disk"] >= data["bytes_in_memory"] > 0
    assert data["fingerprint"] == opened.fingerprint


def test_codec_choices_match_the_library():
    assert {c.value for c in Codec} == set(CODECS)


def test_generate_graded_info_histogram(tmp_path):
    store = tmp_path / "g.zarr"
    assert cosim("generate", store, "--pairs", 300, "--dim", 4).exit_code == 0
    info = cosim("info", store)
    assert "graded in [-1, 1]" in info.stdout and "[+0.8, +1.0]" in info.stdout


def test_ingest_arrays_and_pairs(tmp_path, rng):
    x, y = rng.standard_normal((40, 5)), rng.standard_normal((40, 5))
    t = rng.choice([-1, 1], 40)
    for name, a in (("x", x), ("y", y), ("t", t), ("E", x)):
        np.save(tmp_path / f"{name}.npy", a)
    result = cosim("ingest", tmp_path / "a.zarr", "--x", tmp_path / "x.npy", "--y",
                   tmp_path / "y.npy", "--target", tmp_path / "t.npy", "--chunk-pairs", 16,
                   "--normalize")
    assert result.exit_code == 0, result.output
    assert "ingested 40 pairs x 5" in result.stdout and "binary targets" in result.stdout
    got = open_store(tmp_path / "a.zarr").x.compute()
    np.testing.assert_allclose(got, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
    pacsv.write_csv(pa.table({"i": np.arange(40), "j": np.arange(40)[::-1], "target": t}),
                    tmp_path / "p.csv")
    result = cosim("ingest", tmp_path / "p.zarr", "--embeddings", tmp_path / "E.npy",
                   "--pairs", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(open_store(tmp_path / "p.zarr").y.compute(),
                                  x[::-1].astype(np.float32))


def test_drop_invalid_reports_count(tmp_path, rng):
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((20, 3))
    x[[3, 17]] = np.nan
    for name, a in (("x", x), ("y", y), ("t", rng.uniform(-1, 1, 20))):
        np.save(tmp_path / f"{name}.npy", a)
    args = ["ingest", tmp_path / "s.zarr", "--x", tmp_path / "x.npy", "--y",
            tmp_path / "y.npy", "--target", tmp_path / "t.npy", "--chunk-pairs", 8]
    result = cosim(*args, "--drop-invalid")
    assert result.exit_code == 0, result.output
    assert "dropped 2 invalid pairs (nonfinite vector 2)" in result.stdout
    assert open_store(tmp_path / "s.zarr").n == 18


# ---- bad input: one line on stderr, exit code 2, no partial store, an old store untouched.

def _arrays(tmp_path, rng, n=20, d=3, **override):
    arrays = {"x": rng.standard_normal((n, d)), "y": rng.standard_normal((n, d)),
              "t": rng.uniform(-1, 1, n), "E": rng.standard_normal((10, d))}
    arrays.update(override)
    for name, a in arrays.items():
        np.save(tmp_path / f"{name}.npy", a)
    pacsv.write_csv(pa.table({"i": [0, 1, 12], "j": [2, 3, 4], "target": [1.0, -1.0, 1.0]}),
                    tmp_path / "p.csv")
    return ["--x", tmp_path / "x.npy", "--y", tmp_path / "y.npy",
            "--target", tmp_path / "t.npy", "--chunk-pairs", 8]


def _nan_row(n, d, row):
    a = np.ones((n, d))
    a[row] = np.nan
    return a


BAD_INGEST = {
    "x and y shapes": ({"y": np.ones((20, 4))}, r"x has shape (20, 3) but y has shape (20, 4)"),
    "target length": ({"t": np.zeros(19)}, "target has 19 rows but x has 20"),
    "integer vectors": ({"x": np.ones((20, 3), dtype=np.int32)}, "dtype int32; vectors must"),
    "nan in last chunk": ({"x": _nan_row(20, 3, 18)},
                          "1 invalid pairs in input chunk 2 (rows 16-19)"),
    "inf": ({"y": np.full((20, 3), np.inf)}, "8 invalid pairs in input chunk 0"),
    "zero vectors": ({"x": np.zeros((20, 3))}, "zero vector 8"),
    "targets outside": ({"t": np.full(20, 1.5)}, "target outside [-1, 1] 8"),
    "0/1 labels": ({"t": np.arange(20) % 2}, "targets are all 0 or 1: pass --zero-is-negative"),
}


@pytest.mark.parametrize("case", sorted(BAD_INGEST))
@pytest.mark.parametrize("existing", [False, True])
def test_bad_ingest(tmp_path, rng, case, existing):
    override, message = BAD_INGEST[case]
    store = tmp_path / "s.zarr"
    before = None
    if existing:
        assert cosim("generate", store, "--pairs", 50, "--dim", 3).exit_code == 0
        before = open_store(store).fingerprint
    args = _arrays(tmp_path, rng, **override)
    result = cosim("ingest", store, *args, *(["--overwrite"] if existing else []))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert leftovers(tmp_path) == []
    if existing:
        assert open_store(store).fingerprint == before
    else:
        assert not store.exists()


@pytest.mark.parametrize("args, message", [
    (["ingest", "{s}", "--embeddings", "{t}/E.npy", "--pairs", "{t}/p.csv"],
     "1 pairs in chunk 0 point outside the embedding table (rows 0..9)"),
    (["ingest", "{s}", "--embeddings", "{t}/E.npy", "--pairs", "{t}/missing.csv"],
     "pair list '{t}/missing.csv' does not exist"),
    (["ingest", "{s}", "--x", "{t}/x.npy"], "give either --x and --y (and --target)"),
    (["ingest", "{s}", "--x", "{t}/x.npy", "--y", "{t}/y.npy", "--target", "{t}/t.npy",
      "--embeddings", "{t}/E.npy", "--pairs", "{t}/p.csv"], "give either"),
    (["ingest", "{s}", "--x", "{t}/nope.npy", "--y", "{t}/y.npy", "--target", "{t}/t.npy"],
     "x file '{t}/nope.npy' does not exist"),
    (["info", "{t}/nothing.zarr"], "pair store '{t}/nothing.zarr' does not exist"),
    (["info", "{t}"], "is not a cosim pair store"),
    (["generate", "{s}", "--pairs", "0", "--dim", "3"], "pairs=0 must be >= 1"),
    (["generate", "{s}", "--pairs", "10", "--dim", "3", "--rank", "5"],
     "rank=5 must be between 1 and dim=3"),
    (["generate", "{t}/no/such/dir/s.zarr", "--pairs", "10", "--dim", "3"],
     "does not exist"),
])
def test_bad_commands(tmp_path, rng, args, message):
    _arrays(tmp_path, rng)
    store = tmp_path / "s.zarr"
    fill = {"s": store, "t": tmp_path}
    result = cosim(*[a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1
    assert message.format(**fill) in result.stderr
    assert not store.exists() and leftovers(tmp_path) == []


def test_info_on_a_zarr_group_that_is_not_a_pair_store(tmp_path):
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    result = cosim("info", tmp_path / "other.zarr")
    assert result.exit_code == 2 and "format attribute None" in result.stderr


def test_existing_store_without_overwrite(tmp_path, rng):
    store = tmp_path / "s.zarr"
    assert cosim("generate", store, "--pairs", 50, "--dim", 3).exit_code == 0
    before = open_store(store).fingerprint
    for args in (["generate", store, "--pairs", 60, "--dim", 3],
                 ["ingest", store, *_arrays(tmp_path, rng)]):
        result = cosim(*args)
        assert result.exit_code == 2
        assert f"pair store '{store}' already exists; pass --overwrite" in result.stderr
    assert open_store(store).fingerprint == before and open_store(store).n == 50
    result = cosim("generate", store, "--pairs", 60, "--dim", 3, "--overwrite")
    assert result.exit_code == 0 and open_store(store).n == 60
    assert leftovers(tmp_path) == []


def test_ingest_target_options(tmp_path, rng):
    args = _arrays(tmp_path, rng, t=np.arange(20) % 2)
    graded = cosim("ingest", tmp_path / "g.zarr", *args, "--targets", "graded")
    assert graded.exit_code == 0, graded.output
    assert open_store(tmp_path / "g.zarr").targets == "graded"
    binary = cosim("ingest", tmp_path / "b.zarr", *args, "--zero-is-negative", "--codec", "lz4")
    assert binary.exit_code == 0, binary.output
    opened = open_store(tmp_path / "b.zarr")
    assert opened.targets == "binary" and opened.attrs["codec"] == "lz4"
    np.testing.assert_array_equal(opened.target.compute(), np.where(np.arange(20) % 2, 1, -1))
    both = cosim("ingest", tmp_path / "c.zarr", *args, "--zero-is-negative", "--targets", "graded")
    assert both.exit_code == 2 and "cannot be combined" in both.stderr
