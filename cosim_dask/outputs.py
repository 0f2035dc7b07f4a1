"""The output policy: every command that writes (generate, ingest, train, transform, report, and
``save_model`` for the estimator) writes through :func:`claim_output`, and nothing else in the
package replaces or removes a user's path.

What a claim guarantees, in order:

1. **The real path.** ``OUT`` is made absolute and its symlinks resolved: a symlinked output stays
   a symlink, and the file or folder it points to is what gets replaced.
2. **One writer.** An exclusive ``fcntl.flock`` on ``OUT.lock`` beside the output is taken before
   anything is checked and held to the end. A second writer (or a writer of a store that a
   training run is reading, see :func:`reading`) gets a one-line error naming the holder. The
   lock dies with its process: a SIGKILLed run leaves nothing that blocks the next one.
3. **Never an input.** An output that is, contains or lies inside one of the command's inputs is
   refused, even with ``overwrite``.
4. **Only its own kind.** With ``overwrite`` an existing path is replaced only when it is the
   command's kind of artifact (:class:`Kind`): a pair store only by a pair store, a model only by
   a model, a ``.npy`` only by a ``.npy``, a report only by a report; an empty folder may be
   replaced by a store or model; a folder holding anything else never is.
5. **Old or new, never a part.** Each version is written under ``.OUT.tmp-TOKEN`` beside the output
   and swapped in: folders with ``renameat2(RENAME_EXCHANGE)`` (one atomic step on Linux), files
   with ``os.replace``. Where the exchange is not supported, the old folder is renamed aside
   (``.OUT.old-TOKEN``) and the new one into place; if a crash falls between those two renames,
   the next claim or open of ``OUT`` (:func:`recover`) finishes the swap (the temporary folder of
   the same token is complete by then) or rolls it back.
6. **No litter.** On an error, Ctrl-C or SIGTERM the temporary version is removed once the store
   library's background I/O has stopped. Temporary and aside versions left by a killed writer are
   removed by the next claim of the same path: holding the lock proves their writer dead.
7. **Plain writes.** Files are written with ``write`` calls, never through a memory map of a sparse
   file, so a full disk is an ``OSError`` (ENOSPC), reported as one line, not a SIGBUS.

**Object storage** (an fsspec URL such as ``s3://bucket/pairs.zarr``; pair stores and models
only) has no rename and no lock, so the same claim/stage API commits another way
(:class:`UrlOutput`, layout in :mod:`cosim_dask.objectstore`):

- Each version is written in full under its own prefix ``OUT/v-<time>-<token>/``; the one PUT
  of ``OUT/zarr.json`` naming it publishes it. Until then readers (``open_store``,
  ``load_model``) keep opening the previous version, or refuse a URL that has none
  ("incomplete"), so a store or model is never read half written; the previous version is
  deleted after the new one is published (a run still reading it stops with the "changed under
  this run" error, as for a local store replaced during a run).
- Checks 3 and 4 hold as for local paths (URLs are compared as strings; an existing URL is
  replaced only when its pointer names the same kind; a prefix holding other objects never).
  An error or Ctrl-C deletes the unpublished version.
- **Limits.** No lock spans machines: two writers of one URL at once are not detected, and the
  last to publish wins (each publishes only a complete version). A version left by a killed
  writer is never read; the next writer of the URL deletes it once it is older than
  :data:`STALE_SECONDS` (a younger one may belong to a live writer elsewhere). Readers hold
  no lock either: replacing a store that a run is reading stops that run, with its checkpoint
  intact.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cosim_dask.objectstore as objectstore
from cosim_dask.errors import CosimError
from cosim_dask.objectstore import is_url


class OutputError(CosimError):
    """An output that may not be written: exists, wrong kind, one of the inputs, locked, ..."""


class LockUnavailable(OutputError):
    """The lock file cannot be created (a read-only folder, say)."""


@dataclass(frozen=True)
class Kind:
    """A kind of artifact a command writes, and how to recognise an existing one.

    Folders (``directory``) are Zarr groups whose ``zarr.json`` has ``attributes.format`` equal
    to ``format`` and which hold only ``members`` at the top level. Files start with ``magic``
    and, when ``marker`` is set, hold it within their first 4 KiB.
    """

    name: str
    directory: bool
    format: str | None = None
    members: frozenset[str] = frozenset()
    magic: bytes = b""
    marker: bytes = b""
    #: fsync every file before the version is published (proof against power loss, not only
    #: against a killed process). Off for pair stores: tens of thousands of chunk files, and a
    #: store can be written again from its sources.
    durable: bool = True

    def mismatch(self, path: Path) -> str | None:
        """Why the existing ``path`` is not of this kind (None when it is)."""
        if self.directory:
            return self._folder_mismatch(path)
        if path.is_dir():
            return "it is a folder"
        if not path.is_file():
            return "it is not a regular file"
        with open(path, "rb") as f:
            head = f.read(4096)
        if not head.startswith(self.magic) or self.marker not in head:
            return f"it is not a {self.name} written by cosim"
        return None

    def _folder_mismatch(self, path: Path) -> str | None:
        if not path.is_dir():
            return "it is a file, not a folder"
        names = {p.name for p in path.iterdir()}
        if not names:
            return None  # an empty folder holds nothing to lose
        try:
            meta = json.loads((path / "zarr.json").read_text())
            found = (meta.get("attributes") or {}).get("format")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != self.format:
            return f"it is not a cosim {self.name}"
        others = sorted(names - self.members)
        if others:
            return f"it holds other files ({', '.join(map(repr, others[:3]))})"
        return None


PAIR_STORE = Kind("pair store", True, "cosim-pairs",
                  frozenset({"zarr.json", "x", "y", "target", "hidden_metric"}), durable=False)
MODEL = Kind("model", True, "cosim-model", frozenset({"zarr.json", "A", "M", "solver"}))
NPY_ARRAY = Kind(".npy array", False, magic=b"\x93NUMPY")
HTML_REPORT = Kind("report", False, magic=b"<!DOCTYPE html>",
                   marker=b'<meta name="generator" content="cosim-dask')

_TOKEN = r"[0-9a-f]{16}"


def real_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute with every symlink resolved (the parts that exist)."""
    real = Path(os.path.abspath(os.fspath(path))).resolve()
    if not real.name:
        raise OutputError(f"{os.fspath(path)!r} is the root folder; name a file or folder in it")
    return real


