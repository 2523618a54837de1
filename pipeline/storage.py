"""Where files live: local paths and object-store URIs (``s3://``, ``gs://``, ...) behind one small
API. Pure: no Ray, no torch.

pyarrow's file systems do the I/O: S3 through the AWS SDK's own chain for credentials and endpoint
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and ``~/.aws``, instance roles,
``AWS_ENDPOINT_URL`` for S3-compatible servers), GCS and HDFS likewise; a scheme pyarrow lacks goes
through fsspec where its package is installed (e.g. ``abfs://`` with adlfs). Nothing here logs a
credential: messages name locations only.

Whole-object operations only, each retried with backoff on transient errors (a dropped connection,
a server restarting, throttling): an object store has no rename, so a file is written whole, in one
upload, and a reader sees the previous object or the new one, never part of one.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
import re
import time
from collections.abc import Callable
from typing import BinaryIO, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

T = TypeVar("T")

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
# Transient errors: tried this many times in all, sleeping RETRY_DELAY_S, 2x, 4x, ... between.
ATTEMPTS = 6
RETRY_DELAY_S = 0.5
_DENIED = ("ACCESS_DENIED", "AccessDenied", "Forbidden", "403", "PERMISSION_DENIED")


def is_uri(location: str) -> bool:
    """Whether ``location`` names an object store (``scheme://...``), not a local path (``file://`` is local)."""
    m = _SCHEME.match(location)
    return bool(m) and m.group(1).lower() != "file"


def local_path(location: str) -> str:
    """A local location as a plain path (``file://`` stripped)."""
    return location[len("file://"):] if location.lower().startswith("file://") else location


def absolute(location: str) -> str:
    """A URI as given (its trailing ``/`` dropped), a local path made absolute: workers on other
    nodes do not share the driver's working directory."""
    return location.rstrip("/") if is_uri(location) else os.path.abspath(local_path(location))


def join(base: str, *names: str) -> str:
    """``base`` joined with ``names`` with ``/`` for URIs, the OS's separator for paths."""
    if is_uri(base):
        return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(base, *names)


def parent(location: str) -> str:
    """The folder (or prefix) holding ``location``."""
    if is_uri(location):
        scheme, _, rest = location.partition("://")
        head, _, _ = rest.rstrip("/").rpartition("/")
        return f"{scheme}://{head or rest}"
    return os.path.dirname(os.path.abspath(location))


def normalize(location: str) -> str:
    """``.`` and ``..`` segments resolved (URIs: within their bucket; they never reach the file system)."""
    if not is_uri(location):
        return os.path.normpath(location)
    scheme, _, rest = location.partition("://")
    bucket, _, key = rest.partition("/")
    parts: list[str] = []
    for part in key.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return f"{scheme}://{'/'.join([bucket, *parts])}"


def beside(folder: str, name: str) -> str:
    """``name`` as given when absolute or a URI, else taken from ``folder`` (normalised): how a
    file listed in a manifest or dataset names another."""
    if os.path.isabs(name) or "://" in name:
        return name
    return normalize(join(folder, name))


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, authority: str) -> pafs.FileSystem:
    uri = f"{scheme}://{authority}"
    try:
        return pafs.FileSystem.from_uri(uri)[0]
    except ValueError as exc:  # pyarrow.ArrowInvalid
        if "Unrecognized filesystem type" not in str(exc):
            raise
    # pyarrow has no native file system for this scheme: fsspec's, wrapped so the rest is the same.
    import fsspec

    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The file system holding ``location`` (one per scheme and bucket in each process) and the path
    within it. Raises ``ValueError`` for a scheme neither pyarrow nor an installed fsspec package knows."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(local_path(location))
    scheme, _, rest = location.partition("://")
    authority, _, _ = rest.partition("/")
    try:
        fs = _filesystem(scheme.lower(), authority)
    except ImportError as exc:
        raise ValueError(f"{scheme}:// needs a package that is not installed ({exc})") from None
    if isinstance(fs, pafs.PyFileSystem):
        return fs, rest
    return fs, rest.rstrip("/")


