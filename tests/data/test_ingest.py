"""Streaming ingest: round trips from .npy and pair lists, input rules, failures leave nothing."""

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cosim_dask import pair_similarity
from cosim_dask.data.ingest import ingest_arrays, ingest_pairs
from cosim_dask.data.store import PairStoreWriter, open_store
from cosim_dask.errors import CosimError, InvalidPairsError, ShapeError


def leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def save(folder, **arrays):
    paths = {}
    for name, a in arrays.items():
        paths[name] = Path(folder) / f"{name}.npy"
        np.save(paths[name], a)
    return paths


@pytest.fixture
def aligned(tmp_path, rng):
    x = rng.standard_normal((50, 6))
    y = rng.standard_normal((50, 6))
    t = rng.choice([-1.0, 1.0], 50)
    return x, y, t, save(tmp_path, x=x, y=y, target=t)


def test_arrays_round_trip(tmp_path, aligned):
    x, y, t, p = aligned
    seen = []
    report = ingest_arrays(tmp_path / "s.zarr", p["x"], p["y"], p["target"], chunk_rows=16,
                           progress=seen.append)
    store = open_store(tmp_path / "s.zarr")
    assert report.n == store.n == 50 and store.targets == report.targets == "binary"
    assert store.x.chunks == ((16, 16, 16, 2), (6,))
    np.testing.assert_array_equal(store.x.compute(), x.astype(np.float32))
    np.testing.assert_array_equal(store.y.compute(), y.astype(np.float32))
    np.testing.assert_array_equal(store.target.compute(), t)
    assert sum(seen) == 50
    prov = store.attrs["provenance"]
    assert prov["command"] == "ingest" and prov["sources"]["x"]["path"].endswith("x.npy")
    assert leftovers(tmp_path) == []


def test_float16_vectors_and_integer_targets(tmp_path, rng):
    x = rng.standard_normal((10, 3)).astype(np.float16)
    t = np.array([1, -1] * 5, dtype=np.int8)
    ingest_arrays(tmp_path / "s.zarr", x, x[::-1].copy(), t)
    store = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.x.compute(), x.astype(np.float32))
    assert store.targets == "binary"


def test_integer_vectors_are_refused(tmp_path):
    x = np.ones((4, 3), dtype=np.int64)
    with pytest.raises(ShapeError, match="dtype int64; vectors must be floating"):
        ingest_arrays(tmp_path / "s.zarr", x, x.astype(float), np.ones(4))
    assert list(tmp_path.iterdir()) == []


def test_normalize_keeps_similarity(tmp_path, rng):
    x, y = rng.standard_normal((30, 5)) * 7, rng.standard_normal((30, 5)) * 0.1
    ingest_arrays(tmp_path / "s.zarr", x, y, rng.uniform(-1, 1, 30), normalize=True)
    store = open_store(tmp_path / "s.zarr")
    xs, ys = store.x.compute(), store.y.compute()
    np.testing.assert_allclose(np.linalg.norm(xs, axis=1), 1, rtol=1e-6)
    A = np.diag(rng.uniform(0.5, 2, 5))
    np.testing.assert_allclose(pair_similarity(xs, ys, A), pair_similarity(x, y, A),
                               atol=1e-5)
    assert store.attrs["provenance"]["normalize"] is True


def write_pairs(folder, fmt, i, j, t, names=("i", "j", "target")):
    table = pa.table({names[0]: i, names[1]: j, names[2]: t})
    path = Path(folder) / f"pairs.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=7)
    else:
        pacsv.write_csv(table, path)
    return path


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_pairs_round_trip(tmp_path, rng, fmt):
    E = rng.standard_normal((20, 4)).astype(np.float32)
    i, j = rng.integers(0, 20, 45), rng.integers(0, 20, 45)
    t = rng.uniform(-1, 1, 45)
    pairs = write_pairs(tmp_path, fmt, i, j, t, names=("a", "b", "score"))
    np.save(tmp_path / "E.npy", E)
    seen = []
    report = ingest_pairs(tmp_path / "s.zarr", tmp_path / "E.npy", pairs, i_column="a",
                          j_column="b", target_column="score", chunk_rows=10,
                          progress=seen.append)
    store = open_store(tmp_path / "s.zarr")
    assert report.n == 45 and store.targets == "graded" and sum(seen) == 45
    assert store.x.chunks[0] == (10, 10, 10, 10, 5)
    np.testing.assert_array_equal(store.x.compute(), E[i])
    np.testing.assert_array_equal(store.y.compute(), E[j])
    np.testing.assert_allclose(store.target.compute(), t.astype(np.float32))
    assert store.attrs["provenance"]["kind"] == "pairs"


