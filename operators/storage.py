"""Filesystems for local paths and s3:// URIs, with credentials kept out of every message."""

from __future__ import annotations

import contextlib
import os
import re
import uuid

import fsspec
import pyarrow.fs

# user:secret@ after a scheme, up to the last @ before a space or quote: a secret may hold / or @
# (unescaped, as users paste them), so a path with an @ in it is masked too rather than risk a leak.
_URL_CREDENTIALS = re.compile(r"(://)[^\s'\"]*@")


def filesystem_for(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return an fsspec filesystem and the path inside it for a local path or s3:// URI.

    `storage_options` are s3fs arguments; without credentials in them, s3fs takes the standard
    AWS chain (environment variables, shared config, instance or pod identity).
    """
    if uri.startswith("s3://"):
        from operators.s3 import RetryCountingS3FileSystem

        # A fresh instance: fsspec's instance cache would otherwise share clients across event loops.
        filesystem = RetryCountingS3FileSystem(skip_instance_cache=True, **(storage_options or {}))
        return filesystem, uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"unsupported URI scheme {scheme!r} in {redact(uri)}; accepted: a local path, file://, s3://")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    filesystem = fsspec.filesystem("file")
    return filesystem, filesystem._strip_protocol(path)


def arrow_filesystem(filesystem: fsspec.AbstractFileSystem) -> pyarrow.fs.FileSystem:
    """Wrap an fsspec filesystem for pyarrow and Ray Data readers."""
    if is_local(filesystem):
        return pyarrow.fs.LocalFileSystem()
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(filesystem))


@contextlib.contextmanager
def open_atomically(filesystem: fsspec.AbstractFileSystem, path: str):
    """Open a file for writing so that readers see it whole or not at all: a local file is written
    aside and renamed into place; an S3 object only appears when its upload completes."""
    if not is_local(filesystem):
        with filesystem.open(path, "wb") as handle:
            yield handle
        return
    directory, name = path.rsplit("/", 1)
    filesystem.makedirs(directory, exist_ok=True)
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(temporary, "wb") as handle:
            yield handle
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def is_local(filesystem: fsspec.AbstractFileSystem) -> bool:
    """Whether a filesystem is this machine's own."""
    protocol = filesystem.protocol
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


def is_inside(path: str, folder: str) -> bool:
    """Whether the '/'-separated `path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', as object stores and fsspec expect."""
    return "/".join([root.rstrip("/"), *(part.strip("/") for part in parts)])


def redact(text: str) -> str:
    """Remove user:secret@ from every URL inside a message."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)
