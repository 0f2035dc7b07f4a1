"""The Zarr v3 pair-store format: create, write chunk by chunk, open as Dask arrays, split.

A pair store is a Zarr v3 group (a local directory, or, at an fsspec URL such as
``s3://bucket/pairs.zarr``, the version its pointer names: :mod:`cosim_dask.objectstore`)
holding three aligned arrays chunked along the pair axis only::

    x       (n, d) float32   chunks (chunk_rows, d)
    y       (n, d) float32   chunks (chunk_rows, d)
    target  (n,)   float32   chunks (chunk_rows,)
    hidden_metric (d, d) float64, one chunk     (generated stores only: A*)

and group attributes naming the format and its version, ``n``, ``d``, ``chunk_rows``, how the
targets are read (``"binary"`` ±1 or ``"graded"`` in [-1, 1]), the codec, target statistics,
a creation uuid and provenance. The format attributes are written last, when every chunk is in
place, so a store whose writing stopped half-way is never mistaken for a complete one; stores
are moreover written as a new version and published in one step (:mod:`cosim_dask.outputs`).

The train/validation split needs no second copy of the data: it is drawn per chunk by
:func:`cosim_dask.data.split.validation_mask`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
import zarr.codecs

import cosim_dask.objectstore as objectstore
from cosim_dask import __version__
from cosim_dask.data.reader import check_all_chunks
from cosim_dask.data.split import chunk_slices, validation_mask
from cosim_dask.errors import CosimError, StoreError
from cosim_dask.outputs import PAIR_STORE, claim_output, is_url, recover

if TYPE_CHECKING:  # pragma: no cover
    import dask.array

FORMAT = "cosim-pairs"
FORMAT_VERSION = 1
TARGET_KINDS = ("binary", "graded")

#: Bytes of one ``x`` chunk the default chunking aims at: 16 MiB is 32,768 rows at d = 128
#: (x and y together 32 MiB), about 50-90 ms of gradient work per task (measured: keep tasks
#: >= ~50 ms). Measured (scripts/bench_store.py): chunks of 32 MiB or more per array read
#: 2-4x slower warm, because glibc serves allocations >= 32 MiB with fresh mmap'd pages that
#: fault in on every read. See README "Store format".
TARGET_CHUNK_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 1024
MAX_CHUNK_ROWS = 2**20

#: Codec names -> zarr ``create_array`` keyword arguments. The default is chosen by
#: scripts/bench_store.py: Gaussian or model float32 embeddings compress only to ~0.92-0.95
#: of raw, so compression buys little disk and costs read speed, which every epoch pays.
CODECS: dict[str, dict[str, Any]] = {
    "none": {"compressors": None},
    "lz4": {"compressors": zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle",
                                                  typesize=4)},
    "zstd1": {"compressors": zarr.codecs.ZstdCodec(level=1)},
    "zstd3": {"compressors": zarr.codecs.ZstdCodec(level=3)},
    "blosc-zstd": {"compressors": zarr.codecs.BloscCodec(cname="zstd", clevel=3,
                                                         shuffle="shuffle", typesize=4)},
}
DEFAULT_CODEC = "none"

#: Histogram bins over [-1, 1] kept for graded targets (`cosim info`).
HIST_BINS = 10


def default_chunk_rows(d: int) -> int:
    """Pairs per chunk for dimension ``d``: the largest power of two with an ``x`` chunk
    of at most :data:`TARGET_CHUNK_BYTES` (32,768 at d = 128), within [1,024, 1,048,576]."""
    rows = TARGET_CHUNK_BYTES // (4 * max(int(d), 1))
    rows = 1 << max(int(rows).bit_length() - 1, 0)
    return int(min(max(rows, MIN_CHUNK_ROWS), MAX_CHUNK_ROWS))


def choose_chunk_rows(d: int, n: int | None, chunk_rows: int | None) -> int:
    """Pairs per chunk: ``chunk_rows`` if given, else the default for ``d``; never above
    ``n`` when the number of pairs is known.

    With the default and a known ``n`` the chunks are evened out (1,000,000 pairs at
    d = 128: 31 chunks of 32,259, not 30 of 32,768 and a runt): zarr stores an uncompressed
    edge chunk at full size, and equal chunks make equal Dask tasks.
    """
    rows = default_chunk_rows(d) if chunk_rows is None else int(chunk_rows)
    if rows < 1:
        raise CosimError(f"chunk_pairs={rows} must be >= 1")
    if n:
        if chunk_rows is None:
            rows = -(-n // -(-n // rows))
        rows = min(rows, n)
    return rows


@dataclass(frozen=True)
class PairStore:
    """An opened pair store: metadata plus lazily read Dask arrays in the store's chunks.

    The Dask arrays (:attr:`x`, :attr:`y`, :attr:`target`) are made on first use: training
    reads chunks through :mod:`cosim_dask.data.reader` and never needs them, and importing
    ``dask.array`` (SciPy with it, when installed) costs ~0.5 s of every run's start-up.
    """

    path: str
    n: int
    d: int
    chunk_rows: int
    targets: str
    attrs: dict
    #: The zarr arrays x, y and target, checked by :func:`open_store`.
    arrays: tuple = field(repr=False, compare=False)
    hidden_metric: np.ndarray | None
    fingerprint: str
    #: Where the arrays are read from: ``path`` itself, or for a URL the published version
    #: its pointer names (immutable: a replacement is a new version).
    location: str | None = None

    @cached_property
    def x(self) -> dask.array.Array:
        """x vectors, (n, d) float32, in the store's row chunks."""
        return _from_zarr(self.arrays[0])

    @cached_property
    def y(self) -> dask.array.Array:
        """y vectors, (n, d) float32, in the store's row chunks."""
        return _from_zarr(self.arrays[1])

    @cached_property
    def target(self) -> dask.array.Array:
        """Targets, (n,) float32, in the store's row chunks."""
        return _from_zarr(self.arrays[2])

    @property
    def source(self) -> str:
        """The path or URL the chunks are read from (:attr:`location`, else :attr:`path`)."""
        return self.location or self.path

    @property
    def positive_only(self) -> bool:
        """Every target is +1: a binary store whose target statistics count no −1 (checked
        against the arrays' size when the store was opened)."""
        return self._counts_none("count_neg")

    @property
    def negative_only(self) -> bool:
        """Every target is −1: a binary store whose target statistics count no +1."""
        return self._counts_none("count_pos")

    def _counts_none(self, count: str) -> bool:
        stats = self.attrs.get("target_stats") or {}
        return self.targets == "binary" and stats.get(count) == 0

    @property
    def n_chunks(self) -> int:
        """Number of row chunks (the last may be shorter)."""
        return -(-self.n // self.chunk_rows)

    def chunk_slices(self) -> list[slice]:
        """The row range of each chunk, in order: ``[slice(0, c), slice(c, 2c), ...]``."""
        return chunk_slices(self.n, self.chunk_rows)


def _from_zarr(array: zarr.Array) -> dask.array.Array:
    import dask.array as da  # deferred: see PairStore

    return da.from_zarr(array)


def fingerprint(attrs: dict) -> str:
    """A stable 16-hex-digit id of a store's content identity (format, shape, chunking,
    creation uuid): the same store always gives the same value, a rewrite a new one."""
    keys = ("format", "format_version", "n", "d", "chunk_rows", "targets", "uuid")
    blob = json.dumps({k: attrs.get(k) for k in keys}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def open_store(path: str | os.PathLike) -> PairStore:
    """Open a pair store lazily.

    Parameters
    ----------
    path : str or PathLike
        A store directory or an fsspec URL.

    Returns
    -------
    PairStore
        ``x`` and ``y`` are ``(n, d)`` and ``target`` ``(n,)`` Dask arrays whose chunks are
        exactly the store's row chunks (no rechunk).

    Raises
    ------
    StoreError
        One line naming the path and the fix when the store is missing, is not a cosim pair
        store, has another format version, arrays that disagree with its attributes (shape,
        float32 dtype, the same row chunks and shards for x, y and target), target
        statistics of the wrong form or contradicting the declared target kind, or a chunk
        that is not stored (named with its file; zarr would read it as zeros).

    Everything later runs rely on is checked here, once; each read checks its own chunk
    files and the store's identity again (:mod:`cosim_dask.data.reader`), since a file can
    vanish, or the store be replaced, after this.

    A URL opens the version its pointer names (:mod:`cosim_dask.objectstore`); one that no
    writer has published yet is refused as incomplete.
    """
    spath = os.fspath(path)
    if is_url(spath):
        with objectstore.storage_errors(spath):
            return _open_store(spath, objectstore.locate(
                spath, "pair store", StoreError,
                "create one with `cosim generate` or `cosim ingest`"))
    recover(spath)  # a swap a killed writer left half done
    if not Path(spath).exists():
        raise StoreError(f"pair store {spath!r} does not exist; create one with "
                         "`cosim generate` or `cosim ingest`")
    return _open_store(spath, spath)


def _open_store(spath: str, location: str) -> PairStore:
    """:func:`open_store` of the Zarr group at ``location`` (``spath`` for a local store),
    shown to the user as ``spath``."""
    try:
        # A URL: Zarr v3 only, sparing zarr's requests for v2 metadata (.zgroup, ...).
        group = zarr.open_group(location, mode="r",
                                zarr_format=3 if is_url(location) else None)
    except Exception as exc:  # zarr raises several kinds; all mean "no readable group here"
        raise StoreError(f"{spath!r} is not a cosim pair store (no Zarr group: "
                         f"{type(exc).__name__}); create one with `cosim ingest`") from exc
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{spath!r} is not a cosim pair store (format attribute "
                         f"{attrs.get('format')!r}, expected {FORMAT!r}); create one with "
                         "`cosim ingest` or `cosim generate`")
    if attrs.get("format_version") != FORMAT_VERSION:
        raise StoreError(f"pair store {spath!r} has format version "
                         f"{attrs.get('format_version')!r}; this cosim-dask reads version "
                         f"{FORMAT_VERSION}: re-create it with `cosim ingest`")
    try:
        n, d, rows = int(attrs["n"]), int(attrs["d"]), int(attrs["chunk_rows"])
        kind = str(attrs["targets"])
        arrays = {name: group[name] for name in ("x", "y", "target")}
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"pair store {spath!r} is incomplete ({exc!s} missing or malformed); "
                         "re-create it with `cosim ingest`") from exc
    expected = {"x": ((n, d), (rows, d)), "y": ((n, d), (rows, d)), "target": ((n,), (rows,))}
    for name, (shape, chunks) in expected.items():
        arr = arrays[name]
        if not isinstance(arr, zarr.Array) or arr.shape != shape or arr.chunks != chunks:
            got = (getattr(arr, "shape", None), getattr(arr, "chunks", None))
            raise StoreError(f"pair store {spath!r} is inconsistent: {name} has shape/chunks "
                             f"{got}, attributes say {shape}/{chunks}; re-create it")
        if arr.dtype != np.float32:  # numbers only: nothing is ever unpickled
            raise StoreError(f"pair store {spath!r} is inconsistent: {name} has dtype "
                             f"{arr.dtype}, expected floating point (float32); re-create it")
    # Shards, like chunks, must cut the rows of x, y and target at the same places: a task's
    # rows are read from each array by the same grid.
    shards = {name: (arr.shards or arr.chunks)[0] for name, arr in arrays.items()}
    if len(set(shards.values())) != 1:
        raise StoreError(f"pair store {spath!r} is inconsistent: x, y and target are stored "
                         f"in row blocks of {shards}; re-create it")
    if kind not in TARGET_KINDS:
        raise StoreError(f"pair store {spath!r} has targets={kind!r}, expected one of "
                         f"{TARGET_KINDS}; re-create it")
    _check_target_stats(spath, attrs.get("target_stats"), kind, n)
    # Every chunk must be stored: zarr reads a missing one as its fill value (0).
    check_all_chunks(location, arrays, n, rows)
    hidden = None
    if "hidden_metric" in group:
        stored = group["hidden_metric"]
        if not isinstance(stored, zarr.Array) or stored.dtype.kind != "f":
            raise StoreError(f"pair store {spath!r} is inconsistent: hidden_metric is not a "
                             "floating-point array; re-create it")
        if stored.shape != (d, d):
            raise StoreError(f"pair store {spath!r} is inconsistent: hidden_metric has shape "
                             f"{stored.shape}, expected {(d, d)}; re-create it")
        if stored.nchunks_initialized < stored.nchunks:
            raise StoreError(f"pair store {spath!r} is damaged: a chunk of hidden_metric is "
                             "missing (zarr would read it as zeros); re-create it")
        hidden = np.asarray(stored[...], dtype=np.float64)
    return PairStore(
        path=spath, n=n, d=d, chunk_rows=rows, targets=kind, attrs=attrs,
        arrays=(arrays["x"], arrays["y"], arrays["target"]),
        hidden_metric=hidden, fingerprint=fingerprint(attrs),
        location=None if location == spath else location,
    )


_STAT_COUNTS = ("count_pos", "count_neg", "count_zero")


def _check_target_stats(spath: str, stats: Any, kind: str, n: int) -> None:
    """The ``target_stats`` attribute must be of the form the writer gives it and agree with
    the declared target kind: "binary" means every one of the n targets is +1 or -1.

    The stats were counted over every target written, so a contradiction means the
    attributes or the arrays were changed by hand, or belong to another store.
    """
    def damaged(problem: str) -> StoreError:
        return StoreError(f"pair store {spath!r} is damaged: {problem}; restore the store or "
                          "re-create it with `cosim ingest`")

    if not isinstance(stats, dict):
        raise damaged(f"target_stats is {type(stats).__name__}, expected a dict of counts")
    counts = {}
    for key in _STAT_COUNTS:
        value = stats.get(key)
        if not _is_count(value):
            raise damaged(f"target_stats.{key} is {value!r}, expected a count >= 0")
        counts[key] = value
    hist = stats.get("hist_counts")
    if (not isinstance(hist, list) or len(hist) != HIST_BINS
            or not all(_is_count(c) for c in hist)):
        raise damaged(f"target_stats.hist_counts is {hist!r}, expected {HIST_BINS} counts")
    mean = stats.get("mean")
    if isinstance(mean, bool) or not isinstance(mean, int | float) or not abs(mean) <= 1:
        raise damaged(f"target_stats.mean is {mean!r}, expected a number in [-1, 1]")
    # Every target lies in [-1, 1] (ingest checks it), so the histogram counts all n.
    if sum(hist) != n:
        raise damaged(f"target_stats count {sum(hist)} targets, the arrays hold n={n}")
    if kind == "binary" and counts["count_pos"] + counts["count_neg"] != n:
        other = n - counts["count_pos"] - counts["count_neg"]
        raise damaged(f"targets are declared binary (+1/-1) but target_stats count {other} "
                      "other values")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class TargetStats:
    """Running counts over written targets; decides "binary" and feeds `cosim info`."""

    pos: int = 0
    neg: int = 0
    zero: int = 0
    other: int = 0
    total: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, dtype=np.int64))

    def add(self, t: np.ndarray) -> None:
        self.pos += int(np.count_nonzero(t == 1))
        self.neg += int(np.count_nonzero(t == -1))
        self.zero += int(np.count_nonzero(t == 0))
        self.other = self.other + t.size - int(np.count_nonzero((t == 1) | (t == -1)))
        self.total += float(np.sum(t, dtype=np.float64))
        self.hist += np.histogram(t, bins=HIST_BINS, range=(-1.0, 1.0))[0]

    def as_attrs(self, n: int) -> dict:
        return {"count_pos": self.pos, "count_neg": self.neg, "count_zero": self.zero,
                "mean": self.total / n if n else 0.0,
                "hist_edges": np.linspace(-1, 1, HIST_BINS + 1).round(6).tolist(),
                "hist_counts": self.hist.tolist()}