#: Age after which an unpublished version at a URL is taken for a killed writer's and deleted
#: by the next writer (no lock across machines tells a live writer from a dead one).
STALE_SECONDS = 24 * 3600


def exists(path: str | os.PathLike) -> bool:
    """Whether an artifact is at ``path``: a local file or folder, or a published version
    (or a Zarr group written in place) at a URL."""
    if is_url(path):
        return objectstore.current(os.fspath(path))[1] in ("pointer", "plain")
    return os.path.exists(os.fspath(path))


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _litter(path: Path, what: str) -> list[tuple[str, Path]]:
    """``(token, path)`` of the ``.NAME.tmp-TOKEN`` / ``.NAME.old-TOKEN`` siblings of ``path``."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{what}-({_TOKEN})")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    return [(m.group(1), Path(e.path)) for e in entries if (m := pattern.fullmatch(e.name))]


# ------------------------------------------------------------------------------ checks


def check_output(
    path: str | os.PathLike, kind: Kind, *, overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (), shown: str | None = None,
) -> Path | str:
    """Every check of the policy that needs no lock; returns the real path (a URL as it is).

    ``overwrite`` allows replacing an existing artifact of ``kind`` (resuming a run counts as
    replacing its model). Raises :class:`OutputError` with one line naming the path and the fix.
    """
    shown = os.fspath(path) if shown is None else shown
    if is_url(path):
        _check_url_output(os.fspath(path), kind, overwrite=overwrite, inputs=inputs, shown=shown)
        return os.fspath(path)
    real = real_path(path)
    if not real.parent.is_dir():
        raise OutputError(f"the folder {str(real.parent)!r} for the {kind.name} {shown!r} does "
                          "not exist; create it first")
    _check_not_input(path, inputs, shown=shown)
    if real.exists() or real.is_symlink():
        if not overwrite:
            raise OutputError(f"{kind.name} {shown!r} already exists; pass {{overwrite}} to "
                              "replace it", params={"overwrite": True})
        why = kind.mismatch(real) if real.exists() else "it is a broken link"
        if why:
            raise OutputError(f"refusing to replace {shown!r}: {why}; a {kind.name} replaces "
                              f"only a {kind.name}: remove it yourself or choose another path")
    return real


def _check_url_output(url: str, kind: Kind, *, overwrite: bool,
                      inputs: Iterable[str | os.PathLike], shown: str) -> None:
    """:func:`check_output` for a URL: object storage holds pair stores and models only."""
    if not kind.directory:
        raise OutputError(f"the {kind.name} {shown!r} must be a local path: only pair stores "
                          "and models are written to object storage")
    here = url.rstrip("/")
    for source in inputs:
        if source is None or not is_url(source):
            continue
        src = os.fspath(source).rstrip("/")
        if here == src or here.startswith(src + "/") or src.startswith(here + "/"):
            relation = ("is" if here == src else "lies inside" if here.startswith(src + "/")
                        else "contains")
            raise OutputError(f"the output {shown!r} {relation} the input "
                              f"{os.fspath(source)!r}; choose another output path")
    location, state = objectstore.current(here)
    if state in ("missing", "incomplete") and _only_versions(here):
        return
    if not overwrite:
        raise OutputError(f"{kind.name} {shown!r} already exists; pass {{overwrite}} to "
                          "replace it", params={"overwrite": True})
    found = objectstore.pointer_of(objectstore.read_metadata(here))
    if found is None or found.get("format") != kind.format:
        why = ("it is a Zarr group written in place, not published by cosim" if state == "plain"
               else f"it is not a cosim {kind.name}" if found is not None
               else "it holds other objects")
        raise OutputError(f"refusing to replace {shown!r}: {why}; a {kind.name} replaces only "
                          f"a {kind.name}: remove it yourself or choose another path")
    others = [n for n in objectstore.entries(here)
              if n != objectstore.METADATA and not objectstore.VERSION.fullmatch(n)]
    if others:
        raise OutputError(f"refusing to replace {shown!r}: it holds other objects "
                          f"({', '.join(map(repr, others[:3]))}); remove them yourself or "
                          "choose another path")


def _only_versions(url: str) -> bool:
    """Whether everything under ``url`` is an unpublished version (a killed writer's)."""
    return all(objectstore.VERSION.fullmatch(n) for n in objectstore.entries(url))


def _check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike],
                    *, shown: str | None = None) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (compared as real
    paths: relative parts and symlinks resolved)."""
    shown = os.fspath(path) if shown is None else shown
    real = real_path(path)
    for source in inputs:
        if source is None or is_url(source):
            continue
        src = real_path(source)
        if real == src:
            raise OutputError(f"the output {shown!r} is the input {os.fspath(source)!r}; choose "
                              "another output path")
        if src.is_relative_to(real):
            raise OutputError(f"the output {shown!r} contains the input {os.fspath(source)!r}; "
                              "choose another output path")
        if real.is_relative_to(src):
            raise OutputError(f"the output {shown!r} lies inside the input "
                              f"{os.fspath(source)!r}; choose another output path")


# ------------------------------------------------------------------------------- locks


def _owner(lock: Path) -> str:
    """The writer named in the lock file; readers write nothing, and a writer that died
    without removing its lock file is no longer the holder."""
    try:
        pid, host = lock.read_text().split()[:2]
        alive = host != socket.gethostname() or _pid_alive(int(pid))
    except (OSError, ValueError):
        return "another cosim run"
    return f"another cosim run (pid {pid} on {host})" if alive else "another cosim run"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _flock(lock: Path, exclusive: bool, shown: str, kind: Kind) -> int:
    """An open, flocked file descriptor of ``lock``; :class:`OutputError` when it is held."""
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LockUnavailable(f"cannot lock the {kind.name} {shown!r} ({str(lock)!r}): "
                                  f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(
                f"the {kind.name} {shown!r} is in use by {_owner(lock)}, which is writing or "
                f"reading it (lock file {str(lock)!r}); wait for that run to finish"
            ) from None
        # The last holder unlinks the file while holding it: a lock taken on an unlinked
        # file locks nothing, so make sure ours is the one at the path.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _unlock(fd: int, lock: Path) -> None:
    """Release ``lock``; the last holder (the one that can take it exclusively) removes it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                os.unlink(lock)
    except BlockingIOError:
        pass  # a reader still holds it
    finally:
        os.close(fd)