def reason(exc: BaseException) -> str:
    """An I/O error's first line: pyarrow's messages run on with the SDK's details."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def is_denied(exc: BaseException) -> bool:
    """Whether an I/O error says the credentials may not do this (not worth retrying)."""
    return isinstance(exc, PermissionError) or any(word in str(exc) for word in _DENIED)


def retried(operation: Callable[[], T], attempts: int = ATTEMPTS, delay_s: float = RETRY_DELAY_S) -> T:
    """``operation()``, tried again after a transient ``OSError`` with exponential backoff; a missing
    object, a denied request or the last attempt's error is raised as is."""
    for attempt in range(attempts):
        try:
            return operation()
        except FileNotFoundError:
            raise
        except OSError as exc:
            if is_denied(exc) or attempt == attempts - 1:
                raise
            time.sleep(delay_s * 2**attempt)
    raise AssertionError("unreachable")


def info(location: str) -> pafs.FileInfo:
    """What is at ``location`` (type ``NotFound`` when nothing is), retried."""
    fs, path = resolve(location)
    return retried(lambda: fs.get_file_info(path))


def read_bytes(location: str) -> bytes:
    """The whole file or object at ``location``, retried; ``FileNotFoundError`` when absent."""
    fs, path = resolve(location)

    def read() -> bytes:
        with fs.open_input_stream(path) as fh:
            return fh.read()

    return retried(read)


def open_file(location: str) -> pa.NativeFile:
    """The file or object at ``location`` opened for random access (a local file memory-mapped:
    only the pages read are loaded). Not retried: retry the whole read with :func:`retried`."""
    if not is_uri(location):
        return pa.memory_map(local_path(location))
    fs, path = resolve(location)
    return fs.open_input_file(path)


def open_stream(location: str) -> pa.NativeFile:
    """The file or object at ``location`` opened to be read from start to end (an object store
    streams it in one request; a local file is memory-mapped). Not retried, like :func:`open_file`."""
    if not is_uri(location):
        return pa.memory_map(local_path(location))
    fs, path = resolve(location)
    return fs.open_input_stream(path)


def write(location: str, fill: Callable[[BinaryIO], object]) -> None:
    """Write the whole file or object at ``location``, replacing any, with what ``fill`` writes to
    the file object it is given: on a local disk into a hidden ``.<name>.<pid>.tmp`` beside it,
    synced, then renamed over it; in an object store into memory, then as one upload (retried),
    which the store makes visible only once complete. Either way a reader sees the old content or
    the new, never part of it, and an error in ``fill`` leaves the old."""
    if not is_uri(location):
        folder, name = os.path.split(local_path(location))
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(folder, name))
        return
    buffer = io.BytesIO()
    fill(buffer)
    data = buffer.getvalue()
    fs, path = resolve(location)

    def upload() -> None:
        stream = fs.open_output_stream(path)
        stream.write(data)
        stream.close()  # completes the upload: the object appears whole, or not at all

    retried(upload)


def write_bytes(location: str, data: bytes) -> None:
    """:func:`write` ``data``."""
    write(location, lambda fh: fh.write(data))


def delete(location: str) -> None:
    """Remove the file or object at ``location``; nothing if absent."""
    fs, path = resolve(location)
    with contextlib.suppress(FileNotFoundError):
        retried(lambda: fs.delete_file(path))


def delete_folder(location: str) -> None:
    """Remove the folder or prefix ``location`` and all below it; nothing if absent."""
    fs, path = resolve(location)
    if retried(lambda: fs.get_file_info(path)).type != pafs.FileType.NotFound:
        retried(lambda: fs.delete_dir(path))


def children(location: str) -> list[pafs.FileInfo]:
    """What lies directly in the folder or prefix ``location`` (files and sub-folders), retried;
    none where it does not exist."""
    fs, path = resolve(location)
    return retried(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True)))


def list_files(location: str) -> list[tuple[str, str]]:
    """Every file below the folder or prefix ``location``, recursively, retried: ``(name, where)``
    pairs in name order, ``name`` relative to ``location`` with ``/`` separators, ``where`` a
    location in ``location``'s form (a path or a URI)."""
    fs, path = resolve(location)
    found = retried(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)))
    root = "/" + path.strip("/")
    pairs = []
    for f in found:
        if f.type == pafs.FileType.File:
            name = posixpath.relpath("/" + f.path.lstrip("/"), root)  # fsspec's paths may lead with "/"
            pairs.append((name, join(location, name) if is_uri(location) else f.path))
    return sorted(pairs)
