"""Filesystems for local paths and the object stores fsspec serves (s3://, gs://, az://, hf://,
memory://), with credentials kept out of every message."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import uuid

import fsspec
import pyarrow.fs

# user:secret@ after a scheme, up to the last @ before a space or quote: a secret may hold / or @
# (unescaped, as users paste them), so a path with an @ in it is masked too rather than risk a leak.
_URL_CREDENTIALS = re.compile(r"(://)[^\s'\"]*@")


# Remote stores: URI scheme -> the package whose fsspec filesystem serves it.
REMOTE_SCHEMES = {
    "s3": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "hf": "huggingface_hub",
    "memory": "fsspec",
}
# Which of restyle's storage options (`StorageConfig.storage_options`) each store takes, and under
# which of its library's argument names.
_LIBRARY_OPTIONS = {
    "s3": {name: name for name in ("key", "secret", "token", "endpoint_url", "client_kwargs", "anon")},
    "gs": {"credentials": "token", "project": "project", "endpoint_url": "endpoint_url"},
    "az": {name: name for name in ("account_name", "account_key", "sas_token", "connection_string", "anon")},
    "hf": {"hub_token": "token", "endpoint_url": "endpoint"},
    "memory": {},
}
_FAMILY = {"gcs": "gs", "abfs": "az", "abfss": "az"}


def scheme_of(uri: str) -> str | None:
    """The URI's scheme ('s3', 'gs', ...), or None for a local path (file:// included)."""
    scheme = uri.split("://", 1)[0] if "://" in uri else None
    return None if scheme == "file" else scheme


def is_remote(uri: str) -> bool:
    """Whether `uri` names a place in a remote store restyle reads and writes through fsspec."""
    return scheme_of(uri) in REMOTE_SCHEMES


def missing_library(uri: str) -> str | None:
    """One line saying which package to install when `uri`'s store needs one that is not installed."""
    scheme = scheme_of(uri)
    package = REMOTE_SCHEMES.get(scheme or "")
    if package is None or importlib.util.find_spec(package.replace("-", "_")) is not None:
        return None
    return f"{scheme}:// URIs need the {package} package, which is not installed: pip install {package}"


def library_options(scheme: str, storage_options: dict | None) -> dict:
    """restyle's storage options as the keyword arguments of `scheme`'s filesystem: the options that
    store takes, renamed; `anon` becomes gcsfs's `token='anon'`."""
    family = _FAMILY.get(scheme, scheme)
    options = storage_options or {}
    names = _LIBRARY_OPTIONS[family]
    result = {names[key]: value for key, value in options.items() if key in names}
    if family == "gs" and options.get("anon"):
        result["token"] = "anon"
    return result


def filesystem_for(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return an fsspec filesystem and the path inside it for a local path or a remote store's URI.

    `storage_options` are restyle's (`StorageConfig.storage_options`: s3fs's names for S3, and
    `credentials`, `project`, `account_name`, `account_key`, `sas_token`, `connection_string`,
    `hub_token` for the others); each store takes its own. Without credentials in them, each library
    takes its standard chain (AWS_* variables and instance identity, GOOGLE_APPLICATION_CREDENTIALS,
    AZURE_STORAGE_* variables, HF_TOKEN).
    """
    scheme = scheme_of(uri)
    if scheme == "s3":
        from operators.s3 import RetryCountingS3FileSystem

        # A fresh instance: fsspec's instance cache would otherwise share clients across event loops.
        options = library_options("s3", storage_options)
        filesystem = RetryCountingS3FileSystem(skip_instance_cache=True, **options)
        return filesystem, uri[len("s3://") :].rstrip("/")
    if scheme in REMOTE_SCHEMES:
        problem = missing_library(uri)
        if problem:
            raise ValueError(problem)
        filesystem = fsspec.filesystem(
            scheme,
            **({} if scheme == "memory" else {"skip_instance_cache": True}),
            **library_options(scheme, storage_options),
        )
        return filesystem, filesystem._strip_protocol(uri).rstrip("/")
    if scheme is not None:
        raise ValueError(
            f"unsupported URI scheme {scheme!r} in {redact(uri)}; accepted: a local path, file:// or "
            f"{', '.join(name + '://' for name in REMOTE_SCHEMES)}"
        )
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
    return speaks(filesystem, "file")


def speaks(filesystem: fsspec.AbstractFileSystem, protocol: str) -> bool:
    """Whether `protocol` is one of the filesystem's own ('s3' for s3fs, whose protocols are s3, s3a)."""
    own = filesystem.protocol
    return protocol in (own if isinstance(own, tuple) else (own,))


def is_inside(path: str, folder: str) -> bool:
    """Whether the '/'-separated `path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', as object stores and fsspec expect."""
    return "/".join([root.rstrip("/"), *(part.strip("/") for part in parts)])


def redact(text: str) -> str:
    """Remove user:secret@ from every URL inside a message."""
    return _URL_CREDENTIALS.sub(r"\1***@", text)
