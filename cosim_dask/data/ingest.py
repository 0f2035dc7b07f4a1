"""Streaming conversion of what users have into a pair store, in bounded memory.

Two input kinds:

* aligned arrays ``x`` (n, d), ``y`` (n, d), ``target`` (n,): ``.npy`` files opened with
  ``mmap_mode="r"`` (or arrays), read one block of ``chunk_rows`` rows at a time;
* an embedding table ``E`` (m, d) plus a pair list (Parquet or CSV) with two row-index
  columns and a target column, read in batches with pyarrow; ``x = E[i]``, ``y = E[j]``.

Input rules (documented in the README, "Store format"):

* vectors must have a floating dtype (float16/32/64), stored as float32; integer or bool
  vectors are an error, since they nearly always mean the wrong file (ids, token counts);
* targets may be integer or float; "binary" means every target is -1 or +1, "graded" means
  [-1, 1]. 0/1 labels are read as binary only with ``zero_is_negative=True`` (0 -> -1);
  without it they are an error rather than a silent graded "0 = unrelated";
* a pair is invalid when a vector has NaN/Inf or is all zero, or its target is NaN/Inf,
  outside [-1, 1], or (binary) not ±1. Invalid pairs are an error naming the count in the
  first chunk that has any, or with ``drop_invalid=True`` are skipped and counted;
* pair indices outside the embedding table are always an error: they mean the pair list
  belongs to another table, which dropping rows would hide.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cosim_dask.data.store import DEFAULT_CODEC, TARGET_KINDS, choose_chunk_rows, create_store
from cosim_dask.data.synthetic import hidden_metric, synthetic_chunk
from cosim_dask.errors import ANY, CosimError, InvalidPairsError, ShapeError, StoreError
from cosim_dask.outputs import room_shortfall

Progress = Callable[[int], None]
ArrayLike = np.ndarray | str | os.PathLike
REASONS = ("nonfinite vector", "zero vector", "nonfinite target", "target outside [-1, 1]",
           "target not ±1")


@dataclass
class IngestReport:
    """What an ingest wrote: pairs kept, pairs dropped by reason, the targets kind."""

    path: str
    n: int
    d: int
    targets: str
    dropped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


def _room_shortfall(store: str | os.PathLike, n: int, d: int, codec: str) -> str | None:
    """Why ``n`` pairs at dimension ``d`` cannot fit where ``store`` goes (None if they can,
    or with a codec: float vectors compress little, but by how much is not known ahead)."""
    if codec != "none":
        return None
    return room_shortfall(store, n * (2 * d + 1) * 4)  # x, y and target in float32


def _describe(src: ArrayLike, name: str) -> str:
    return repr(os.fspath(src)) if isinstance(src, str | os.PathLike) else f"{name} array"


def _load(src: ArrayLike, name: str) -> np.ndarray:
    """A memory map of a .npy file (never read whole), or the array itself."""
    if not isinstance(src, str | os.PathLike):
        return np.asarray(src)
    path = Path(src)
    if not path.is_file():
        raise CosimError(f"{name} file {str(path)!r} does not exist")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise CosimError(f"{name} file {str(path)!r} is not a readable .npy array "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                         ) from exc


def _release(a: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped input this process has touched so far.

    Pages read through a memory map count in the process's RSS until the kernel needs them
    back; dropping them after each block keeps the resident set at a few chunks. The data
    stay in the page cache, so nothing is re-read from disk.
    """
    m = getattr(a, "_mmap", None)
    if isinstance(m, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)


def _check_vectors(a: np.ndarray, what: str) -> None:
    if a.ndim != 2:
        raise ShapeError(f"{what} has shape {a.shape}; expected 2-D (rows, dim)")
    if a.shape[1] < 1:
        raise ShapeError(f"{what} has shape {a.shape}; the dimension must be >= 1")
    if not np.issubdtype(a.dtype, np.floating):
        raise ShapeError(f"{what} has dtype {a.dtype}; vectors must be floating point "
                         "(convert with .astype('float32') if the integers are real values)")