def test_csv_and_parquet_of_the_same_pairs_give_the_same_store(tmp_path, rng, monkeypatch):
    """The default chunking evens chunks out when the number of pairs is known: a CSV is
    counted first, as a Parquet footer tells, so both give the same chunks (and so the same
    validation split) and the same arrays."""
    from cosim_dask.data import store as store_module

    # A default chunk of 64 pairs at d = 4, so that 150 pairs need three chunks: 50 each
    # when n is known, 64 + 64 + 22 when it is not.
    monkeypatch.setattr(store_module, "TARGET_CHUNK_BYTES", 64 * 4 * 4)
    monkeypatch.setattr(store_module, "MIN_CHUNK_ROWS", 1)
    E = rng.standard_normal((30, 4)).astype(np.float32)
    np.save(tmp_path / "E.npy", E)
    i, j, t = rng.integers(0, 30, 150), rng.integers(0, 30, 150), rng.choice([-1.0, 1.0], 150)
    stores = {}
    for fmt in ("parquet", "csv"):
        pairs = write_pairs(tmp_path, fmt, i, j, t)
        seen = []
        ingest_pairs(tmp_path / f"{fmt}.zarr", tmp_path / "E.npy", pairs, progress=seen.append)
        stores[fmt] = open_store(tmp_path / f"{fmt}.zarr")
        assert seen == [50, 50, 50], fmt  # input chunks too, whatever the row groups
    parquet, csv = stores["parquet"], stores["csv"]
    assert parquet.x.chunks == csv.x.chunks == ((50, 50, 50), (4,))
    for name in ("x", "y", "target"):
        np.testing.assert_array_equal(getattr(parquet, name).compute(),
                                      getattr(csv, name).compute())
    np.testing.assert_array_equal(csv.x.compute(), E[i])
    # The same bad row is named in the same input chunk whichever format holds it.
    t[120] = 0.5
    messages = []
    for fmt in ("parquet", "csv"):
        pairs = write_pairs(tmp_path, fmt, i, j, t)
        with pytest.raises(InvalidPairsError) as caught:
            ingest_pairs(tmp_path / f"bad-{fmt}.zarr", tmp_path / "E.npy", pairs,
                         targets="binary")
        messages.append(str(caught.value).replace(str(pairs), "PAIRS"))
    assert messages[0] == messages[1] and "input chunk 2 (rows 100-149)" in messages[0]


def test_pairs_normalize(tmp_path, rng):
    E = rng.standard_normal((8, 3)) * 5
    pairs = write_pairs(tmp_path, "csv", [0, 1, 2], [3, 4, 5], [1.0, -1.0, 1.0])
    ingest_pairs(tmp_path / "s.zarr", E, pairs, normalize=True)
    x = open_store(tmp_path / "s.zarr").x.compute()
    np.testing.assert_allclose(x, E[:3] / np.linalg.norm(E[:3], axis=1, keepdims=True),
                               rtol=1e-6)


@pytest.mark.parametrize("bad_i", [20, -1])
def test_pair_index_out_of_range(tmp_path, rng, bad_i):
    E = rng.standard_normal((20, 4))
    pairs = write_pairs(tmp_path, "parquet", [0, 1, bad_i], [2, 3, 4], [1.0, 1.0, -1.0])
    for drop in (False, True):  # dropping would hide a pair list made for another table
        with pytest.raises(CosimError, match=r"1 pairs in chunk 0 point outside "
                           r"the embedding table \(rows 0..19\); first at row 2"):
            ingest_pairs(tmp_path / "s.zarr", E, pairs, drop_invalid=drop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]


