"""az:// end to end, against Azurite's Blob API served over HTTP on 127.0.0.1.

Azurite is Microsoft's local stand-in for Azure Storage (npm package `azurite`; `make test` installs
it under .cache/azurite). One full job runs here (an image folder in, Parquet shards out); the other
tests use the filesystem and the sink's lease directly.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.config import ConfigError, validate_config
from jobs.lease import LEASE, SinkBusy, SinkLease
from jobs.pipeline import run_job
from tests.conftest import free_port, png_bytes

AZURITE = Path(__file__).resolve().parents[2] / ".cache/azurite/node_modules/.bin/azurite-blob"
# Azurite's published development account (the same for every Azurite install; no real secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# A piece of the key that survives URL- and JSON-encoding, so an encoded leak is caught too.
KEY_FRAGMENT = "Eby8vdM02xNOcqFlqUwJPL"


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 120.0) -> None:
    """Return once 127.0.0.1:`port` accepts connections; fail if the process exits or time runs out.
    Azurite took 7.6 s to listen on an idle 2-core machine, and more than 30 s (printing nothing) while
    the suite's Ray jobs held both cores."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log.read_text(errors="replace").strip()[-2000:]
            pytest.fail(f"azurite-blob exited with status {process.returncode} before listening: {output}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    pytest.fail(f"azurite-blob did not listen on 127.0.0.1:{port} within {seconds:g} s")


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    """Azurite's Blob service on 127.0.0.1, in memory; yields the dev account's connection string."""
    pytest.importorskip("adlfs", reason="az:// needs the adlfs package")
    if shutil.which("node") is None:
        pytest.skip("node is not installed: Azurite cannot run")
    if not AZURITE.exists():
        pytest.skip(f"Azurite is not installed at {AZURITE}: npm install --prefix .cache/azurite azurite@3.37.0")
    port = free_port()
    workspace = tmp_path_factory.mktemp("azurite")
    command = [str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence"]
    command += ["--silent", "--skipApiVersionCheck", "--loose"]
    log = workspace / "azurite.log"
    with open(log, "wb") as handle:  # the working directory too, for any file Azurite leaves
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=workspace)
    try:
        wait_for_port(port, process, log)
        yield (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def container(azurite):
    """A fresh container; yields (its name, the connection string, an adlfs filesystem on it)."""
    from operators.storage import filesystem_for

    name = f"restyle-{uuid.uuid4().hex[:10]}"
    filesystem, _ = filesystem_for(f"az://{name}", {"connection_string": azurite})
    filesystem.mkdir(name)
    return name, azurite, filesystem


def test_filesystem_for_lists_reads_and_writes_a_container(container):
    from operators.storage import filesystem_for, open_atomically

    name, connection_string, _ = container
    filesystem, root = filesystem_for(f"az://{name}/prefix/", {"connection_string": connection_string})

    assert type(filesystem).__name__ == "AzureBlobFileSystem"
    assert root == f"{name}/prefix"
    filesystem.pipe_file(f"{root}/a.txt", b"first")
    with open_atomically(filesystem, f"{root}/sub/b.bin") as handle:
        handle.write(b"\x00\x01second")
    assert sorted(filesystem.find(root)) == [f"{root}/a.txt", f"{root}/sub/b.bin"]
    assert filesystem.cat_file(f"{root}/a.txt") == b"first"
    assert filesystem.cat_file(f"{root}/sub/b.bin") == b"\x00\x01second"
    assert filesystem.info(f"{root}/sub/b.bin")["size"] == 8


def test_the_first_write_of_a_lease_is_exclusive(container):
    name, _, filesystem = container
    path = f"{name}/sink/{LEASE}"
    filesystem.pipe_file(path, b"first", mode="create")

    with pytest.raises(FileExistsError):
        filesystem.pipe_file(path, b"second", mode="create")
    assert filesystem.cat_file(path) == b"first"


def test_a_second_lease_on_a_held_sink_is_refused_until_it_is_released(container):
    name, _, filesystem = container
    uri, root = f"az://{name}/sink", f"{name}/sink"
    first = SinkLease(filesystem, root, uri, "run-1", "hash", seconds=60)
    second = SinkLease(filesystem, root, uri, "run-2", "hash", seconds=60)

    first.acquire()
    with pytest.raises(SinkBusy, match=r"in use by another run \(host .*, run run-1, started"):
        second.acquire()
    assert json.loads(filesystem.cat_file(f"{root}/{LEASE}"))["run_id"] == "run-1"
    assert first.renew()
    first.release()
    assert not filesystem.exists(f"{root}/{LEASE}")
    second.acquire()
    assert json.loads(filesystem.cat_file(f"{root}/{LEASE}"))["run_id"] == "run-2"
    second.release()
    assert not filesystem.exists(f"{root}/{LEASE}")


def test_of_leases_taken_at_once_exactly_one_is_granted(container):
    name, _, filesystem = container
    uri, root = f"az://{name}/race", f"{name}/race"
    leases = [SinkLease(filesystem, root, uri, f"run-{index}", "hash", seconds=60) for index in range(6)]
    start = threading.Barrier(len(leases))

    def take(lease: SinkLease) -> str:
        start.wait()
        try:
            lease.acquire()
        except SinkBusy:
            return "busy"
        return "held"

    with ThreadPoolExecutor(len(leases)) as pool:
        outcomes = list(pool.map(take, leases))

    assert sorted(outcomes) == ["busy"] * (len(leases) - 1) + ["held"]
    winner = leases[outcomes.index("held")]
    assert json.loads(filesystem.cat_file(f"{root}/{LEASE}"))["run_id"] == winner.run_id
    winner.release()


def test_an_unreadable_lease_expires_a_lease_time_after_it_was_written(container):
    # A run killed while writing its lease leaves no record to read: the blob's own modification
    # time is what makes it expire.
    name, _, filesystem = container
    uri, root = f"az://{name}/sink", f"{name}/sink"
    filesystem.pipe_file(f"{root}/{LEASE}", b"{not json")
    lease = SinkLease(filesystem, root, uri, "run-1", "hash", seconds=60)
    with pytest.raises(SinkBusy, match="holder unknown, lease file being written or unreadable; expires"):
        lease.acquire()

    short = SinkLease(filesystem, root, uri, "run-1", "hash", seconds=1)
    time.sleep(2.5)  # Azurite's modification times are whole seconds
    short.acquire()
    assert json.loads(filesystem.cat_file(f"{root}/{LEASE}"))["run_id"] == "run-1"
    short.release()


def test_an_image_folder_job_reads_and_writes_azure(ray_session, container):
    # Container names take 3 to 63 characters, so the source's is "inputs", not "in".
    _, connection_string, filesystem = container
    images = {f"p{index}.png": png_bytes(8 + index, 6, (40 * index, 90, 200)) for index in range(4)}
    for name in ("inputs", "out"):
        filesystem.mkdir(name)
    for row_id, data in images.items():
        filesystem.pipe_file(f"inputs/photos/{row_id}", data)
    storage = {"connection_string": connection_string}
    config = validate_config(
        {
            "source": {"uri": "az://inputs/photos", "format": "images", "storage": storage},
            "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}]}],
            "sink": {"uri": "az://out/run", "storage": storage},
        }
    )

    result = run_job(config, quiet=True)

    root = "out/run"
    shards = sorted(filesystem.glob(f"{root}/data/*.parquet"))
    assert shards
    rows = [row for shard in shards for row in pq.read_table(io.BytesIO(filesystem.cat_file(shard))).to_pylist()]
    assert sorted(row["id"] for row in rows) == sorted(images)
    assert {(row["status"], row["error"]) for row in rows} == {("ok", None)}
    assert all(row["image"]["bytes"].startswith(b"\x89PNG\r\n\x1a\n") for row in rows)
    records = filesystem.find(f"{root}/_commits")
    assert len(records) == len(shards)
    assert filesystem.exists(f"{root}/_manifest.json")
    assert not filesystem.exists(f"{root}/{LEASE}")
    summary = json.loads(filesystem.cat_file(f"{root}/summary.json"))
    assert summary["rows_in"] == summary["rows_out"] == summary["ok"] == len(images)
    assert (summary["error"], summary["missing"], summary["duplicated"]) == (0, 0, 0)
    assert result.summary["report"] == f"az://{root}/report.html"

    written = [filesystem.cat_file(f"{root}/{file}") for file in ("summary.json", "report.html", "README.md")]
    assert written[1].startswith(b"<!doctype html>")
    for text in (*written, json.dumps(result.summary).encode(), json.dumps(result.to_dict()).encode()):
        assert KEY_FRAGMENT.encode() not in text

    # A run that finds the sink held is refused naming the holder, and the held lease is kept.
    holder = SinkLease(filesystem, root, f"az://{root}", "other-run", "hash", seconds=60)
    holder.acquire()
    try:
        with pytest.raises(
            Exception, match=r"sink.uri az://\S+/run is in use by another run .*run other-run"
        ) as raised:
            run_job(config, quiet=True)
        assert KEY_FRAGMENT not in str(raised.value)
        assert json.loads(filesystem.cat_file(f"{root}/{LEASE}"))["run_id"] == "other-run"
    finally:
        holder.release()


def test_an_account_key_for_another_store_is_refused_naming_the_field_only(azurite):
    mapping = {
        "source": {"uri": "images", "format": "images"},
        "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}]}],
        "sink": {"uri": "s3://bucket/out", "storage": {"account_key": ACCOUNT_KEY, "connection_string": azurite}},
    }

    with pytest.raises(ConfigError) as raised:
        validate_config(mapping)

    message = str(raised.value)
    assert "sink.storage settings ['account_key', 'connection_string'] do not apply to s3:// URIs" in message
    assert KEY_FRAGMENT not in message and ACCOUNT not in message