def _check_targets(t: np.ndarray, what: str) -> None:
    if t.ndim != 1:
        raise ShapeError(f"{what} has shape {t.shape}; expected 1-D (pairs,)")
    if not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)
            or t.dtype == np.bool_):
        raise ShapeError(f"{what} has dtype {t.dtype}; targets must be numbers")


def _to_float32(a: np.ndarray) -> np.ndarray:
    # A copy, never a view of a memory map (its pages are released after each block).
    # float64 values beyond float32's range become ±inf, which validation then reports.
    with np.errstate(over="ignore"):
        return np.array(a, dtype=np.float32)


def clean_block(
    x: np.ndarray, y: np.ndarray, t: np.ndarray, *, targets: str | None,
    zero_is_negative: bool, drop_invalid: bool, normalize: bool, chunk: int, row0: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Validate (and optionally drop, map 0 -> -1, L2-normalise) one block of pairs.

    Parameters
    ----------
    x, y : (b, d) float32
    t : (b,) any numeric dtype
    chunk, row0 : the block's number and first source row, for messages

    Returns
    -------
    (x, y, t, dropped) with the kept rows as float32 and counts of dropped rows by reason.

    Raises
    ------
    InvalidPairsError
        Without ``drop_invalid``, when any row is invalid (count, chunk and first row named).
    """
    t = np.asarray(t, dtype=np.float64)
    if zero_is_negative:
        t = np.where(t == 0, -1.0, t)
    bad_vec_x, bad_vec_y = ~np.isfinite(x).all(axis=1), ~np.isfinite(y).all(axis=1)
    checks = {
        "nonfinite vector": bad_vec_x | bad_vec_y,
        "zero vector": ~(x != 0).any(axis=1) | ~(y != 0).any(axis=1),
        "nonfinite target": ~np.isfinite(t),
    }
    with np.errstate(invalid="ignore"):
        checks["target outside [-1, 1]"] = np.abs(t) > 1
        if targets == "binary" or zero_is_negative:
            checks["target not ±1"] = np.isfinite(t) & (np.abs(t) <= 1) & (np.abs(t) != 1)
    # Count each bad row once, under the first reason that applies.
    bad = np.zeros(len(t), dtype=bool)
    dropped: dict[str, int] = {}
    for reason, mask in checks.items():
        new = mask & ~bad
        if new.any():
            dropped[reason] = int(new.sum())
            bad |= new
    if dropped and not drop_invalid:
        first = row0 + int(np.argmax(bad))
        detail = ", ".join(f"{k} {v}" for k, v in dropped.items())
        hint = ""
        if "target not ±1" in dropped and not zero_is_negative and np.any(t == 0):
            hint = " (for 0/1 labels pass {zero_is_negative})"
        raise InvalidPairsError(
            f"{int(bad.sum())} invalid pairs in input chunk {chunk} (rows {row0}-"
            f"{row0 + len(t) - 1}), the first chunk with any: {detail}; first at row "
            f"{first}{hint}; fix the input or pass {{drop_invalid}} to skip them",
            params={"zero_is_negative": True, "drop_invalid": True})
    if dropped:
        keep = ~bad
        x, y, t = x[keep], y[keep], t[keep]
    if normalize and len(t):
        # Norms in float64: squaring large float32 values would overflow.
        x = (x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
        y = (y / np.linalg.norm(y.astype(np.float64), axis=1, keepdims=True)).astype(np.float32)
    return x, y, t.astype(np.float32), dropped


def _write(
    store: str | os.PathLike, d: int, blocks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *, targets: str | None, zero_is_negative: bool, drop_invalid: bool, normalize: bool,
    chunk_rows: int, codec: str, overwrite: bool, provenance: dict,
    progress: Progress | None, inputs: tuple,
) -> IngestReport:
    if targets is not None and targets not in TARGET_KINDS:
        raise CosimError(f"targets={targets!r} must be one of {TARGET_KINDS}")
    if zero_is_negative and targets == "graded":
        raise CosimError("{zero_is_negative} reads 0/1 labels as binary; it cannot be "
                         "combined with {targets}",
                         params={"zero_is_negative": True, "targets": "graded"})
    kind = "binary" if zero_is_negative else targets
    started = time.perf_counter()
    dropped: dict[str, int] = {}
    row0 = 0
    # The output policy refuses a store that is, holds or lies inside one of its input files.
    paths = [src for src in inputs if isinstance(src, str | os.PathLike)]
    with create_store(store, d=d, chunk_rows=chunk_rows, codec=codec, targets=kind,
                      provenance=provenance, overwrite=overwrite, inputs=paths) as writer:
        for chunk, (x, y, t) in enumerate(blocks):
            b = len(t)
            xk, yk, tk, lost = clean_block(
                x, y, t, targets=kind, zero_is_negative=zero_is_negative,
                drop_invalid=drop_invalid, normalize=normalize, chunk=chunk, row0=row0)
            for k, v in lost.items():
                dropped[k] = dropped.get(k, 0) + v
            writer.append(xk, yk, tk)
            row0 += b
            if progress is not None:
                progress(b)
        # `provenance` is the dict the writer stores on leaving this block, so the
        # dropped counts land in the store's attributes.
        provenance["dropped"] = dropped
    # n and targets are final after the block: the last chunk is written on leaving it.
    return IngestReport(path=os.fspath(store), n=writer.n, d=d, targets=writer.targets,
                        dropped=dropped, seconds=time.perf_counter() - started)


def ingest_arrays(
    store: str | os.PathLike, x: ArrayLike, y: ArrayLike, target: ArrayLike | None, *,
    targets: str | None = None, zero_is_negative: bool = False, drop_invalid: bool = False,
    normalize: bool = False, chunk_rows: int | None = None, codec: str = DEFAULT_CODEC,
    overwrite: bool = False, progress: Progress | None = None,
) -> IngestReport:
    """Write aligned arrays ``x`` (n, d), ``y`` (n, d), ``target`` (n,) to a new pair store.

    Each of ``x``, ``y``, ``target`` is a ``.npy`` path (memory-mapped, read one chunk at a
    time) or an array. See the module docstring for dtype, target and invalid-row rules.
    ``target=None`` makes a store of positive pairs only (every target +1), for training
    with in-chunk negatives.

    Parameters
    ----------
    store : str or PathLike
        The store to create (written under a temporary name, renamed at the end).
    targets : {"binary", "graded"}, optional
        How targets are read; inferred when None ("binary" when all are ±1).
    progress : callable, optional
        Called with the number of source rows consumed after each block.

    Returns
    -------
    IngestReport
    """
    xs, ys = _load(x, "x"), _load(y, "y")
    _check_vectors(xs, f"x {_describe(x, 'x')}")
    _check_vectors(ys, f"y {_describe(y, 'y')}")
    if target is None:
        # Broadcast, not allocated: a view of one +1 per row.
        ts = np.broadcast_to(np.float32(1.0), (len(xs),))
    else:
        ts = _load(target, "target")
        _check_targets(ts, f"target {_describe(target, 'target')}")
    if xs.shape != ys.shape:
        raise ShapeError(f"x has shape {xs.shape} but y has shape {ys.shape}; they must match")
    if len(ts) != len(xs):
        raise ShapeError(f"target has {len(ts)} rows but x has {len(xs)}; they must match")
    n, d = xs.shape
    rows = choose_chunk_rows(d, n, chunk_rows)
    if short := _room_shortfall(store, n, d, codec):
        raise StoreError(f"{short}; free some space or write the store elsewhere")

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for lo in range(0, n, rows):
            hi = min(lo + rows, n)
            block = _to_float32(xs[lo:hi]), _to_float32(ys[lo:hi]), np.array(ts[lo:hi])
            for a in (xs, ys, ts):
                _release(a)
            yield block

    provenance = {"command": "ingest", "kind": "arrays", "normalize": normalize,
                  "sources": {k: _source(v) for k, v in (("x", x), ("y", y),
                                                         ("target", target))
                              if v is not None}}
    if target is None:
        provenance["positive_only"] = True
    return _write(store, d, blocks(), targets=targets, zero_is_negative=zero_is_negative,
                  drop_invalid=drop_invalid, normalize=normalize, chunk_rows=rows,
                  codec=codec, overwrite=overwrite, provenance=provenance, progress=progress,
                  inputs=[p for p in (x, y, target) if p is not None])


def _source(src: ArrayLike) -> Any:
    """Provenance of one input: path, size and mtime (hashing a huge file costs a read)."""
    if not isinstance(src, str | os.PathLike):
        a = np.asarray(src)
        return {"array": list(a.shape), "dtype": str(a.dtype)}
    p = Path(src)
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size,
            "mtime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime))}


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError as exc:  # pragma: no cover - pyarrow is installed in tests
        raise CosimError("reading pair lists needs pyarrow: pip install pyarrow "
                         "(or pip install 'cosim-dask[parquet]')") from exc
    return pyarrow


def pair_list_rows(pairs: str | os.PathLike) -> int | None:
    """Number of pairs in a pair list: a Parquet file's footer says it; a CSV file is
    counted in one streaming pass (its first column only, read as text). None when the file
    cannot be read (reading it for real then raises the one-line error).

    The count fixes the chunking (:func:`~cosim_dask.data.store.choose_chunk_rows` evens the
    chunks out when ``n`` is known), so the same pairs as CSV or as Parquet give the same
    store, chunk for chunk, and so the same validation split.
    """
    if not Path(pairs).is_file():
        return None
    try:
        fmt = _pair_format(pairs)
    except CosimError:
        return None
    pa = _pyarrow()
    path = os.fspath(pairs)
    try:
        if fmt == "parquet":
            return int(pa.parquet.ParquetFile(path).metadata.num_rows)
        opts = _csv_parse_options(path)
        with pa.csv.open_csv(path, parse_options=opts) as header:
            first = header.schema.names[0]
        convert = pa.csv.ConvertOptions(include_columns=[first],
                                        column_types={first: pa.string()})
        with pa.csv.open_csv(path, parse_options=opts, convert_options=convert) as reader:
            return sum(batch.num_rows for batch in reader)
    except (pa.ArrowException, OSError, IndexError):
        return None


def _csv_parse_options(path: str) -> Any:
    return _pyarrow().csv.ParseOptions(delimiter="\t" if path.lower().endswith(".tsv") else ",")


def array_rows(path: str | os.PathLike) -> int | None:
    """Rows of a .npy file from its header (for a progress total); None if unreadable."""
    try:
        return int(np.load(os.fspath(path), mmap_mode="r", allow_pickle=False).shape[0])
    except (ValueError, OSError, IndexError):
        return None


def _pair_format(pairs: str | os.PathLike) -> str:
    name = os.fspath(pairs).lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".csv", ".csv.gz", ".tsv")):
        return "csv"
    raise CosimError(f"pair list {os.fspath(pairs)!r} must end in .parquet, .pq, .csv, "
                     ".csv.gz or .tsv")


def _pair_batches(pairs: str | os.PathLike, columns: list[str], rows: int) -> Iterator[Any]:
    """Record batches of at most ``rows`` rows holding ``columns`` (streamed, not whole)."""
    pa = _pyarrow()
    path = os.fspath(pairs)
    if not Path(path).is_file():
        raise CosimError(f"pair list {path!r} does not exist")
    fmt = _pair_format(path)
    try:
        if fmt == "parquet":
            pf = pa.parquet.ParquetFile(path)
            names = pf.schema_arrow.names
            _check_columns(path, names, columns)
            batches = pf.iter_batches(batch_size=rows, columns=columns)
        else:
            opts = _csv_parse_options(path)
            # Fixed column types: pyarrow would otherwise infer them from the first block
            # and fail mid-file on a target "1" followed by "0.5" further down.
            i_col, j_col, t_col = columns
            types = {i_col: pa.int64(), j_col: pa.int64(), t_col: pa.float64()}
            reader = pa.csv.open_csv(path, parse_options=opts,
                                     convert_options=pa.csv.ConvertOptions(column_types=types))
            _check_columns(path, reader.schema.names, columns)
            batches = (b.select(columns) for b in reader)
        yield from _rebatch(pa, batches, rows)
    except pa.ArrowException as exc:
        raise CosimError(f"cannot read pair list {path!r}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from exc


def _rebatch(pa: Any, batches: Iterator[Any], rows: int) -> Iterator[Any]:
    """Batches of exactly ``rows`` rows (the last may be shorter) from batches of any size:
    CSV batches follow pyarrow's block size, Parquet's its row groups. Equal input chunks
    whatever the format make the chunk numbers in messages the same for the same data."""
    pending: list[Any] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        if held < rows:
            continue
        table = pa.Table.from_batches(pending)
        lo = 0
        while held - lo >= rows:
            yield table.slice(lo, rows).combine_chunks().to_batches()[0]
            lo += rows
        rest = table.slice(lo)
        pending, held = (rest.to_batches() if rest.num_rows else []), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _check_columns(path: str, names: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise CosimError(f"pair list {path!r} has no column(s) {missing}; it has {names} "
                         "(choose with {i_column}/{j_column}/{target_column})",
                         params={"i_column": ANY, "j_column": ANY, "target_column": ANY})


def _index_column(batch: Any, name: str, path: str) -> np.ndarray:
    col = batch.column(name)
    if col.null_count:
        raise CosimError(f"pair list {path!r}: column {name!r} has {col.null_count} empty "
                         "values; every pair needs both row indices")
    values = col.to_numpy(zero_copy_only=False)
    if not np.issubdtype(values.dtype, np.integer):
        raise ShapeError(f"pair list {path!r}: column {name!r} has type {col.type}; row "
                         "indices must be integers")
    return values.astype(np.int64)


def ingest_pairs(
    store: str | os.PathLike, embeddings: ArrayLike, pairs: str | os.PathLike, *,
    i_column: str = "i", j_column: str = "j", target_column: str = "target",
    targets: str | None = None, zero_is_negative: bool = False, drop_invalid: bool = False,
    normalize: bool = False, chunk_rows: int | None = None, codec: str = DEFAULT_CODEC,
    overwrite: bool = False, progress: Progress | None = None, n_pairs: int | None = None,
) -> IngestReport:
    """Write pairs ``(E[i], E[j], target)`` from an embedding table and a pair list.

    Parameters
    ----------
    embeddings : .npy path or array
        ``(m, d)`` floating table, memory-mapped; only the rows the pairs name are read.
    pairs : path
        Parquet (``.parquet``/``.pq``) or CSV (``.csv``/``.csv.gz``/``.tsv``, header row)
        with integer columns ``i_column``, ``j_column`` (0-based rows of ``embeddings``)
        and a numeric ``target_column``; read in batches of ``chunk_rows``.

    n_pairs : int, optional
        The pair list's rows, when the caller has counted them already
        (:func:`pair_list_rows`; a CSV is counted in one pass): they set the chunking.

    Other parameters are as in :func:`ingest_arrays`. Indices outside ``[0, m)`` are an
    error even with ``drop_invalid``.

    Returns
    -------
    IngestReport
    """
    path = os.fspath(pairs)
    _pair_format(path)
    if not Path(path).is_file():
        raise CosimError(f"pair list {path!r} does not exist")
    E = _load(embeddings, "embeddings")
    _check_vectors(E, f"embeddings {_describe(embeddings, 'embeddings')}")
    m, d = E.shape
    if n_pairs is None:
        n_pairs = pair_list_rows(pairs)
    rows = choose_chunk_rows(d, n_pairs, chunk_rows)
    if n_pairs and (short := _room_shortfall(store, n_pairs, d, codec)):
        raise StoreError(f"{short}; free some space or write the store elsewhere")
    columns = [i_column, j_column, target_column]
    if len(set(columns)) != 3:
        raise CosimError(f"the index and target columns must differ, got {columns}")
    pa = _pyarrow()

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        row0 = 0
        for chunk, batch in enumerate(_pair_batches(path, columns, rows)):
            i = _index_column(batch, i_column, path)
            j = _index_column(batch, j_column, path)
            out = (i < 0) | (i >= m) | (j < 0) | (j >= m)
            if out.any():
                k = int(np.argmax(out))
                raise CosimError(
                    f"pair list {path!r}: {int(out.sum())} pairs in chunk {chunk} point "
                    f"outside the embedding table (rows 0..{m - 1}); first at row "
                    f"{row0 + k}: i={int(i[k])}, j={int(j[k])}")
            tcol = batch.column(target_column)
            if not (pa.types.is_integer(tcol.type) or pa.types.is_floating(tcol.type)
                    or pa.types.is_boolean(tcol.type) or pa.types.is_null(tcol.type)):
                raise ShapeError(f"pair list {path!r}: column {target_column!r} has type "
                                 f"{tcol.type}; targets must be numbers")
            # Nulls become NaN, then count as invalid targets (droppable).
            t = np.asarray(tcol.cast(pa.float64()).to_numpy(zero_copy_only=False),
                           dtype=np.float64)
            # Gather from the memory map in sorted order: sequential reads, then reorder.
            block = _gather(E, i), _gather(E, j), t
            _release(E)
            yield block
            row0 += len(t)

    provenance = {"command": "ingest", "kind": "pairs", "normalize": normalize,
                  "columns": {"i": i_column, "j": j_column, "target": target_column},
                  "sources": {"embeddings": _source(embeddings), "pairs": _source(path)}}
    return _write(store, d, blocks(), targets=targets, zero_is_negative=zero_is_negative,
                  drop_invalid=drop_invalid, normalize=normalize, chunk_rows=rows,
                  codec=codec, overwrite=overwrite, provenance=provenance, progress=progress,
                  inputs=(embeddings, path))


def _gather(E: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``E[idx]`` as float32, reading a memory map in ascending row order."""
    order = np.argsort(idx, kind="stable")
    out = np.empty((len(idx), E.shape[1]), dtype=np.float32)
    with np.errstate(over="ignore"):
        out[order] = E[idx[order]]
    return out


def generate_store(
    store: str | os.PathLike, *, pairs: int, dim: int, rank: int | None = None,
    noise: float = 0.05, targets: str = "graded", seed: int = 0,
    chunk_rows: int | None = None, codec: str = DEFAULT_CODEC, overwrite: bool = False,
    progress: Progress | None = None,
) -> IngestReport:
    """Write ``pairs`` synthetic pairs from a hidden metric A* (stored as ``hidden_metric``).

    Streams one chunk at a time (:func:`cosim_dask.data.synthetic.synthetic_chunk`, seeded by
    ``(seed, chunk)``), so memory stays at a few chunks for any ``pairs``; the same
    ``(seed, chunk_rows)`` always gives the same data.

    Parameters
    ----------
    pairs, dim : int
        Store shape ``(pairs, dim)``.
    rank : int, optional
        Rank of A* (default ``dim``).
    noise : float
        Standard deviation of the Gaussian noise added to sim(x, y; A*).
    targets : {"graded", "binary"}
        Clipped noisy similarity, or its sign.

    Returns
    -------
    IngestReport
    """
    if pairs < 1:
        raise CosimError(f"pairs={pairs} must be >= 1")
    if dim < 1:
        raise CosimError(f"dim={dim} must be >= 1")
    if targets not in TARGET_KINDS:
        raise CosimError(f"targets={targets!r} must be one of {TARGET_KINDS}")
    if not noise >= 0:
        raise CosimError(f"noise={noise!r} must be >= 0")
    rows = choose_chunk_rows(dim, pairs, chunk_rows)
    if short := _room_shortfall(store, pairs, dim, codec):
        raise StoreError(f"{short}; generate fewer {{pairs}} or write elsewhere",
                         params={"pairs": ANY})
    rank = dim if rank is None else rank
    A_star = hidden_metric(dim, rank, seed)
    started = time.perf_counter()
    params = {"pairs": pairs, "dim": dim, "rank": rank, "noise": noise, "targets": targets,
              "seed": seed, "chunk_rows": rows}
    provenance = {"command": "generate", "params": params}
    with create_store(store, d=dim, chunk_rows=rows, codec=codec, targets=targets,
                      hidden_metric=A_star, provenance=provenance,
                      overwrite=overwrite) as writer:
        for chunk, lo in enumerate(range(0, pairs, rows)):
            b = min(rows, pairs - lo)
            writer.append(*synthetic_chunk(b, A_star, noise=noise, targets=targets,
                                           seed=seed, chunk=chunk))
            if progress is not None:
                progress(b)
    return IngestReport(path=os.fspath(store), n=writer.n, d=dim, targets=targets,
                        seconds=time.perf_counter() - started)