def test_csv_types_fixed_up_front(tmp_path, rng):
    # an integer-looking first block (pyarrow reads 1 MB blocks) must not fix the target
    # column's type as int64 before a 0.5 at the end
    n = 250_000
    t = np.ones(n)
    t[-1] = 0.5
    lines = ["i,j,target"] + [f"{k % 4},{(k + 1) % 4},{'1' if v == 1 else v}"
                              for k, v in enumerate(t)]
    (tmp_path / "p.csv").write_text("\n".join(lines) + "\n")
    report = ingest_pairs(tmp_path / "s.zarr", rng.standard_normal((4, 2)), tmp_path / "p.csv")
    assert report.n == n and report.targets == "graded"
    (tmp_path / "q.csv").write_text("i,j,target\n0,1,1\n0,x,1\n")
    with pytest.raises(CosimError, match="cannot read pair list .*q.csv"):
        ingest_pairs(tmp_path / "q.zarr", rng.standard_normal((4, 2)), tmp_path / "q.csv")
    (tmp_path / "r.parquet").write_text("not parquet")
    with pytest.raises(CosimError, match="cannot read pair list .*r.parquet"):
        ingest_pairs(tmp_path / "r.zarr", rng.standard_normal((4, 2)), tmp_path / "r.parquet")


def test_pair_list_problems(tmp_path, rng):
    E = rng.standard_normal((5, 2))
    pairs = write_pairs(tmp_path, "csv", [0], [1], [1.0], names=("u", "v", "target"))
    with pytest.raises(CosimError, match=r"no column\(s\) \['i', 'j'\]"):
        ingest_pairs(tmp_path / "s.zarr", E, pairs)
    with pytest.raises(CosimError, match="must end in"):
        ingest_pairs(tmp_path / "s.zarr", E, tmp_path / "pairs.json")
    floats = write_pairs(tmp_path, "parquet", [0.5], [1.0], [1.0])
    with pytest.raises(ShapeError, match="row indices must be integers"):
        ingest_pairs(tmp_path / "s.zarr", E, floats)
    assert not (tmp_path / "s.zarr").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("corrupt, reason", [
    (lambda x, y, t: x.__setitem__((33, 1), np.nan), "nonfinite vector 1"),
    (lambda x, y, t: y.__setitem__((40, 0), np.inf), "nonfinite vector 1"),
    (lambda x, y, t: x.__setitem__(33, 0.0), "zero vector 1"),
    (lambda x, y, t: t.__setitem__(33, 1.5), r"target outside \[-1, 1\] 1"),
    (lambda x, y, t: t.__setitem__(33, np.nan), "nonfinite target 1"),
])
def test_invalid_rows(tmp_path, rng, corrupt, reason):
    x, y = rng.standard_normal((50, 3)), rng.standard_normal((50, 3))
    t = rng.uniform(-1, 1, 50)
    corrupt(x, y, t)
    with pytest.raises(InvalidPairsError, match=f"1 invalid pairs in input chunk 2 .*{reason}"
                       ) as info:
        ingest_arrays(tmp_path / "s.zarr", x, y, t, chunk_rows=16)
    assert "drop_invalid=True" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    report = ingest_arrays(tmp_path / "s.zarr", x, y, t, chunk_rows=16, drop_invalid=True)
    assert report.n == 49 and report.n_dropped == 1
    store = open_store(tmp_path / "s.zarr")
    keep = np.ones(50, dtype=bool)
    keep[np.argmax(~np.isfinite(x).all(1) | ~np.isfinite(y).all(1) | ~(x != 0).any(1)
                   | ~np.isfinite(t) | (np.abs(t) > 1))] = False
    np.testing.assert_array_equal(store.x.compute(), x[keep].astype(np.float32))
    assert store.x.chunks[0] == (16, 16, 16, 1)  # whole chunks even after dropping
    assert store.attrs["provenance"]["dropped"] == report.dropped


def test_zero_one_labels(tmp_path, rng):
    x, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 3))
    t = np.array([0, 1] * 6)
    with pytest.raises(CosimError, match="targets are all 0 or 1: pass zero_is_negative=True"):
        ingest_arrays(tmp_path / "s.zarr", x, y, t)
    with pytest.raises(InvalidPairsError, match="for 0/1 labels pass zero_is_negative=True"):
        ingest_arrays(tmp_path / "s.zarr", x, y, t, targets="binary")
    assert list(tmp_path.iterdir()) == []
    ingest_arrays(tmp_path / "s.zarr", x, y, t, zero_is_negative=True)
    store = open_store(tmp_path / "s.zarr")
    assert store.targets == "binary"
    np.testing.assert_array_equal(store.target.compute(), np.where(t == 0, -1, 1))
    ingest_arrays(tmp_path / "g.zarr", x, y, t, targets="graded")
    assert open_store(tmp_path / "g.zarr").targets == "graded"


