"""`restyle submit`: jobs sent through Ray's job submission API to a real head started with `ray start`.

The head runs in its own temp dir and process group, so stopping it leaves any other Ray on the
machine (the suite's in-process `ray_session`) running; `ray stop` would kill them all.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.config import load_config, validate_config
from jobs.submit import stage_working_dir, submit
from tests.conftest import FAKE_SECRET_KEY, free_port, png_bytes, write_image_parquet
from tests.jobs.ray_heads import environment, private_temp_dir, start_process, stop_ray_process

IDS = ["p0", "p1", "p2"]
HEAD_START_SECONDS = 90
SUBMISSION_ID = r"restyle-{stem}-[0-9a-f]{{8}}"


@pytest.fixture(scope="module")
def ray_head():
    """A real head node (GCS, raylet, dashboard with the job server) on 127.0.0.1; yields the job
    server's address."""
    from ray.job_submission import JobSubmissionClient

    temp_dir = private_temp_dir()
    dashboard_port = free_port()
    bin_dir = Path(sys.executable).parent
    env = environment(temp_dir)
    # Ray enables token auth for a head when ~/.ray/auth_token exists; this process's client would only
    # send the token had it been started with RAY_AUTH_MODE=token, so this loopback head runs without.
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stop at once, no 30 s drain
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this environment's
    command = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    head = start_process(command, env, str(log_path))
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + HEAD_START_SECONDS
        while True:
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # not up yet: connection refused, or the job module still starting
                assert time.monotonic() < deadline, f"no job server at {address} after {HEAD_START_SECONDS} s"
                time.sleep(1)
        yield address
    finally:
        stop_ray_process(head, temp_dir)
        import ray

        if ray.is_initialized():  # the suite's own session outlived the head
            assert ray.get(ray.put("still here")) == "still here"


def write_config(path: Path, source: Path, model: Path, sink: Path, **storage) -> Path:
    path.write_text(
        f"source:\n  uri: {source}\n" + (f"  storage: {json.dumps(storage)}\n" if storage else "") + "operators:\n"
        f"  - {{kind: img2img, model: {model}, prompt: a watercolor, strength: 0.5, num_inference_steps: 2}}\n"
        f"sink:\n  uri: {sink}\n"
    )
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rows = [{"id": row_id, "image": png_bytes(32, 24, (60 * i, 90, 200))} for i, row_id in enumerate(IDS)]
    return write_image_parquet(tmp_path_factory.mktemp("submit-source") / "rows.parquet", rows)


def test_a_job_runs_on_the_cluster_end_to_end(ray_head, source, sd_model, tmp_path, capsys):
    sink = tmp_path / "out"
    config = write_config(tmp_path / "tiny.yaml", source, sd_model, tmp_path / "ignored")
    code = submit(config, ray_head, overrides=[f"sink.uri={sink}"], wait=True)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert code == 0, out[-3000:]
    assert re.fullmatch(SUBMISSION_ID.format(stem="tiny"), lines[0])
    assert lines[-1] == f"job {lines[0]}: SUCCEEDED"
    assert f"source:  {source} (parquet, 3 rows)" in out  # the plan, logged by the job's driver
    assert '"rows_out": 3' in out and f"outputs: {sink}/data/*.parquet" in out  # the summary it printed
    assert (sink / "_manifest.json").is_file()
    assert sorted(pq.read_table(sink / "data", columns=["id"]).column("id").to_pylist()) == IDS
    assert not (tmp_path / "ignored").exists()  # the --set override was what ran


def test_the_staged_working_dir_holds_code_and_config_only(source, sd_model, tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", source, sd_model, tmp_path / "o"))
    staged = stage_working_dir(config, tmp_path / "stage")
    names = sorted(path.name for path in staged.iterdir())
    assert names == ["configs", "job.yaml", "jobs", "operators", "pyproject.toml"]
    assert not list(staged.rglob("__pycache__")) and (staged / "jobs" / "cli.py").is_file()
    assert validate_config(yaml.safe_load((staged / "job.yaml").read_text())) == config
    assert sum(path.stat().st_size for path in staged.rglob("*") if path.is_file()) < 2_000_000


@pytest.fixture
def no_cluster(monkeypatch):
    import ray.job_submission

    def refuse(*args, **kwargs):
        raise AssertionError("the cluster must not be contacted")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)


