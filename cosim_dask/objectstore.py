"""Object storage (fsspec URLs: ``s3://bucket/key``, ``memory://...``): the few operations the
output and input policies need on it, and one-line errors for what goes wrong there.

**Credentials** come from where the storage library looks for them, never from cosim's own
arguments: for S3, botocore's chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and ``~/.aws``, an instance role) and ``AWS_ENDPOINT_URL`` for S3-compatible
services (MinIO, Ceph). So they are never written into a model, the live page or a log, and
every Dask worker reads them from its own environment.

**Layout.** Object storage cannot rename, so an artifact (a pair store or a model) at URL ``U``
is a pointer and immutable versions::

    U/zarr.json              a Zarr group whose attributes name the current version:
                             {"cosim_pointer": {"format": "cosim-pairs", "current": "v-..."}}
    U/v-<unix time>-<token>/ a complete Zarr group (the store or model itself)

A version is written in full first; writing the pointer (one PUT, which readers see whole or
not at all) publishes it. Plain Zarr opens a version as ``zarr.open_group(U)["v-..."]``. A
Zarr group written in place at ``U`` (by another tool) is read as it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from cosim_dask.errors import CosimError

POINTER = "cosim_pointer"
VERSION = re.compile(r"v-(\d{10})-[0-9a-f]{16}")
#: How a pointer's target is found in ``U``'s listing (names only, no nested keys).
METADATA = "zarr.json"


class StorageError(CosimError):
    """Object storage refused or could not do what was asked (credentials, bucket, network)."""


def is_url(path: object) -> bool:
    """True for fsspec URLs (``memory://...``, ``s3://...``)."""
    return "://" in str(path)


def join(url: str, *names: str) -> str:
    """``url/name/...`` (no doubled slashes)."""
    return "/".join([url.rstrip("/"), *names])


def filesystem(url: str):
    """The fsspec filesystem of ``url`` and the path inside it; one line when the package for
    the URL's scheme is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        scheme = url.split("://", 1)[0]
        extra = " (pip install 'cosim-dask[s3]')" if scheme in ("s3", "s3a") else ""
        raise StorageError(f"cannot open {url!r}: the fsspec package for {scheme}:// URLs is "
                           f"not installed{extra}") from exc
    except ValueError as exc:
        raise StorageError(f"cannot open {url!r}: {str(exc).splitlines()[0]}") from exc


def explain(exc: BaseException, url: str) -> StorageError | None:
    """A one-line :class:`StorageError` for an exception object storage raised about ``url``,
    or None when ``exc`` is not one of those."""
    if isinstance(exc, CosimError):
        return None
    name = type(exc).__name__
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return StorageError(
            f"no credentials for {url!r} ({name}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment of this command and of "
            "every Dask worker")
    if isinstance(exc, PermissionError) or name in ("ClientError", "AccessDenied"):
        return StorageError(
            f"access to {url!r} was denied ({str(exc).splitlines()[0] if str(exc) else name}); "
            "check the credentials (AWS_ACCESS_KEY_ID / AWS_PROFILE) and the bucket's policy")
    if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
        return missing_bucket(url, bucket)
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                "ReadTimeoutError", "ConnectionRefusedError") or isinstance(exc, ConnectionError):
        return StorageError(
            f"cannot reach the object store for {url!r} ({name}); check AWS_ENDPOINT_URL and "
            "the network")
    return None


def missing_bucket(url: str, bucket: str) -> StorageError:
    return StorageError(f"the bucket {bucket!r} of {url!r} does not exist (or these credentials "
                        "cannot see it); create it first, or check AWS_ENDPOINT_URL and the "
                        "credentials")


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn what object storage raises about ``url`` into one :class:`StorageError` line."""
    try:
        yield
    except Exception as exc:
        error = explain(exc, url)
        if error is None:
            raise
        raise error from exc


def check_bucket(url: str) -> None:
    """Raise :class:`StorageError` when ``url``'s bucket is missing or unreadable (S3 only:
    other schemes have no buckets)."""
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return
    fs, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    with storage_errors(url):
        if not fs.exists(bucket):
            raise missing_bucket(url, bucket)


def read_metadata(url: str) -> dict | None:
    """The JSON of the Zarr node at ``url`` (its ``zarr.json``), or None when there is none."""
    fs, path = filesystem(url)
    with storage_errors(url):
        try:
            raw = fs.cat_file(join(path, METADATA))
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise
            return None
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def pointer_of(meta: dict | None) -> dict | None:
    """The pointer in a node's metadata (``{"format", "current"}``), or None."""
    attrs = (meta or {}).get("attributes") or {}
    found = attrs.get(POINTER) if isinstance(attrs, dict) else None
    if (isinstance(found, dict) and isinstance(found.get("current"), str)
            and VERSION.fullmatch(found["current"])):
        return found
    return None


def write_pointer(url: str, fmt: str, current: str, **extra: Any) -> None:
    """Publish version ``current`` of ``url``: one PUT of ``url``'s ``zarr.json``."""
    meta = {"zarr_format": 3, "node_type": "group",
            "attributes": {POINTER: {"format": fmt, "current": current, **extra}}}
    fs, path = filesystem(url)
    with storage_errors(url):
        fs.pipe_file(join(path, METADATA), json.dumps(meta, indent=2).encode())


def entries(url: str) -> list[str]:
    """Names directly under ``url`` (objects and prefixes); [] when there is nothing."""
    fs, path = filesystem(url)
    with storage_errors(url):
        try:
            listed = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError as exc:
            if "bucket" in str(exc).lower():
                raise
            return []
    return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in listed} - {""})


def versions(url: str) -> list[str]:
    """The version prefixes (``v-<time>-<token>``) under ``url``, oldest first."""
    return sorted(name for name in entries(url) if VERSION.fullmatch(name))


def version_time(name: str) -> int:
    """The unix time a version's writer started it (from its name)."""
    match = VERSION.fullmatch(name)
    return int(match.group(1)) if match else 0


def remove(url: str) -> None:
    """Delete everything under ``url``, its ``zarr.json`` first: a reader that checks the
    metadata after reading sees the node gone before any chunk of it is."""
    fs, path = filesystem(url)
    with storage_errors(url):
        with suppress(FileNotFoundError):
            fs.rm_file(join(path, METADATA))
        with suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
        fs.invalidate_cache(path)


def current(url: str) -> tuple[str, str]:
    """Where the artifact at ``url`` lives now, as ``(location, state)``: ``"pointer"`` (the
    published version ``url/v-...``), ``"plain"`` (a Zarr node written in place at ``url``),
    ``"incomplete"`` (only versions no pointer names yet: a writer still at work or stopped
    before publishing) or ``"missing"``."""
    meta = read_metadata(url)
    found = pointer_of(meta)
    if found is not None:
        return join(url, found["current"]), "pointer"
    if meta is not None:
        return url, "plain"
    check_bucket(url)
    return url, ("incomplete" if versions(url) else "missing")


def locate(url: str, what: str, error: type[CosimError], hint: str) -> str:
    """The location of the published ``what`` (``"pair store"``, ``"model"``) at ``url``;
    ``error`` with one line when there is none: missing (``hint`` says how to make one) or
    not yet published (refused: it may be half written)."""
    location, state = current(url)
    if state == "missing":
        raise error(f"{what} {url!r} does not exist; {hint}")
    if state == "incomplete":
        raise error(f"{what} {url!r} is incomplete: its writer has not published it (still "
                    "writing, or stopped before the end); wait for that writer, or write it "
                    "again")
    return location
