"""Reading a pair store's chunks on the worker that needs them.

Uncompressed chunks of a local store are read straight from their files into the
destination arrays (the zarr v3 ``bytes`` codec stores a chunk as its raw C-order bytes);
everything else goes through zarr. The direct path exists for speed: inside a Dask worker
(whose nanny sets MALLOC_TRIM_THRESHOLD_) zarr's read of a 32k × 128 chunk page-faults a
fresh copy of it and ran at a third of its in-process speed, ~3× the cost of one pread into
the destination.

Streaming tasks read into per-thread buffers reused from chunk to chunk (``reuse=True``):
their chunk is gone when the task ends. Anything that keeps the arrays (persisted data)
gets fresh ones.

Read-ahead overlaps reading with computing (:func:`prefetch`): a streaming task starts the
read of a later task's chunks before it computes its own. For a local store that pulls the
files into the page cache every worker of the machine shares; for a store in object storage
(no shared cache) the chunks are read into this worker's memory, at most
:data:`AHEAD_GROUPS` tasks' worth, and a task that finds its chunks there takes them
(:func:`read_group`).

Every read checks what it reads: that the chunk files exist and have their size
(:func:`check_chunk_files`), and that the store at the path is still the one the run
started with (:func:`check_identity`, by the fingerprint a :class:`StoreSlice` carries):
a store regenerated at the same path, or another store at the same relative path on a
worker, is an error rather than other data.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cosim_dask.objectstore as objectstore
from cosim_dask.data.split import chunk_slices
from cosim_dask.errors import StoreError
from cosim_dask.outputs import is_url

ARRAYS = ("x", "y", "target")

_buffers = threading.local()
_prefetcher: ThreadPoolExecutor | None = None
_prefetcher_lock = threading.Lock()

#: Tasks' worth of chunks a worker process holds read ahead from object storage at most: the
#: memory read-ahead may take. The oldest is dropped (its read cancelled if not started).
AHEAD_GROUPS = 3
_ahead: OrderedDict[tuple, Future] = OrderedDict()
#: Reads served from read-ahead (``hits``) or read by the task itself (``misses``), in this
#: process, for object-storage stores: how well read-ahead guessed.
AHEAD_STATS = {"hits": 0, "misses": 0}


#: How long a task waits for a store folder that is missing before it reports the store as
#: invisible: replacing a store renames the old one aside, then the new one in, and a read
#: between the two renames must see the new store, not an error about the folder.
MISSING_WAIT_SECONDS = 1.0


@dataclass(frozen=True)
class StoreSlice:
    """Rows [lo, hi) of chunk ``index`` of a pair store, read by the worker itself.

    ``path`` is absolute for a local store (workers have working directories of their own)
    and ``identity`` the store's fingerprint when the run started (None: not checked).
    """

    path: str
    index: int
    lo: int
    hi: int
    identity: str | None = None


@functools.lru_cache(maxsize=8)
def _open_arrays(path: str, identity: str | None = None):
    # Keyed by the identity too: a store replaced at the same path is opened afresh rather
    # than read with the old store's cached metadata.
    import zarr

    group = zarr.open_group(path, mode="r")
    return group["x"], group["y"], group["target"]


def store_identity(path: str) -> str | None:
    """The fingerprint of the pair store at ``path`` as it is now (attributes read afresh,
    no cache), or None when no readable pair store is there.

    Raises :class:`StoreError` when a local ``path`` does not exist on this machine (after
    waiting :data:`MISSING_WAIT_SECONDS` for a replacement to finish): the workers cannot see
    the store.
    """
    from cosim_dask.data.store import FORMAT, fingerprint

    if is_url(path):
        # One GET of the version's zarr.json (``path`` is the version a pointer named).
        with objectstore.storage_errors(path):
            attrs = (objectstore.read_metadata(path) or {}).get("attributes") or {}
    else:
        deadline = time.monotonic() + MISSING_WAIT_SECONDS
        while not os.path.isdir(path):
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"the workers cannot see the pair store {path!r} (no such folder on "
                    f"worker host {socket.gethostname()!r}); keep the store on a filesystem "
                    "every worker mounts at the same path, or give an object-store URL "
                    "(s3://..., gs://...) instead")
            time.sleep(0.05)
        try:
            # A zarr v3 group keeps its attributes in zarr.json: one small file, read
            # directly, so the check costs a task next to nothing.
            with open(os.path.join(path, "zarr.json"), "rb") as f:
                attrs = json.load(f).get("attributes") or {}
        except (OSError, ValueError, AttributeError):
            return None
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        return None
    return fingerprint(attrs)


def check_identity(piece: StoreSlice) -> None:
    """Raise :class:`StoreError` when the store at ``piece.path`` is not the one the run
    started with (``piece.identity``): it was replaced or regenerated meanwhile, or this
    worker sees another store at that path."""
    if piece.identity is None:
        return
    found = store_identity(piece.path)
    if found != piece.identity:
        what = "no readable pair store" if found is None else f"fingerprint {found}"
        raise StoreError(
            f"the pair store {piece.path!r} changed under this run: it started with the store "
            f"of fingerprint {piece.identity}, but worker host {socket.gethostname()!r} found "
            f"{what} there (replaced or regenerated while being read); keep a store unchanged "
            "while a run reads it (write a new store under a new name) and run again"
        )


def read_slice(piece: StoreSlice, *, reuse: bool = False
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read one chunk's rows on the worker; a corrupt or unreadable chunk names itself.

    ``reuse=True`` reads into this thread's buffers, valid until its next reuse read: only
    for callers that are done with the arrays before they read again.
    """
    return read_group([piece], reuse=reuse)[0]


