"""Shared fixtures: tiny offline models, sample data, one local Ray session, a loopback S3 server."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

# No test may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

# Every Ray this test run starts (in process, in subprocesses, `ray start`) keeps its files, and any
# `ray_current_cluster` it writes, in a short private dir, removed at exit: a failed or killed test
# leaves nothing in /tmp/ray that a later `ray.init()` or `restyle run` would read.
RAY_TMPDIR = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
os.environ["RAY_TMPDIR"] = RAY_TMPDIR
os.environ.pop("RAY_ADDRESS", None)
atexit.register(shutil.rmtree, RAY_TMPDIR, ignore_errors=True)

# Staged checkpoints and kept fingerprints (operators.models) go to a private cache, removed at exit.
RESTYLE_CACHE = tempfile.mkdtemp(prefix="restyle-cache-")
os.environ["RESTYLE_CACHE"] = RESTYLE_CACHE
atexit.register(shutil.rmtree, RESTYLE_CACHE, ignore_errors=True)

FAKE_ACCESS_KEY = "AKIATESTRESTYLE00001"
FAKE_SECRET_KEY = "restyleFakeSecret/DoNotLeak+0123456789abcd"


@pytest.fixture
def restore_logging():
    """The root and `ray` loggers' levels back as they were after a test that runs the CLI's `main`."""
    import logging

    root, ray_logger = logging.getLogger(), logging.getLogger("ray")
    levels = root.level, ray_logger.level
    yield
    root.setLevel(levels[0])
    ray_logger.setLevel(levels[1])


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny random pipelines, built once per test session."""
    from jobs.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def real_layouts(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints in the layouts real ones ship in (safety checker, fp16 variant, .bin beside
    .safetensors, shards), built once per test session by the tests that use them."""
    from jobs.tiny_models import REAL_LAYOUT_NAMES, make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("layouts"), REAL_LAYOUT_NAMES)


@pytest.fixture(scope="session")
def sd_model(tiny_models) -> Path:
    """Path of the tiny img2img checkpoint."""
    return tiny_models["sd-img2img"]


def png_bytes(width: int = 64, height: int = 48, color=(200, 30, 60), mode: str = "RGB") -> bytes:
    """A small encoded PNG."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_batch(images: list[bytes | None], ids: list[str] | None = None, **extra) -> pa.Table:
    """A batch as the source hands it to the first operator: ids, image bytes, status, error, extras."""
    ids = ids or [f"row-{index}" for index in range(len(images))]
    columns = {
        "id": pa.array(ids, pa.string()),
        "image": pa.array(images, pa.binary()),
        "status": pa.array(["ok"] * len(images), pa.string()),
        "error": pa.array([None] * len(images), pa.string()),
    }
    columns.update(extra)
    return pa.table(columns)


def write_image_parquet(path: Path, rows: list[dict], hf_struct: bool = True) -> Path:
    """Write rows {id, image bytes, ...} as Parquet; images as HF {bytes, path} structs or plain binary."""
    columns: dict[str, list] = {key: [row.get(key) for row in rows] for key in rows[0]}
    arrays = {}
    for key, values in columns.items():
        if key == "image":
            if hf_struct:
                arrays[key] = pa.array(
                    [{"bytes": value, "path": None} if value is not None else None for value in values],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
                )
            else:
                arrays[key] = pa.array(values, pa.binary())
        else:
            arrays[key] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)
    return path


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray instance for every job test (2 CPUs, as on the CI machine): never one
    that `ray_current_cluster` or a live `ray start` names, and its files live in RAY_TMPDIR."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API served over real HTTP on 127.0.0.1; yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields (bucket name, storage config mapping)."""
    import uuid

    import boto3

    name = f"restyle-{uuid.uuid4().hex[:10]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id=FAKE_ACCESS_KEY,
        aws_secret_access_key=FAKE_SECRET_KEY,
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)
    storage = {
        "endpoint_url": s3_server,
        "region": "us-east-1",
        "access_key_id": FAKE_ACCESS_KEY,
        "secret_access_key": FAKE_SECRET_KEY,
    }
    yield name, storage, client


def source_ids(config, info) -> list[str]:
    """Every id of a planned source, in source order (read fragment by fragment: for small test sources)."""
    from jobs.sources import fragment_ids
    from operators.storage import filesystem_for

    filesystem, root = filesystem_for(config.uri, config.storage.storage_options())
    return [
        row_id
        for index, fragment in enumerate(info.fragments)
        for row_id in fragment_ids(config, filesystem, root, index, fragment)
    ]
