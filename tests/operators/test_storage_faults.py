"""Object storage that fails: transient 503/500 answers are retried with backoff and counted; a
persistent 403 on the sink fails the job fast, naming the bucket and key, never a credential.

A fault-injecting HTTP proxy on 127.0.0.1 sits in front of the loopback moto server.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.commits import SinkError
from jobs.config import validate_config
from jobs.pipeline import run_job
from tests.conftest import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, png_bytes, write_image_parquet

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization"}
ERROR_BODY = "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"


class FaultProxy:
    """Forwards every request to the S3 server, answering some with an injected error instead."""

    def __init__(self, upstream: str, decide):
        self.upstream = upstream.removeprefix("http://")
        self.decide = decide  # (method, path, request number) -> (status, code) or None
        self.requests = 0
        self.injected = 0
        self.injected_before_summary = None  # faults injected before summary.json was written
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy.lock:
                    if "summary.json" in self.path and proxy.injected_before_summary is None:
                        proxy.injected_before_summary = proxy.injected
                    proxy.requests += 1
                    fault = proxy.decide(self.command, self.path, proxy.requests)
                    proxy.injected += fault is not None
                if fault is not None:
                    status, code = fault
                    payload = ERROR_BODY.format(code=code, message="injected by the test proxy").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload if self.command != "HEAD" else b"")
                    return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {key: value for key, value in self.headers.items() if key.lower() not in HOP_BY_HOP}
                connection.request(self.command, self.path, body=body, headers=headers)
                answer = connection.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    # A HEAD answer has no body but keeps the object's Content-Length.
                    if key.lower() not in HOP_BY_HOP and (key.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def upload_source(client, bucket: str, tmp_path: Path, count: int = 4) -> None:
    rows = [{"id": f"row-{i}", "image": png_bytes(32, 32, (i * 40, 10, 10))} for i in range(count)]
    local = write_image_parquet(tmp_path / "data.parquet", rows)
    client.put_object(Bucket=bucket, Key="in/data.parquet", Body=local.read_bytes())


def job_mapping(bucket: str, storage: dict, model: Path) -> dict:
    return {
        "source": {"uri": f"s3://{bucket}/in/data.parquet", "storage": storage},
        "operators": [
            {"kind": "img2img", "model": str(model), "prompt": "x", "num_inference_steps": 2, "strength": 0.5}
        ],
        "sink": {"uri": f"s3://{bucket}/out", "storage": storage},
        "run": {"seed": 1},
    }


def test_transient_server_errors_are_retried_and_counted(
    ray_session, s3_bucket, s3_server, sd_model, tmp_path, monkeypatch
):
    bucket, storage, client = s3_bucket
    upload_source(client, bucket, tmp_path)
    # No background request (lease renewal, progress lines) in flight when the summary counts retries:
    # one retried at that moment would be injected before summary.json but counted after it.
    monkeypatch.setenv("RESTYLE_LEASE_SECONDS", "3600")

    def every_fourth(method, path, number):
        if number % 4 == 0 and number <= 200:
            return (503, "SlowDown") if number % 8 == 0 else (500, "InternalError")
        return None

    with FaultProxy(s3_server, every_fourth) as proxy:
        mapping = job_mapping(bucket, {**storage, "endpoint_url": proxy.url}, sd_model)
        mapping["run"]["progress_interval_seconds"] = 3600
        summary = run_job(validate_config(mapping)).summary
    assert proxy.injected >= 3
    assert (summary["rows_out"], summary["ok"], summary["missing"], summary["duplicated"]) == (4, 4, 0, 0)
    assert summary["retried"] == proxy.injected_before_summary
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix="out/data/")["Contents"]]
    table = pq.read_table(pa.BufferReader(client.get_object(Bucket=bucket, Key=keys[0])["Body"].read()))
    assert sorted(table.column("id").to_pylist()) == [f"row-{i}" for i in range(4)]


def test_persistent_403_on_the_sink_fails_fast_naming_bucket_and_key(s3_bucket, s3_server, sd_model, tmp_path):
    bucket, storage, client = s3_bucket
    upload_source(client, bucket, tmp_path)

    def deny_writes(method, path, number):
        return (403, "AccessDenied") if method in ("PUT", "POST") and path.startswith(f"/{bucket}/out") else None

    with FaultProxy(s3_server, deny_writes) as proxy:
        config_path = tmp_path / "job.yaml"
        config_path.write_text(yaml.safe_dump(job_mapping(bucket, {**storage, "endpoint_url": proxy.url}, sd_model)))
        finished = subprocess.run(
            [sys.executable, "-m", "jobs.cli", "run", str(config_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "RAY_ADDRESS": ""},
            cwd=Path(__file__).resolve().parents[2],
        )
    output = finished.stdout + finished.stderr
    assert finished.returncode != 0
    assert finished.returncode == 2
    lease = f"{bucket}/out/_lease.json"
    assert f"cannot write to sink.uri s3://{bucket}/out (key {lease}): PermissionError" in finished.stderr
    assert "Ray" not in finished.stderr.split("error:", 1)[0] or "Started a local Ray" not in output
    assert FAKE_SECRET_KEY not in output and FAKE_ACCESS_KEY not in output
    assert "DoNotLeak" not in output
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="out/")


def test_403_on_reading_the_sink_is_one_sink_error_before_any_work(s3_bucket, s3_server, sd_model, tmp_path):
    bucket, storage, client = s3_bucket
    upload_source(client, bucket, tmp_path)

    def deny_sink_reads(method, path, number):
        sink = path.startswith(f"/{bucket}/out") or (path.startswith(f"/{bucket}?") and "prefix=out" in path)
        return (403, "AccessDenied") if sink and method in ("GET", "HEAD") else None

    with FaultProxy(s3_server, deny_sink_reads) as proxy:
        config = validate_config(job_mapping(bucket, {**storage, "endpoint_url": proxy.url}, sd_model))
        with pytest.raises(SinkError) as refused:
            run_job(config)
    assert proxy.injected >= 1
    message = str(refused.value)
    assert message.startswith(f"cannot read sink.uri s3://{bucket}/out: PermissionError: ") and "\n" not in message
    assert FAKE_SECRET_KEY not in message and FAKE_ACCESS_KEY not in message
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="out/")


@pytest.fixture(autouse=True)
def _quiet_botocore(caplog):
    caplog.set_level("WARNING", logger="botocore")