def test_binary_declared_with_graded_values(tmp_path, rng):
    x = rng.standard_normal((5, 2))
    with pytest.raises(InvalidPairsError, match=r"target not ±1 1"):
        ingest_arrays(tmp_path / "s.zarr", x, x + 1, [1, -1, 0.5, 1, 1], targets="binary")


def test_shape_errors(tmp_path, rng):
    x = rng.standard_normal((6, 3))
    with pytest.raises(ShapeError, match=r"x has shape \(6, 3\) but y has shape \(6, 4\)"):
        ingest_arrays(tmp_path / "s.zarr", x, rng.standard_normal((6, 4)), np.ones(6))
    with pytest.raises(ShapeError, match="target has 5 rows but x has 6"):
        ingest_arrays(tmp_path / "s.zarr", x, x, np.ones(5))
    with pytest.raises(ShapeError, match="expected 2-D"):
        ingest_arrays(tmp_path / "s.zarr", x[0], x[0], np.ones(3))
    with pytest.raises(CosimError, match="does not exist"):
        ingest_arrays(tmp_path / "s.zarr", tmp_path / "nope.npy", x, np.ones(6))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_ingest_keeps_old_store(tmp_path, aligned, monkeypatch):
    x, y, t, p = aligned
    path = tmp_path / "s.zarr"
    ingest_arrays(path, p["x"], p["y"], p["target"], chunk_rows=16)
    before = open_store(path).fingerprint
    # a bad row in the last chunk: found after three chunks are already written
    bad = x.copy()
    bad[-1, 0] = np.nan
    with pytest.raises(InvalidPairsError, match="input chunk 3"):
        ingest_arrays(path, bad, y, t, chunk_rows=16, overwrite=True)
    # the writer itself failing mid-way (disk full, killed worker thread, ...)
    calls = []
    real_append = PairStoreWriter.append

    def failing_append(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("No space left on device")
        real_append(self, *args)

    monkeypatch.setattr(PairStoreWriter, "append", failing_append)
    with pytest.raises(CosimError, match="No space left on device.*is intact"):
        ingest_arrays(path, y, x, t, chunk_rows=16, overwrite=True)
    monkeypatch.undo()
    store = open_store(path)
    assert store.fingerprint == before
    np.testing.assert_array_equal(store.x.compute(), x.astype(np.float32))
    assert leftovers(tmp_path) == []


def test_existing_store_needs_overwrite(tmp_path, aligned):
    x, y, t, p = aligned
    ingest_arrays(tmp_path / "s.zarr", x, y, t)
    before = open_store(tmp_path / "s.zarr").fingerprint
    with pytest.raises(CosimError, match="already exists; pass overwrite=True"):
        ingest_arrays(tmp_path / "s.zarr", y, x, t)
    assert open_store(tmp_path / "s.zarr").fingerprint == before


# Fuzz: any small input either gives a store equal to the cleaned sources or one CosimError,
# and never leaves a partial store or a temporary directory.
_dtypes = st.sampled_from([np.float64, np.float64, np.float32, np.float32, np.float16,
                           np.int32, np.bool_])
_special = st.sampled_from([0.0, 1.0, -1.0, 0.5, -2.0, 1e30, 1e-30, np.nan, np.inf, -np.inf])
# Mostly ordinary values, so that clean stores are common too, with specials mixed in.
_ordinary = st.floats(-1, 1, width=32)
_values = st.one_of(_ordinary, _ordinary, _ordinary, _ordinary, _special)


@st.composite
def fuzz_inputs(draw):
    n = draw(st.integers(0, 12))
    d = draw(st.integers(1, 4))
    dtype = draw(_dtypes)
    mismatch = draw(st.integers(0, 9))  # 0: y of another shape, 1: target of another length
    shape_y = (n, d + 1) if mismatch == 0 else (n, d)
    x = draw(hnp.arrays(np.float64, (n, d), elements=_values))
    y = draw(hnp.arrays(np.float64, shape_y, elements=_values))
    with np.errstate(all="ignore"):  # the cast to float16 / int / bool may overflow: fine
        x, y = x.astype(dtype), y.astype(dtype)
    t = draw(hnp.arrays(np.float64, n + (mismatch == 1), elements=_values))
    flags = {"drop_invalid": draw(st.booleans()), "normalize": draw(st.booleans()),
             "targets": draw(st.sampled_from([None, "binary", "graded"])),
             "chunk_rows": draw(st.integers(1, 5))}
    return x, y, t, flags


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_inputs())
def test_fuzz_ingest(inputs):
    x, y, t, flags = inputs
    with tempfile.TemporaryDirectory() as folder:
        paths = save(folder, x=x, y=y, target=t)
        out = Path(folder) / "s.zarr"
        try:
            report = ingest_arrays(out, paths["x"], paths["y"], paths["target"], **flags)
        except CosimError as exc:
            event(f"refused: {type(exc).__name__}")
            assert "\n" not in str(exc)
            assert not out.exists() and leftovers(folder) == []
            return
        event("stored")
        assert leftovers(folder) == []
        store = open_store(out)
        assert store.n == report.n > 0 and store.d == x.shape[1]
        xs, ys, ts = store.x.compute(), store.y.compute(), store.target.compute()
        assert np.isfinite(xs).all() and np.isfinite(ys).all()
        assert (xs != 0).any(axis=1).all() and (ys != 0).any(axis=1).all()
        assert (np.abs(ts) <= 1).all()
        if store.targets == "binary":
            assert set(np.unique(ts)) <= {-1.0, 1.0}
        if not flags["drop_invalid"] and not flags["normalize"]:
            np.testing.assert_array_equal(xs, x.astype(np.float32))