def read_group(pieces: Sequence[StoreSlice], *, reuse: bool = False
               ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Read consecutive chunks of one store with one read per array; one tuple each.

    In a local store every chunk file is checked first (:func:`check_chunk_files`): zarr
    reads a missing chunk file as zeros and blosc decodes a truncated one into garbage. The
    store's identity is checked before the read and again after it (:func:`check_identity`):
    a store replaced by a rename during the read is caught by the second check.
    """
    if is_url(pieces[0].path):
        ready = _take_ahead(pieces)
        if ready is not None:
            return ready
    return _read_group(pieces, reuse=reuse)


def _read_group(pieces: Sequence[StoreSlice], *, reuse: bool = False
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    first, last = pieces[0], pieces[-1]
    check_identity(first)
    arrays = _open_arrays(first.path, first.identity)
    out = []
    for name, array in zip(ARRAYS, arrays, strict=True):
        for piece in pieces:
            check_chunk_files(piece, name, array)
        shape = (last.hi - first.lo, *array.shape[1:])
        try:
            if direct_readable(first.path, array):
                dest = (_reused(name, shape, array.dtype) if reuse
                        else np.empty(shape, dtype=array.dtype))
                _read_direct(Path(first.path) / name, array, first.lo, last.hi, dest)
            else:
                dest = np.asarray(array[first.lo : last.hi])
        except StoreError:
            raise
        except Exception as exc:  # zarr/codec errors have many types; name the chunk
            if (storage := objectstore.explain(exc, first.path)) is not None:
                raise storage from None
            where = (f"chunk {first.index} (rows {first.lo}:{first.hi})" if len(pieces) == 1
                     else f"chunks {first.index}-{last.index} (rows {first.lo}:{last.hi})")
            raise StoreError(
                f"cannot read {where} of array {name!r} in {first.path!r}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        out.append(dest)
    check_identity(first)
    return [tuple(a[p.lo - first.lo : p.hi - first.lo] for a in out) for p in pieces]


def direct_readable(path: str, array) -> bool:
    """True when ``array``'s chunk files hold exactly their values' bytes in C order, in
    this machine's byte order: a local zarr v3 array, unsharded, with no filters and no
    compressors."""
    if is_url(path) or not hasattr(array.metadata, "encode_chunk_key"):
        return False
    if array.shards or array.compressors or array.filters:
        return False
    serializer = array.serializer
    endian = getattr(serializer, "endian", None)
    if type(serializer).__name__ != "BytesCodec" or not array.dtype.isnative:
        return False
    return array.dtype.itemsize == 1 or endian is None or endian.value == sys.byteorder


def _read_direct(folder: Path, array, lo: int, hi: int, dest: np.ndarray) -> None:
    """Rows [lo, hi) of ``array`` into ``dest`` with one pread per chunk file."""
    grid = array.chunks[0]
    row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
    flat = memoryview(dest.reshape(-1).view(np.uint8))
    for c in range(lo // grid, (hi - 1) // grid + 1):
        r0, r1 = max(lo, c * grid), min(hi, (c + 1) * grid)
        key = array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1))
        target = flat[(r0 - lo) * row_bytes : (r1 - lo) * row_bytes]
        _pread_into(folder / key, target, (r0 - c * grid) * row_bytes)


def _pread_into(path: Path, target: memoryview, offset: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(target):
            n = os.preadv(fd, [target[done:]], offset + done)
            if n == 0:
                raise StoreError(f"chunk file {str(path)!r} ended after {offset + done} bytes "
                                 f"(truncated or corrupt); restore the store or re-create it "
                                 "with `cosim ingest`")
            done += n
    finally:
        os.close(fd)


def _reused(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """This thread's read buffer for array ``name``, grown as needed, cut to ``shape``."""
    cache = _buffers.__dict__.setdefault("arrays", {})
    size = int(np.prod(shape, dtype=np.int64))
    buf = cache.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = cache[name] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def prefetch(pieces: Sequence[StoreSlice]) -> None:
    """Start reading the chunks of ``pieces`` (a later task's) in a background thread and
    return at once: the files of a local store into the OS page cache, the chunks of a store
    in object storage into this process's memory (:func:`read_group` takes them).

    A streaming task otherwise waits for its own read before it computes; with a later
    chunk's files already in the page cache its read is a memory copy. ``posix_fadvise``
    (WILLNEED) is no substitute: Linux caps it at the readahead window (128 kB), so the
    files are read for real, with ``sendfile`` to /dev/null (no copy into this process).
    Errors are left for the real read to report.
    """
    if not pieces:
        return
    if is_url(pieces[0].path):
        _read_ahead(pieces)
        return
    _executor().submit(_touch, list(pieces))


def _executor() -> ThreadPoolExecutor:
    """This process's one read-ahead thread: reads ahead are sequential, never competing
    with each other for the network or the disk."""
    global _prefetcher
    with _prefetcher_lock:
        if _prefetcher is None:
            _prefetcher = ThreadPoolExecutor(1, thread_name_prefix="cosim-prefetch")
        return _prefetcher


def _read_ahead(pieces: Sequence[StoreSlice]) -> None:
    """Start reading ``pieces`` (a later task's chunks in object storage) into memory."""
    key = tuple(pieces)
    executor = _executor()
    with _prefetcher_lock:
        if key in _ahead:
            return
        _ahead[key] = executor.submit(_read_group, list(pieces))
        while len(_ahead) > AHEAD_GROUPS:
            _, dropped = _ahead.popitem(last=False)
            dropped.cancel()


def _take_ahead(pieces: Sequence[StoreSlice]
                ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
    """The chunks of ``pieces`` if they were read ahead (waiting for a read under way);
    None when they were not, or their read failed (the task's own read reports why)."""
    with _prefetcher_lock:
        future = _ahead.pop(tuple(pieces), None)
        AHEAD_STATS["hits" if future is not None else "misses"] += 1
    if future is None:
        return None
    try:
        return future.result()
    except Exception:  # noqa: BLE001 - read again, and fail, in the task itself
        return None


def _touch(pieces: list[StoreSlice]) -> None:
    try:
        paths = [path for piece in pieces for path in chunk_files(piece)]
        null = os.open(os.devnull, os.O_WRONLY)
    except Exception:  # noqa: BLE001 - the task's own read reports a bad store
        return
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                size, done = os.fstat(fd).st_size, 0
                while done < size:
                    n = os.sendfile(null, fd, done, size - done)
                    if n <= 0:
                        break
                    done += n
            except OSError:
                pass
            finally:
                os.close(fd)
    finally:
        os.close(null)


def chunk_files(piece: StoreSlice) -> list[Path]:
    """The chunk (or shard) files that hold ``piece``'s rows, for every array."""
    return [path for name, array in zip(ARRAYS, _open_arrays(piece.path, piece.identity),
                                        strict=True)
            for path in _array_files(piece, name, array)]


def _array_files(piece: StoreSlice, name: str, array) -> list[Path]:
    """The files of array ``name`` (its chunks, or shards) that hold ``piece``'s rows."""
    grid = (array.shards or array.chunks)[0]
    return [Path(piece.path) / name / array.metadata.encode_chunk_key(
                (c,) + (0,) * (array.ndim - 1))
            for c in range(piece.lo // grid, (piece.hi - 1) // grid + 1)]


def check_chunk_files(piece: StoreSlice, name: str, array) -> None:
    """Raise :class:`StoreError` when a local chunk file of ``piece`` is missing or truncated.

    Missing: zarr silently reads the fill value (0), which is either an invalid pair or,
    for graded targets, a wrong but valid target. Truncated: uncompressed chunks have a
    known size, blosc chunks state theirs in the header (numcodecs does not check it).
    Stores given as URLs are not checked. Flipped bits inside a compressed chunk are not
    detectable without checksums.
    """
    if is_url(piece.path) or not hasattr(array.metadata, "encode_chunk_key"):
        return
    whole = not array.shards and not array.compressors and not array.filters
    size = int(np.prod(array.chunks)) * array.dtype.itemsize
    blosc = not array.shards and any(type(c).__name__ == "BloscCodec"
                                      for c in array.compressors)
    for path in _array_files(piece, name, array):
        problem = None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            problem = "is missing (zarr would read it as zeros)"
        else:
            if whole and st.st_size != size:
                problem = f"has {st.st_size} bytes, expected {size} (truncated or corrupt)"
            elif blosc:
                with open(path, "rb") as f:
                    header = f.read(16)
                stated = int.from_bytes(header[12:16], "little") if len(header) == 16 else -1
                if stated != st.st_size:
                    problem = (f"has {st.st_size} bytes, its blosc header says {stated} "
                               "(truncated or corrupt)")
        if problem:
            raise StoreError(
                f"chunk {piece.index} (rows {piece.lo}:{piece.hi}) of array {name!r} in "
                f"{piece.path!r} is damaged: chunk file {str(path)!r} {problem}; restore the "
                "store or re-create it with `cosim ingest`"
            )


def check_all_chunks(path: str, arrays: dict, n: int, chunk_rows: int) -> None:
    """Raise :class:`StoreError` unless every chunk of every array of the store at ``path``
    is stored: the check :func:`~cosim_dask.data.store.open_store` makes once, before any run.

    A local store has each chunk file checked as every read checks it
    (:func:`check_chunk_files`: present, and of its size). A URL store has zarr's count of
    stored chunks compared with the chunk grid, and the first missing chunk named.
    """
    if not is_url(path):
        for index, rows in enumerate(chunk_slices(n, chunk_rows)):
            piece = StoreSlice(path, index, rows.start, rows.stop)
            for name, array in arrays.items():
                check_chunk_files(piece, name, array)
        return
    for name, array in arrays.items():
        try:
            stored, total = array.nchunks_initialized, array.nchunks
        except Exception as exc:  # noqa: BLE001 - a store that cannot be listed
            raise StoreError(f"cannot list the chunks of array {name!r} in {path!r} "
                             f"({type(exc).__name__}); check the URL and its credentials"
                             ) from None
        if stored < total:
            raise StoreError(
                f"array {name!r} in {path!r} is damaged: {_first_missing(array)} "
                f"{stored} of its {total} chunks are stored (zarr would read the missing ones "
                "as zeros); restore the store or re-create it with `cosim ingest`")


def _first_missing(array) -> str:
    """"chunk K (object KEY) is missing;" for the first chunk of ``array`` not in its store,
    or "" when the store cannot say which."""
    try:
        from zarr.core.sync import sync

        grid = (array.shards or array.chunks)[0]
        for c in range(-(-array.shape[0] // grid)):
            key = array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1))
            if not sync((array.store_path / key).exists()):
                return f"chunk {c} (object {array.store_path.path}/{key}) is missing;"
    except Exception:  # noqa: BLE001 - naming the chunk is a courtesy; the count is the error
        pass
    return ""
