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
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import StoreError

ARRAYS = ("x", "y", "target")

_buffers = threading.local()
_prefetcher: ThreadPoolExecutor | None = None
_prefetcher_lock = threading.Lock()


@dataclass(frozen=True)
class StoreSlice:
    """Rows [lo, hi) of chunk ``index`` of a pair store, read by the worker itself."""

    path: str
    index: int
    lo: int
    hi: int


@functools.lru_cache(maxsize=8)
def _open_arrays(path: str):
    import zarr

    group = zarr.open_group(path, mode="r")
    return group["x"], group["y"], group["target"]


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
    reads a missing chunk file as zeros and blosc decodes a truncated one into garbage.
    """
    first, last = pieces[0], pieces[-1]
    arrays = _open_arrays(first.path)
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
            where = (f"chunk {first.index} (rows {first.lo}:{first.hi})" if len(pieces) == 1
                     else f"chunks {first.index}-{last.index} (rows {first.lo}:{last.hi})")
            raise StoreError(
                f"cannot read {where} of array {name!r} in {first.path!r}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from None
        out.append(dest)
    return [tuple(a[p.lo - first.lo : p.hi - first.lo] for a in out) for p in pieces]


def direct_readable(path: str, array) -> bool:
    """True when ``array``'s chunk files hold exactly their values' bytes in C order, in
    this machine's byte order: a local zarr v3 array, unsharded, with no filters and no
    compressors."""
    if "://" in path or not hasattr(array.metadata, "encode_chunk_key"):
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
    """Start pulling the chunk files of ``pieces`` (a later task's) into the OS page cache,
    in a background thread, and return at once.

    A streaming task otherwise waits for its own read before it computes; with a later
    chunk's files already in the page cache its read is a memory copy. ``posix_fadvise``
    (WILLNEED) is no substitute: Linux caps it at the readahead window (128 kB), so the
    files are read for real, with ``sendfile`` to /dev/null (no copy into this process).
    Errors are left for the real read to report.
    """
    if not pieces or "://" in pieces[0].path:
        return
    global _prefetcher
    with _prefetcher_lock:
        if _prefetcher is None:
            _prefetcher = ThreadPoolExecutor(1, thread_name_prefix="cosim-prefetch")
    _prefetcher.submit(_touch, list(pieces))


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
    return [path for name, array in zip(ARRAYS, _open_arrays(piece.path), strict=True)
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
    if "://" in piece.path or not hasattr(array.metadata, "encode_chunk_key"):
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
