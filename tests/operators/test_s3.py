"""Object storage end to end, against moto's S3 API served over HTTP on 127.0.0.1.

Two full jobs run in this file (a Parquet source and an image-folder source); the other tests
call the source, sink and model-staging functions directly.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.core import enable_iam_authentication
from PIL import Image

from jobs.commits import SinkError
from jobs.config import SourceConfig, StorageConfig, validate_config
from jobs.pipeline import run_job
from jobs.sinks import image_file_name
from jobs.sources import SourceError, inspect_source, read_source
from operators.models import ModelError, model_fingerprint, resolve_model
from operators.rows import derive_seed
from tests.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, png_bytes, write_image_parquet

RUN_SEED = 7
# A fragment of FAKE_SECRET_KEY that survives URL-encoding, so an encoded leak is caught too.
SECRET_FRAGMENT = "DoNotLeak"


def job_mapping(source: dict, sink_uri: str, storage: dict, model: Path, mode: str = "error") -> dict:
    """A job config mapping whose source, sink and model storage all carry the test credentials."""
    return {
        "source": {**source, "storage": storage},
        "operators": [
            {
                "kind": "img2img",
                "model": str(model),
                "prompt": "a cat",
                "num_inference_steps": 2,
                "strength": 0.5,
                "batch_size": 2,
            }
        ],
        "sink": {"uri": sink_uri, "mode": mode, "storage": storage, "write_images": True},
        "run": {"seed": RUN_SEED, "model_storage": storage},
    }


def list_keys(client, bucket: str, prefix: str) -> list[str]:
    """Every object key under a prefix, sorted."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