class PairStoreWriter:
    """Append pairs in blocks of any size; whole chunks are written as they fill up.

    Memory holds at most one chunk plus the block being appended. Use through
    :func:`create_store`, which finalises the attributes and renames the store into place.
    """

    def __init__(self, group: zarr.Group, *, d: int, chunk_rows: int, codec: str,
                 shard_chunks: int | None = None) -> None:
        if codec not in CODECS:
            raise CosimError(f"codec={codec!r} is not one of {sorted(CODECS)}")
        self.group, self.d, self.chunk_rows, self.codec = group, d, chunk_rows, codec
        # With sharding, write whole shards: writing one inner chunk at a time would make
        # zarr re-read and re-write the shard file for every chunk.
        self.write_rows = chunk_rows * (shard_chunks or 1)
        opts: dict[str, Any] = dict(CODECS[codec])
        shards = None if not shard_chunks else (self.write_rows,)
        # write_empty_chunks: zarr would skip a chunk that is all zeros (an all-zero target
        # chunk, zero-padded vectors), and the readers' chunk-file check
        # (reader.check_chunk_files) would then report it as missing.
        self.arrays = {
            name: group.create_array(
                name, shape=(0, *tail), chunks=(chunk_rows, *tail), dtype="float32",
                fill_value=0.0, shards=None if shards is None else shards + tail,
                config={"write_empty_chunks": True}, **opts)
            for name, tail in (("x", (d,)), ("y", (d,)), ("target", ()))
        }
        self.n = 0
        self.targets: str | None = None  # decided by finish()
        self.stats = TargetStats()
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    def append(self, x: np.ndarray, y: np.ndarray, t: np.ndarray) -> None:
        """Queue ``x`` (b, d), ``y`` (b, d) and ``t`` (b,), writing every chunk that fills."""
        if len(t) == 0:
            return
        self._pending.append((np.asarray(x, np.float32), np.asarray(y, np.float32),
                              np.asarray(t, np.float32)))
        self._pending_rows += len(t)
        if self._pending_rows >= self.write_rows:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self._pending:
            return
        if len(self._pending) == 1:  # the usual case (blocks of chunk_rows): no copy
            x, y, t = self._pending[0]
        else:
            x, y, t = (np.concatenate(parts) for parts in zip(*self._pending, strict=True))
        full = len(t) if final else len(t) // self.write_rows * self.write_rows
        lo, hi = self.n, self.n + full
        if full:
            for name, data in (("x", x), ("y", y), ("target", t)):
                arr = self.arrays[name]
                if arr.shape[0] < hi:
                    arr.resize((hi, *arr.shape[1:]))
                arr[lo:hi] = data[:full]
            self.stats.add(t[:full])
            self.n = hi
        # Copies, so the leftover rows do not keep the whole concatenated block alive.
        rest = (x[full:].copy(), y[full:].copy(), t[full:].copy())
        self._pending = [rest] if len(rest[2]) else []
        self._pending_rows = len(rest[2])

    def finish(self, *, targets: str | None, attrs: dict) -> dict:
        """Write what is left, then the format attributes; returns the attributes."""
        self._flush(final=True)
        if self.n == 0:
            raise StoreError("no pairs to write: the input has no (valid) rows")
        s = self.stats
        if targets is None:
            if s.other == 0:
                targets = "binary"
            elif s.neg == 0 and s.zero > 0 and s.other == s.zero:
                # every target is 0 or 1: almost surely 0/1 labels, and reading 0 as a
                # graded "unrelated" would silently train the wrong thing.
                raise CosimError("targets are all 0 or 1: pass {zero_is_negative} to read "
                                 "them as binary (0 -> -1), or {targets} to keep them",
                                 params={"zero_is_negative": True, "targets": "graded"})
            else:
                targets = "graded"
        full = {
            **attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "n": self.n,
            "d": self.d, "chunk_rows": self.chunk_rows, "targets": targets, "codec": self.codec,
            "target_stats": s.as_attrs(self.n),
        }
        self.targets = targets
        full.setdefault("uuid", uuid.uuid4().hex)
        full.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
        self.group.attrs.update(full)
        return full


