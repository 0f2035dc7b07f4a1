"""Writing stores and models so that a crash or a bad input never leaves a half-written file:
everything is written under a temporary name beside the target, then renamed into place."""

from __future__ import annotations

import os
import shutil
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