def get_bytes(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def read_output_rows(client, bucket: str, prefix: str) -> list[dict]:
    """All rows of the output shards under `prefix`/data/."""
    rows = []
    for key in list_keys(client, bucket, f"{prefix}/data/"):
        rows.extend(pq.read_table(io.BytesIO(get_bytes(client, bucket, key))).to_pylist())
    return rows


def jpeg_bytes(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def upload_image_folder(client, bucket: str, prefix: str) -> dict[str, bytes]:
    """Images (one in a sub-folder, one JPEG), a text file, and an image outside the prefix.

    Returns the images expected as rows, by id (their path relative to the prefix)."""
    images = {
        "a.png": png_bytes(64, 48, (200, 30, 60)),
        "sub/b.png": png_bytes(48, 48, (20, 160, 90)),
        "sub/c.jpg": jpeg_bytes(64, 64, (40, 40, 220)),
    }
    for row_id, data in images.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{row_id}", Body=data)
    client.put_object(Bucket=bucket, Key=f"{prefix}/notes.txt", Body=b"not an image")
    client.put_object(Bucket=bucket, Key="elsewhere/outside.png", Body=png_bytes(8, 8))
    return images


def test_parquet_job_reads_and_writes_s3(ray_session, s3_bucket, sd_model, tmp_path):
    bucket, storage, client = s3_bucket
    ids = [f"row-{index}" for index in range(5)]
    rows = [
        {"id": row_id, "image": png_bytes(64, 48, (40 * index, 90, 200 - 30 * index)), "caption": f"caption {index}"}
        for index, row_id in enumerate(ids)
    ]
    local = write_image_parquet(tmp_path / "data.parquet", rows)
    client.put_object(Bucket=bucket, Key="in/data.parquet", Body=local.read_bytes())
    config = validate_config(
        job_mapping(
            {"uri": f"s3://{bucket}/in/data.parquet", "format": "parquet"}, f"s3://{bucket}/out", storage, sd_model
        )
    )

    result = run_job(config)

    output = read_output_rows(client, bucket, "out")
    assert Counter(row["id"] for row in output) == Counter(ids)
    by_id = {row["id"]: row for row in output}
    for index, row_id in enumerate(ids):
        row = by_id[row_id]
        assert (row["status"], row["error"], row["variant_index"]) == ("ok", None, 0)
        assert row["seed"] == derive_seed(RUN_SEED, row_id, 0)
        assert (row["width"], row["height"]) == (64, 48)
        assert row["caption"] == f"caption {index}"
        assert row["image"]["path"] == image_file_name(row_id, 0)
        assert row["img2img"]["model_revision"] == model_fingerprint(sd_model)

    image_keys = list_keys(client, bucket, "out/images/")
    assert image_keys == sorted(f"out/images/{image_file_name(row_id, 0)}" for row_id in ids)
    for row_id in ids:
        png = get_bytes(client, bucket, f"out/images/{image_file_name(row_id, 0)}")
        assert png == by_id[row_id]["image"]["bytes"]
        assert png.startswith(b"\x89PNG\r\n\x1a\n")

    summary = json.loads(get_bytes(client, bucket, "out/summary.json"))
    assert summary["rows_in"] == summary["rows_out"] == summary["ok"] == 5
    assert (summary["error"], summary["missing"], summary["duplicated"], summary["unexpected"]) == (0, 0, 0, 0)
    assert (summary["source_uri"], summary["sink_uri"]) == (f"s3://{bucket}/in/data.parquet", f"s3://{bucket}/out")
    assert result.summary["report"] == f"s3://{bucket}/out/report.html"
    assert get_bytes(client, bucket, "out/report.html").startswith(b"<!doctype html>")

    for key in list_keys(client, bucket, "out/data/"):
        schema = pq.read_schema(io.BytesIO(get_bytes(client, bucket, key)))
        assert b"huggingface" in (schema.metadata or {}), key
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        assert features["image"] == {"_type": "Image"}
        assert features["id"] == {"dtype": "string", "_type": "Value"}
        assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_image_folder_ids_are_paths_relative_to_the_prefix(ray_session, s3_bucket):
    bucket, storage, client = s3_bucket
    images = upload_image_folder(client, bucket, "photos")
    source = SourceConfig(uri=f"s3://{bucket}/photos", format="images", storage=storage, include=["*.png", "*.jpg"])

    info = inspect_source(source)

    entries = [entry for fragment in info.fragments for entry in fragment.entries]
    assert [entry.id for entry in entries] == ["a.png", "sub/b.png", "sub/c.jpg"]
    assert [entry.path for entry in entries] == [f"{bucket}/photos/{entry.id}" for entry in entries]
    assert info.skipped == ["notes.txt"] and info.skipped_files == 1
    rows = read_source(source, info).take_all()
    assert sorted(row["id"] for row in rows) == [entry.id for entry in entries]
    assert {row["id"]: row["image"] for row in rows} == images
    assert {row["status"] for row in rows} == {"ok"}


def test_s3_model_is_staged_once_and_named_by_content_hash(s3_bucket, sd_model, tmp_path):
    bucket, storage, client = s3_bucket
    local_files = {
        path.relative_to(sd_model).as_posix(): path.read_bytes() for path in sd_model.rglob("*") if path.is_file()
    }
    assert "model_index.json" in local_files
    for relative, data in local_files.items():
        client.put_object(Bucket=bucket, Key=f"models/sd/{relative}", Body=data)
    uri = f"s3://{bucket}/models/sd"
    options = StorageConfig(**storage).storage_options()
    cache_dir = tmp_path / "cache"

    first = resolve_model(uri, None, True, options, cache_dir)

    assert first.model_id == uri
    assert first.path.parent == cache_dir
    staged = {path.relative_to(first.path).as_posix(): path for path in first.path.rglob("*") if path.is_file()}
    assert {relative: path.read_bytes() for relative, path in staged.items()} == local_files
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", first.revision)
    assert first.revision == model_fingerprint(sd_model)
    assert sorted(path.name for path in cache_dir.iterdir()) == [first.path.name, first.path.name + ".lock"]
    mtimes = {relative: path.stat().st_mtime_ns for relative, path in staged.items()}

    # With the objects gone, only the cached copy can satisfy a second call.
    client.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": key} for key in list_keys(client, bucket, "models/sd/")]}
    )
    assert list_keys(client, bucket, "models/") == []
    second = resolve_model(uri, None, True, options, cache_dir)

    assert second == first
    assert {relative: path.stat().st_mtime_ns for relative, path in staged.items()} == mtimes
    with pytest.raises(ModelError, match=f"model prefix {re.escape(uri)} is empty or does not exist"):
        resolve_model(uri, None, True, options, tmp_path / "fresh-cache")


def test_credentials_stay_out_of_config_outputs_and_logs(ray_session, s3_bucket, sd_model, caplog, capfd):
    bucket, storage, client = s3_bucket
    upload_image_folder(client, bucket, "photos")
    config = validate_config(
        job_mapping({"uri": f"s3://{bucket}/photos", "format": "images"}, f"s3://{bucket}/out", storage, sd_model)
    )
    assert config.source.storage.secret_access_key.get_secret_value() == FAKE_SECRET_KEY
    for text in (str(config), repr(config), config.model_dump_json()):
        assert "**********" in text
        assert FAKE_SECRET_KEY not in text and SECRET_FRAGMENT not in text
    caplog.set_level(logging.INFO)

    result = run_job(config)

    assert result.summary["ok"] == 3
    # Without source.include the text file is an input too, and an error row.
    assert sorted(row["id"] for row in read_output_rows(client, bucket, "out")) == [
        "a.png",
        "notes.txt",
        "sub/b.png",
        "sub/c.jpg",
    ]
    assert FAKE_SECRET_KEY not in json.dumps(result.summary)
    keys = list_keys(client, bucket, "out/")
    assert {"out/summary.json", "out/report.html"} <= set(keys)
    assert any(re.fullmatch(r"out/data/part-a\d{4}-[0-9a-f]{8}-\d{5}-\d{3}\.parquet", key) for key in keys)
    for key in keys:
        data = get_bytes(client, bucket, key)
        assert FAKE_SECRET_KEY.encode() not in data, key
        assert SECRET_FRAGMENT.encode() not in data, key
    captured = capfd.readouterr()
    # The plan names the sink, so the captured logs are known to cover this job.
    assert f"sink:    s3://{bucket}/out" in caplog.text
    for text in (caplog.text, captured.out, captured.err):
        assert FAKE_SECRET_KEY not in text and SECRET_FRAGMENT not in text
    assert {"out/_manifest.json"} <= set(keys) and any(key.startswith("out/_commits/") for key in keys)
    # Ray's own records of the session: worker and driver logs, job and task metadata.
    session = Path(ray_session._private.worker._global_node.get_session_dir_path())
    scanned = 0
    for path in session.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            scanned += 1
            assert FAKE_SECRET_KEY.encode() not in data and SECRET_FRAGMENT.encode() not in data, path
    assert scanned > 10


def test_sink_mode_error_refuses_a_non_empty_s3_prefix(ray_session, s3_bucket, sd_model, tmp_path):
    bucket, storage, client = s3_bucket
    local = write_image_parquet(tmp_path / "data.parquet", [{"id": "row-0", "image": png_bytes()}])
    client.put_object(Bucket=bucket, Key="in/data.parquet", Body=local.read_bytes())
    client.put_object(Bucket=bucket, Key="out/earlier-run.parquet", Body=b"earlier output")
    config = validate_config(
        job_mapping(
            {"uri": f"s3://{bucket}/in/data.parquet", "format": "parquet"}, f"s3://{bucket}/out", storage, sd_model
        )
    )

    with pytest.raises(SinkError) as raised:
        run_job(config)

    message = str(raised.value)
    assert f"sink.uri s3://{bucket}/out is not empty;" in message
    assert "sink.mode: resume (continue the same config) or overwrite" in message
    assert FAKE_SECRET_KEY not in message and SECRET_FRAGMENT not in message
    assert list_keys(client, bucket, "") == ["in/data.parquet", "out/earlier-run.parquet"]
    assert get_bytes(client, bucket, "out/earlier-run.parquet") == b"earlier output"


def test_wrong_secret_fails_inspection_without_echoing_it(s3_bucket, s3_server, tmp_path):
    bucket, _, client = s3_bucket
    local = write_image_parquet(tmp_path / "data.parquet", [{"id": "row-0", "image": png_bytes()}])
    client.put_object(Bucket=bucket, Key="in/data.parquet", Body=local.read_bytes())
    # moto checks signatures only for keys of its own IAM users, so make one allowed to read S3.
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id=FAKE_ACCESS_KEY,
        aws_secret_access_key=FAKE_SECRET_KEY,
    )
    user = f"reader-{bucket}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="read-s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    wrong_secret = "wrongSecret/" + SECRET_FRAGMENT + "+" + key["SecretAccessKey"][::-1]
    uri = f"s3://{bucket}/in/data.parquet"

    def source(secret: str) -> SourceConfig:
        storage = {"endpoint_url": s3_server, "region": "us-east-1", "access_key_id": key["AccessKeyId"]}
        return SourceConfig(uri=uri, format="parquet", storage={**storage, "secret_access_key": secret})

    with enable_iam_authentication():
        # The right secret reads, so the failure below is the secret's alone.
        assert inspect_source(source(key["SecretAccessKey"])).row_count == 1
        with pytest.raises(SourceError) as raised:
            inspect_source(source(wrong_secret))

    message = str(raised.value)
    assert f"cannot read Parquet at source.uri {uri}: " in message
    assert "Forbidden" in message
    assert wrong_secret not in message and SECRET_FRAGMENT not in message
    assert key["SecretAccessKey"] not in message
