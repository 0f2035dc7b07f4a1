"""Writing stores and models so that a crash or a bad input never leaves a half-written file:
everything is written under a temporary name beside the target, then renamed into place.
:func:`output_lock` keeps two runs from writing the same output at once."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CosimError


def check_new_output(path: str | os.PathLike, *, overwrite: bool, what: str = "output") -> Path:
    """Fail early, before any work, when ``path`` exists and ``overwrite`` is off."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CosimError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise CosimError(f"the folder {str(path.parent)!r} for {what} {str(path)!r} does not exist")
    return path


@contextmanager
def atomic_directory(
    path: str | os.PathLike, *, overwrite: bool, what: str = "output"
) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success move it to ``path``.

    On any exception the temporary directory is removed and an existing ``path`` is untouched.
    When replacing, the old directory is moved aside first and removed only after the new one
    is in place, so at every moment one complete version exists on disk.
    """
    path = check_new_output(path, overwrite=overwrite, what=what)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def replace_directory(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing ``dst`` if it exists, old kept until done."""
    if dst.exists():
        aside = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, aside)
        os.replace(src, dst)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(src, dst)


@contextmanager
def atomic_file(
    path: str | os.PathLike, *, overwrite: bool, what: str = "output"
) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; on success rename it to ``path``.

    The single-file counterpart of :func:`atomic_directory`: on any exception the temporary
    file is removed and an existing ``path`` is untouched; ``os.replace`` is atomic on one
    file system, so readers see the old file or the new one, never a part.
    """
    path = check_new_output(path, overwrite=overwrite, what=what)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_lock(lock: Path) -> tuple[int | None, str]:
    try:
        text = lock.read_text().split()
        return int(text[0]), text[1]
    except (OSError, ValueError, IndexError):
        return None, "?"


@contextmanager
def output_lock(path: str | os.PathLike, *, what: str = "output") -> Iterator[Path]:
    """Hold ``PATH.lock`` (created with O_EXCL, holding ``pid host``) while writing ``path``.

    A second writer of the same ``path`` gets a :class:`CosimError` at once. A lock left by a
    process that died on this host (a SIGKILLed run) is taken over. The lock is removed on
    leaving the block, also on errors.
    """
    path = Path(path)
    lock = path.with_name(path.name + ".lock")
    if not path.parent.exists():
        raise CosimError(f"the folder {str(path.parent)!r} for {what} {str(path)!r} does not exist")
    host = socket.gethostname()
    mine = f"{os.getpid()} {host}\n"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, owner = _read_lock(lock)
            if pid is not None and owner == host and not _pid_alive(pid):
                _take_over(lock, pid, owner)
                continue
            raise CosimError(
                f"{what} {str(path)!r} is being written by another cosim run (pid {pid} on "
                f"{owner}, lock file {str(lock)!r}); wait for it to finish, or delete the lock "
                "file if that run is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        break
    else:
        raise CosimError(f"cannot take the lock {str(lock)!r} of {what} {str(path)!r}")
    try:
        yield lock
    finally:
        if _read_lock(lock) == (os.getpid(), host):
            lock.unlink(missing_ok=True)


def _take_over(lock: Path, pid: int, host: str) -> None:
    """Remove a stale lock, unless another process replaced it meanwhile."""
    aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return  # another process took it over first
    if _read_lock(aside) != (pid, host):  # a fresh lock: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)