def test_a_bad_config_exits_2_before_contacting_the_cluster(source, sd_model, tmp_path, capsys, no_cluster):
    config = write_config(tmp_path / "bad.yaml", source, sd_model, tmp_path / "out")
    assert submit(config, "http://127.0.0.1:9", overrides=["operators.0.strength=1.4"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: {config} is invalid:\n  operators[0].strength: Input should be less than or equal to 1, got 1.4; "
        "accepted: numbers from 0 to 1\n"
    )
    assert captured.out == ""


def test_inline_credentials_are_refused_without_showing_them(source, sd_model, tmp_path, capsys, no_cluster):
    config = write_config(
        tmp_path / "secret.yaml", source, sd_model, tmp_path / "out", secret_access_key=FAKE_SECRET_KEY
    )
    assert submit(config, "http://127.0.0.1:9") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config} holds credentials inline (source.storage.secret_access_key)")
    assert "AWS_SECRET_ACCESS_KEY" in err and FAKE_SECRET_KEY not in err
    assert submit(config, "http://127.0.0.1:9", overrides=["source.storage={}", "sink.storage.session_token=t"]) == 2
    assert "holds credentials inline (sink.storage.session_token)" in capsys.readouterr().err


def test_an_unreachable_job_server_exits_2(source, sd_model, tmp_path, capsys):
    config = write_config(tmp_path / "job.yaml", source, sd_model, tmp_path / "out")
    assert submit(config, "http://127.0.0.1:9") == 2
    assert capsys.readouterr().err.startswith("error: cannot submit to the Ray job server at http://127.0.0.1:9: ")


def test_a_job_server_that_wants_a_token_is_named(source, sd_model, tmp_path, capsys, monkeypatch):
    import ray.job_submission
    from ray.exceptions import AuthenticationError

    def unauthorized(address):
        raise AuthenticationError("Authentication required: Unauthorized: Missing authentication token")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", unauthorized)
    config = write_config(tmp_path / "job.yaml", source, sd_model, tmp_path / "out")
    assert submit(config, "http://10.0.0.1:8265") == 2
    assert capsys.readouterr().err == (
        "error: the Ray job server at http://10.0.0.1:8265 requires a token: set RAY_AUTH_MODE=token and give "
        "the cluster's token in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token\n"
    )


@pytest.mark.parametrize(
    ("options", "entrypoint"),
    [
        ([], "python -m jobs.cli run job.yaml"),
        (["-q"], "python -m jobs.cli run job.yaml -q"),
        (["--verbose", "--log-level", "debug"], "python -m jobs.cli run job.yaml --verbose --log-level debug"),
    ],
)
def test_the_output_options_given_to_submit_are_the_jobs(
    options, entrypoint, source, sd_model, tmp_path, capsys, monkeypatch, restore_logging
):
    import ray.job_submission

    from jobs.cli import main

    submitted = []

    class JobServer:
        def __init__(self, address):
            pass

        def submit_job(self, **request):
            submitted.append(request["entrypoint"])

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", JobServer)
    config = write_config(tmp_path / "job.yaml", source, sd_model, tmp_path / "out")
    assert main(["submit", str(config), "--address", "http://10.0.0.1:8265", *options]) == 0
    assert submitted == [entrypoint]


def test_a_failing_job_exits_1(ray_head, sd_model, tmp_path, capsys):
    missing = tmp_path / "not-on-the-cluster.parquet"
    config = write_config(tmp_path / "failing.yaml", missing, sd_model, tmp_path / "out")
    assert submit(config, ray_head, wait=True) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-1] == f"job {lines[0]}: FAILED (exit code 2)"  # restyle run's exit code for a bad source
    assert f"error: cannot read Parquet at source.uri {missing}" in out  # restyle's own message, from the cluster
    assert not (tmp_path / "out").exists()
