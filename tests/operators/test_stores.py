"""Any fsspec store: gs://, az:// (abfs://), hf:// and memory:// beside s3://. memory:// is served
in this process, so sources, models and references are read through it for real; the other stores'
filesystems are built with their credentials mapped, and a store whose package is missing is refused
in one line naming the package."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.config import ConfigError, validate_config
from operators.storage import filesystem_for, library_options, missing_library


def job(source: dict, sink: dict | None = None) -> dict:
    return {
        "source": source,
        "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}]}],
        "sink": sink or {"uri": "out"},
    }


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4, 4), value).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def memory_store():
    """A fresh memory:// filesystem (fsspec's, shared by this process); emptied afterwards."""
    import fsspec

    store = fsspec.filesystem("memory")
    store.store.clear()
    store.pseudo_dirs.clear()
    store.pseudo_dirs.append("")
    yield store
    store.store.clear()


def test_each_store_takes_its_own_settings_under_its_library_names():
    options = {
        "key": "K",
        "secret": "S",
        "endpoint_url": "http://127.0.0.1:1",
        "credentials": "/keys/sa.json",
        "project": "p",
        "account_name": "acct",
        "account_key": "AK",
        "sas_token": "sas",
        "connection_string": "cs",
        "hub_token": "hf_x",
    }
    assert library_options("s3", options) == {"key": "K", "secret": "S", "endpoint_url": "http://127.0.0.1:1"}
    assert library_options("gs", options) == {
        "token": "/keys/sa.json",
        "project": "p",
        "endpoint_url": "http://127.0.0.1:1",
    }
    assert library_options("gcs", {"anon": True}) == {"token": "anon"}
    assert library_options("abfs", options) == {
        "account_name": "acct",
        "account_key": "AK",
        "sas_token": "sas",
        "connection_string": "cs",
    }
    assert library_options("hf", options) == {"token": "hf_x", "endpoint": "http://127.0.0.1:1"}


def test_an_hf_uri_opens_the_hub_filesystem_with_the_token():
    filesystem, path = filesystem_for("hf://datasets/owner/name/data/", {"hub_token": "hf_secret"})
    assert type(filesystem).__name__ == "HfFileSystem"
    assert (path, filesystem.token) == ("datasets/owner/name/data", "hf_secret")


def test_a_store_whose_package_is_missing_is_one_line_naming_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "gcsfs" else real(name, *rest))
    assert missing_library("gs://bucket/x") == (
        "gs:// URIs need the gcsfs package, which is not installed: pip install gcsfs"
    )
    with pytest.raises(ConfigError) as raised:
        validate_config(job({"uri": "gs://bucket/images", "format": "images"}))
    assert "source.uri: gs:// URIs need the gcsfs package, which is not installed: pip install gcsfs" in str(
        raised.value
    )
    with pytest.raises(ValueError, match="pip install gcsfs"):
        filesystem_for("gcs://bucket/x")


def test_a_model_on_a_store_whose_package_is_missing_is_refused_naming_it(monkeypatch):
    import importlib.util

    from operators.models import ModelError, refuse_unsupported_scheme

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "adlfs" else real(name, *rest))
    with pytest.raises(ModelError, match=r"model 'az://models/sd': az:// URIs need the adlfs package"):
        refuse_unsupported_scheme("model", "az://models/sd")


def test_storage_settings_for_another_store_are_refused_without_their_values():
    with pytest.raises(ConfigError) as raised:
        validate_config(
            job({"uri": "s3://bucket/in", "storage": {"account_key": "AZURE-SECRET-VALUE", "access_key_id": "AK"}})
        )
    message = str(raised.value)
    assert "source.storage settings ['account_key'] do not apply to s3:// URIs (source.uri)" in message
    assert "AZURE-SECRET-VALUE" not in message