@contextmanager
def create_store(
    path: str | os.PathLike, *, d: int, chunk_rows: int | None = None,
    codec: str = DEFAULT_CODEC, targets: str | None = None,
    hidden_metric: np.ndarray | None = None, provenance: dict | None = None,
    overwrite: bool = False, shard_chunks: int | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[PairStoreWriter]:
    """Create a pair store and yield a :class:`PairStoreWriter` to fill it.

    On leaving the block the store is finalised (format attributes last) and, for a local
    path, swapped into place through the output policy (:mod:`cosim_dask.outputs`: locked,
    replaces only a pair store, never one of ``inputs``); on an exception nothing is left and
    an existing store at ``path`` is untouched. ``targets=None`` infers "binary" when every
    target is ±1.

    Parameters
    ----------
    path : str or PathLike
        Store directory or fsspec URL (both published in one step when complete).
    d : int
        Vector dimension.
    chunk_rows : int, optional
        Pairs per chunk; default :func:`default_chunk_rows` of ``d``.
    hidden_metric : numpy.ndarray, optional
        ``(d, d)`` A* of a generated store.
    inputs : paths
        The files the pairs come from: the store may not be, contain or lie inside one.
    provenance : dict, optional
        JSON-serialisable record of how the store was made.
    """
    if d < 1:
        raise CosimError(f"dim={d} must be >= 1")
    if targets is not None and targets not in TARGET_KINDS:
        raise CosimError(f"targets={targets!r} must be one of {TARGET_KINDS}")
    rows = choose_chunk_rows(d, None, chunk_rows)
    if provenance is None:
        provenance = {}
    attrs = {"cosim_version": __version__, "provenance": provenance}
    if hidden_metric is not None:
        attrs["hidden_metric_rank"] = (provenance or {}).get("params", {}).get("rank")

    def fill(group: zarr.Group) -> Iterator[PairStoreWriter]:
        writer = PairStoreWriter(group, d=d, chunk_rows=rows, codec=codec,
                                 shard_chunks=shard_chunks)
        if hidden_metric is not None:
            group.create_array("hidden_metric", data=np.asarray(hidden_metric, np.float64),
                               compressors=None)
        yield writer
        writer.finish(targets=targets, attrs=attrs)

    with claim_output(path, PAIR_STORE, overwrite=overwrite, inputs=inputs) as target, \
            target.staged() as tmp:
        yield from fill(zarr.open_group(str(tmp), mode="w", zarr_format=3))


def bytes_on_disk(path: str | os.PathLike) -> int:
    """Bytes the store occupies: file sizes for a directory, stored chunk bytes for a URL."""
    spath = os.fspath(path)
    if not is_url(spath):
        return sum(f.stat().st_size for f in Path(spath).rglob("*") if f.is_file())
    with objectstore.storage_errors(spath):
        location, _ = objectstore.current(spath)
        group = zarr.open_group(location, mode="r")
        return int(sum(arr.nbytes_stored() for _, arr in group.arrays()))


def store_info(path: str | os.PathLike, *, validation: float | None = None,
               seed: int = 0) -> dict:
    """Everything `cosim info` shows, as a JSON-ready dict (reads attributes, not data).

    With ``validation`` set, also the sizes of the split
    :func:`~cosim_dask.data.split.validation_mask` gives for
    that fraction and ``seed`` (random draws only, about 1 s per 100 million pairs).
    """
    store = open_store(path)
    a = store.attrs
    info: dict[str, Any] = {
        "path": store.path, "format": f"{FORMAT} v{FORMAT_VERSION}",
        "fingerprint": store.fingerprint, "n": store.n, "d": store.d,
        "chunk_rows": store.chunk_rows, "n_chunks": store.n_chunks,
        "codec": a.get("codec"), "dtype": str(store.x.dtype), "targets": store.targets,
        "bytes_in_memory": int(store.x.nbytes + store.y.nbytes + store.target.nbytes),
        "bytes_on_disk": bytes_on_disk(path), "target_stats": a.get("target_stats"),
        "created": a.get("created"), "uuid": a.get("uuid"),
        "cosim_version": a.get("cosim_version"), "provenance": a.get("provenance"),
    }
    if validation is not None:
        n_val = sum(int(validation_mask(k, sl.stop - sl.start, validation, seed).sum())
                    for k, sl in enumerate(store.chunk_slices()))
        info["validation"] = {"fraction": validation, "seed": seed,
                              "validation_pairs": n_val, "train_pairs": store.n - n_val}
    if store.hidden_metric is not None:
        eig = np.linalg.eigvalsh(store.hidden_metric)
        info["hidden_metric"] = {
            "rank": a.get("hidden_metric_rank"),
            "eigenvalues_min_max": [float(eig[0]), float(eig[-1])],
        }
    return info