@st.composite
def fuzz_pair_inputs(draw):
    m = draw(st.integers(1, 6))
    d = draw(st.integers(1, 3))
    E = draw(hnp.arrays(np.float64, (m, d), elements=_values))
    n = draw(st.integers(0, 10))
    idx = st.integers(-1, m) if draw(st.integers(0, 4)) == 0 else st.integers(0, m - 1)
    i = draw(hnp.arrays(np.int64, n, elements=idx))
    j = draw(hnp.arrays(np.int64, n, elements=idx))
    t = draw(hnp.arrays(np.float64, n, elements=_values))
    flags = {"drop_invalid": draw(st.booleans()), "normalize": draw(st.booleans()),
             "chunk_rows": draw(st.integers(1, 4))}
    return E, i, j, t, draw(st.sampled_from(["parquet", "csv"])), flags


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_pair_inputs())
def test_fuzz_ingest_pairs(inputs):
    E, i, j, t, fmt, flags = inputs
    with tempfile.TemporaryDirectory() as folder:
        pairs = write_pairs(folder, fmt, i, j, t)
        out = Path(folder) / "s.zarr"
        try:
            report = ingest_pairs(out, E, pairs, **flags)
        except CosimError as exc:
            event(f"refused: {type(exc).__name__}")
            assert "\n" not in str(exc)
            assert not out.exists() and leftovers(folder) == []
            return
        event("stored")
        store = open_store(out)
        assert store.n == report.n > 0 and leftovers(folder) == []
        if not flags["drop_invalid"] and not flags["normalize"]:
            with np.errstate(over="ignore"):
                np.testing.assert_array_equal(store.x.compute(), E[i].astype(np.float32))


def test_arrays_without_targets_make_a_store_of_positive_pairs(tmp_path, rng):
    x, y = rng.standard_normal((300, 4)), rng.standard_normal((300, 4))
    report = ingest_arrays(tmp_path / "pos.zarr", x, y, None, chunk_rows=128)
    store = open_store(tmp_path / "pos.zarr")
    assert report.n == store.n == 300 and store.targets == "binary"
    assert store.attrs["target_stats"]["count_pos"] == 300
    assert store.attrs["provenance"]["positive_only"] is True
    np.testing.assert_array_equal(store.target.compute(), np.ones(300, np.float32))
    np.testing.assert_array_equal(store.y.compute(), y.astype(np.float32))