def test_a_parquet_source_and_an_image_folder_are_read_from_memory(memory_store):
    from jobs.sources import inspect_source, read_fragment

    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["a", "b"], "image": [png(10), png(20)]}), buffer)
    memory_store.pipe("/data/in/rows.parquet", buffer.getvalue())
    memory_store.pipe("/data/folder/x.png", png(30))
    memory_store.pipe("/data/folder/sub/y.png", png(40))
    for source, expected in (
        ({"uri": "memory://data/in"}, ["a", "b"]),
        ({"uri": "memory://data/folder", "format": "images"}, ["sub/y.png", "x.png"]),
    ):
        config = validate_config(job(source)).source
        info = inspect_source(config)
        filesystem, root = filesystem_for(config.uri)
        table = read_fragment(config, filesystem, root, 0, info.fragments[0], info.column_types)
        assert sorted(table.column("id").to_pylist()) == expected
        assert set(table.column("status").to_pylist()) == {"ok"}


def test_a_model_prefix_on_a_store_is_staged_into_the_node_cache(memory_store, tmp_path):
    from operators.models import stage_files

    memory_store.pipe("/models/tiny/model_index.json", b"{}")
    memory_store.pipe("/models/tiny/unet/config.json", b'{"a": 1}')
    staged = stage_files("memory://models/tiny", {}, tmp_path)
    assert sorted(str(path.relative_to(staged)) for path in staged.rglob("*") if path.is_file()) == [
        "model_index.json",
        "unet/config.json",
    ]


def test_a_bucket_root_is_refused_as_a_sink_on_every_store(tmp_path):
    from jobs.commits import SinkError, check_sink_location

    for uri in ("hf://datasets", "s3://bucket", "memory://out"):
        config = validate_config(job({"uri": str(tmp_path)}, {"uri": uri}))
        if uri.startswith("memory://"):
            check_sink_location(config)  # memory:// has no buckets
            continue
        with pytest.raises(SinkError, match="is a bucket root; restyle needs a prefix of its own"):
            check_sink_location(config)


def test_a_sink_on_a_store_takes_its_lease_writes_committed_shards_and_knows_them(memory_store):
    """The sink's own writes (lease, shards, commit records, image files) through memory://, in this
    process: the same calls a write task makes."""
    from types import SimpleNamespace

    from jobs.commits import survey
    from jobs.lease import SinkBusy, SinkLease
    from jobs.sinks import ParquetImageSink

    config = validate_config(job({"uri": "in"}, {"uri": "memory://out/run", "write_images": True})).sink
    filesystem, root = filesystem_for(config.uri)
    lease = SinkLease(filesystem, root, config.uri, "run00001", "hash", seconds=60)
    lease.acquire()
    with pytest.raises(SinkBusy):  # a second run on the same sink is refused
        SinkLease(filesystem, root, config.uri, "run00002", "hash", seconds=60).acquire()
    rows = pa.table(
        {
            "id": ["a", "b"],
            "image": [png(10), png(20)],
            "variant_index": pa.array([0, 0], pa.int32()),
            "status": ["ok", "ok"],
            "error": pa.array([None, None], pa.string()),
            "_fragment": pa.array([0, 0], pa.int32()),
            "_row": pa.array([0, 1], pa.int64()),
        }
    )
    written = ParquetImageSink(config, "hash", 1, "run00001", ["rows.parquet#0"]).write(
        [rows], SimpleNamespace(task_idx=0)
    )
    assert [item["rows"] for item in written] == [2]
    ours, foreign = survey(filesystem, root)
    names = sorted(path.rsplit("/", 1)[-1] for path in ours)
    assert foreign == [] and len([name for name in names if name.endswith(".parquet")]) == 1
    assert len([name for name in names if name.endswith(".png")]) == 2 and "_lease.json" in names
    shard = next(path for path in ours if path.endswith(".parquet"))
    assert pq.read_table(filesystem.open(shard, "rb")).column("id").to_pylist() == ["a", "b"]
    lease.release()
    assert not filesystem.exists(f"{root}/_lease.json")