@contextmanager
def reading(path: str | os.PathLike, kind: Kind = PAIR_STORE) -> Iterator[None]:
    """Hold a shared lock on ``path`` while a run reads it, so that no command replaces it
    meanwhile (a writer's claim is refused). Several readers may hold it at once. Best effort:
    a store in a folder this process cannot write to, or a URL, is read without it."""
    if is_url(path):
        yield
        return
    real = real_path(path)
    try:
        fd = _flock(lock_path(real), False, os.fspath(path), kind)
    except LockUnavailable:
        yield
        return
    try:
        yield
    finally:
        _unlock(fd, lock_path(real))


# ---------------------------------------------------------------- file-system operations
# Every change to the file system goes through these few functions: the crash tests count
# them and kill the process at each one in turn.

_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap ``a`` and ``b`` atomically (Linux renameat2 with RENAME_EXCHANGE)."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _rename(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_tree(path: Path) -> None:
    """fsync every file under ``path`` (or ``path`` itself), so a rename never publishes a
    version whose data is still only in memory."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if path.is_dir():
        for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            _sync_folder(folder)


def _drain_store_io(timeout: float = 60.0) -> None:
    """Wait until zarr's background I/O has stopped: an exception (Ctrl-C above all) can leave
    its event loop still writing chunks into a folder we are about to remove."""
    try:
        import asyncio

        from zarr.core import sync as zsync
    except ImportError:  # pragma: no cover - zarr is a dependency
        return

    async def drain() -> None:
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    loop = zsync.loop[0]
    if loop is not None and loop.is_running():
        with contextlib.suppress(Exception):
            zsync.sync(drain())


# ----------------------------------------------------------------------- recovery


def recover(path: str | os.PathLike) -> None:
    """Finish or roll back a folder swap that a killed writer left half done (``path``
    missing, its ``.old-`` version beside it) and remove the temporary versions killed writers
    left, if no live writer holds the lock. Called by the loaders before they open ``path``; a
    no-op (one directory listing) when there is nothing to repair."""
    if is_url(path):
        return
    real = real_path(path)
    if not (_litter(real, "old") or _litter(real, "tmp")):
        return
    try:
        fd = _flock(lock_path(real), True, os.fspath(path), MODEL)
    except OutputError:
        return  # a live writer is in the middle of its swap
    try:
        _finish_swaps(real)
    finally:
        _unlock(fd, lock_path(real))


def _finish_swaps(real: Path) -> None:
    """Under the lock: repair an interrupted swap, then remove every temporary version."""
    if not real.exists():
        temps = dict(_litter(real, "tmp"))
        for token, old in _litter(real, "old"):
            # The old version is moved aside only once the new one (same token) is complete.
            _rename(temps.pop(token) if token in temps else old, real)
            break
    for _, stale in _litter(real, "tmp") + _litter(real, "old"):
        _remove(stale)
    _sync_folder(real.parent)


# ----------------------------------------------------------------------- the claim


class UrlOutput:
    """A claimed output URL: checked; write versions with :meth:`staged` (see the module
    docstring, "Object storage")."""

    def __init__(self, url: str, kind: Kind, shown: str) -> None:
        self.path, self.kind, self.shown = url, kind, shown

    @contextmanager
    def staged(self) -> Iterator[str]:
        """Yield the URL of a fresh version prefix; write the new version there. On leaving
        the block the version is published (the pointer names it) and the previous one
        deleted; on an exception it is deleted and the output left as it was."""
        name = f"v-{int(time.time()):010d}-{secrets.token_hex(8)}"
        version = objectstore.join(self.path, name)
        try:
            with objectstore.storage_errors(self.shown):
                yield version
            before = objectstore.pointer_of(objectstore.read_metadata(self.path))
            objectstore.write_pointer(self.path, self.kind.format, name)
        except BaseException as exc:
            _drain_store_io()
            with contextlib.suppress(Exception):
                objectstore.remove(version)
            if isinstance(exc, OSError) and not isinstance(exc, CosimError):
                raise OutputError(f"cannot write {self.kind.name} {self.shown!r}: "
                                  f"{exc.strerror or exc} ({type(exc).__name__}); the "
                                  "previous version, if any, is intact") from exc
            raise
        if before is not None and before["current"] != name:
            with contextlib.suppress(Exception):  # an old version left over is never read
                objectstore.remove(objectstore.join(self.path, before["current"]))


def _remove_stale(url: str) -> None:
    """Delete the unpublished versions at ``url`` older than :data:`STALE_SECONDS`."""
    found = objectstore.pointer_of(objectstore.read_metadata(url))
    now = time.time()
    for name in objectstore.versions(url):
        if (found is None or name != found["current"]) and \
                now - objectstore.version_time(name) > STALE_SECONDS:
            objectstore.remove(objectstore.join(url, name))


class Output:
    """A claimed output path: locked, checked, cleaned; write versions with :meth:`staged`."""

    def __init__(self, real: Path, kind: Kind, shown: str) -> None:
        self.path, self.kind, self.shown = real, kind, shown

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """Yield a fresh temporary path beside the output (a folder already created for folder
        kinds); write the new version there. On leaving the block it replaces the output in
        one step; on an exception it is removed and the output is left as it was.

        An ``OSError`` (disk full, file too large, permissions) becomes one
        :class:`OutputError` line saying what was kept.
        """
        tmp = self.path.with_name(f".{self.path.name}.tmp-{secrets.token_hex(8)}")
        existed = self.path.exists()
        try:
            if self.kind.directory:
                tmp.mkdir()
            yield tmp
            if self.kind.durable:
                _sync_tree(tmp)
            self._swap_in(tmp)
        except BaseException as exc:
            _drain_store_io()
            _remove(tmp)
            if isinstance(exc, OSError):
                kept = (f"the previous {self.shown!r} is intact" if existed
                        else "nothing was written")
                raise OutputError(
                    f"cannot write {self.kind.name} {self.shown!r}: "
                    f"{exc.strerror or exc} ({type(exc).__name__}); {kept}") from exc
            raise

    def _swap_in(self, tmp: Path) -> None:
        if not self.path.exists():
            _rename(tmp, self.path)
        elif not self.kind.directory:
            _rename(tmp, self.path)  # os.replace of a file is atomic
        else:
            try:
                _exchange(tmp, self.path)
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
                    raise
                # No atomic exchange here: two renames, repaired by recover() if interrupted.
                aside = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
                _rename(self.path, aside)
                _rename(tmp, self.path)
                tmp = aside
            _remove(tmp)  # the old version, now under the temporary name
        _sync_folder(self.path.parent)


def room_shortfall(path: str | os.PathLike, nbytes: int) -> str | None:
    """Why a local output of about ``nbytes`` cannot fit on its file system (None if it can,
    or for a URL: object storage has no free space to ask). The new version is complete
    before an old one is removed, so an output being replaced needs the whole room too.
    Writers ask before they write: otherwise a write fails only when the disk is full,
    after minutes, having filled it for every other program meanwhile."""
    shown = os.fspath(path)
    if is_url(shown):
        return None
    folder = real_path(path).parent
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if nbytes <= free:
        return None
    return (f"{shown!r} would need about {_size(nbytes)} but the file system of "
            f"{str(folder)!r} has {_size(free)} free")


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,} bytes"


@contextmanager
def claim_output(
    path: str | os.PathLike, kind: Kind, *, overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[Output | UrlOutput]:
    """Lock ``path`` for writing, check it against the policy, clean what killed writers left,
    and yield an :class:`Output`; the lock is released (and its file removed) on leaving.

    A URL (pair stores and models) yields a :class:`UrlOutput`: checked the same way, no
    lock (object storage has none; see the module docstring)."""
    shown = os.fspath(path)
    if is_url(shown):
        check_output(shown, kind, overwrite=overwrite, inputs=inputs, shown=shown)
        _remove_stale(shown.rstrip("/"))
        yield UrlOutput(shown.rstrip("/"), kind, shown)
        return
    real = real_path(path)
    if not real.parent.is_dir():
        check_output(path, kind, overwrite=overwrite, inputs=inputs, shown=shown)
    fd = _flock(lock_path(real), True, shown, kind)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _finish_swaps(real)
        check_output(path, kind, overwrite=overwrite, inputs=inputs, shown=shown)
        yield Output(real, kind, shown)
    finally:
        _unlock(fd, lock_path(real))
