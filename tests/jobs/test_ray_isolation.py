"""`restyle run` starts a private local Ray unless told to join a cluster: a stale `ray_current_cluster`
or a live `ray start --head` on the machine changes nothing, `run.ray_address` joins, and an address that
cannot be joined is one `error:` line with exit 2.

Each Ray here keeps its files in a private RAY_TMPDIR (Ray's temp root: where `ray start` writes and
`ray.init()` reads `ray_current_cluster`, /tmp/ray by default), so nothing here touches /tmp/ray.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import jobs.pipeline
from jobs.config import validate_config
from jobs.pipeline import ClusterError, start_ray
from tests.conftest import free_port, png_bytes
from tests.jobs.ray_heads import environment, private_temp_dir, start_process, stop_ray_process

ROOT = Path(__file__).resolve().parents[2]
RUN_SECONDS = 240
HEAD_START_SECONDS = 90
HEAD_CPUS = (os.cpu_count() or 1) + 3  # a count no local instance of this machine has


def job(tmp_path: Path, **run) -> Path:
    """A two-image CPU job (no model) and its config file."""
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(2):
        (folder / f"i{index}.png").write_bytes(png_bytes(16, 16, (40 * index, 80, 160)))
    config = {
        "source": {"uri": str(folder), "format": "images"},
        # One actor: the joined head advertises more CPUs than this machine has.
        "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}], "output_mode": "rgb", "num_actors": 1}],
        "sink": {"uri": str(tmp_path / "out")},
        "run": run,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def restyle(*args: str, env: dict, timeout: float = RUN_SECONDS) -> subprocess.CompletedProcess:
    """`restyle ARGS` in a process group of its own, killed with everything it started on timeout."""
    command = [sys.executable, "-c", "import sys; from jobs.cli import main; sys.exit(main())", *args]
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"restyle {' '.join(args)} still running after {timeout} s:\n{stderr[-3000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def cluster_line(stderr: str) -> str:
    """The plan's `cluster: N CPUs, M GPUs` line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip().startswith("cluster: ")]
    assert lines, stderr[-3000:]
    return lines[0]


@pytest.fixture
def ray_tmpdir():
    """A private Ray temp root, removed afterwards."""
    path = private_temp_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def live_head():
    """A head started by `ray start --head` as a user would (its address written to `ray_current_cluster`
    in its Ray temp root); yields (RAY_TMPDIR, GCS address). Stopped in `finally`."""
    ray_tmpdir = private_temp_dir()
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = environment(ray_tmpdir, RAY_AUTH_MODE="disabled", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    command = [
        str(bin_dir / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={HEAD_CPUS}",
        "--num-gpus=0",
        "--include-dashboard=false",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--disable-usage-stats",
    ]
    log_path = Path(ray_tmpdir) / "ray-start.log"
    head = start_process(command, env, str(log_path))
    current = Path(ray_tmpdir) / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + HEAD_START_SECONDS
        while not current.exists():
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no head after {HEAD_START_SECONDS} s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield ray_tmpdir, current.read_text().strip()
    finally:
        stop_ray_process(head, ray_tmpdir)


def test_start_ray_starts_a_private_local_instance_unless_an_address_is_given(monkeypatch):
    calls = []
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.setattr("ray.init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jobs.pipeline, "reachable_address", lambda field, address: address)
    base = {
        "source": {"uri": "in"},
        "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}]}],
        "sink": {"uri": "out"},
    }

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    start_ray(validate_config({**base, "run": {"resources": {"num_cpus": 2}}}))
    monkeypatch.setenv("RAY_ADDRESS", "")
    start_ray(validate_config(base))
    assert [(call["address"], call.get("num_cpus")) for call in calls] == [("local", 2), ("local", None)]

    calls.clear()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    start_ray(validate_config(base))
    start_ray(validate_config({**base, "run": {"ray_address": "auto"}}))
    monkeypatch.delenv("RAY_ADDRESS")
    start_ray(validate_config({**base, "run": {"ray_address": "ray://head:10001"}}))
    assert [call["address"] for call in calls] == ["10.0.0.5:6379", "auto", "ray://head:10001"]
    assert all("num_cpus" not in call for call in calls)


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("127.0.0.1:{port}", "run.ray_address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"),
        ("ray://127.0.0.1:{port}", "run.ray_address ray://127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"),
        ("http://127.0.0.1:8265", "run.ray_address http://127.0.0.1:8265 is not a Ray cluster address (that is a job"),
        ("head-without-port", "run.ray_address head-without-port is not a valid Ray address"),
        ("ray://user:hunter2@127.0.0.1:{port}", "run.ray_address ray://***@127.0.0.1:{port}: nothing answers"),
    ],
)
def test_an_address_that_cannot_be_joined_is_refused_before_ray_starts(monkeypatch, address, fragment):
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.setattr("ray.init", lambda **kwargs: pytest.fail("Ray was started"))
    port = free_port()
    config = validate_config(
        {
            "source": {"uri": "in"},
            "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}]}],
            "sink": {"uri": "out"},
            "run": {"ray_address": address.format(port=port)},
        }
    )
    with pytest.raises(ClusterError) as raised:
        start_ray(config)
    message = str(raised.value)
    assert fragment.format(port=port) in message
    assert "accepted: 'auto'" in message and "\n" not in message and "hunter2" not in message


def test_a_local_ray_that_cannot_start_is_one_line_naming_the_resources(monkeypatch):
    def refuse(**kwargs):
        raise ValueError("Resource quantities >1 must be whole numbers.\nmore detail")

    monkeypatch.setattr("ray.is_initialized", lambda: False)
    monkeypatch.setattr("ray.init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = validate_config(
        {
            "source": {"uri": "in"},
            "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}]}],
            "sink": {"uri": "out"},
            "run": {"resources": {"num_cpus": 3, "num_gpus": 1}},
        }
    )
    with pytest.raises(ClusterError) as raised:
        start_ray(config)
    assert str(raised.value) == (
        "cannot start a local Ray instance (run.resources num_cpus=3, num_gpus=1): "
        "ValueError: Resource quantities >1 must be whole numbers."
    )


def test_run_starts_its_own_ray_with_a_stale_current_cluster_file(ray_tmpdir, tmp_path):
    # What a crashed `ray start` or test leaves: the address of a cluster that no longer runs.
    current = Path(ray_tmpdir) / "ray" / "ray_current_cluster"
    current.parent.mkdir()
    current.write_text(f"127.0.0.1:{free_port()}")
    finished = restyle("run", str(job(tmp_path)), env=environment(ray_tmpdir))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert '"ok": 2' in finished.stdout
    assert current.read_text().startswith("127.0.0.1:")  # read by nothing, rewritten by nothing


def test_run_joins_a_live_local_head_only_when_told(live_head, tmp_path):
    ray_tmpdir, address = live_head
    (tmp_path / "private").mkdir()
    private = restyle("run", str(job(tmp_path / "private")), env=environment(ray_tmpdir))
    assert private.returncode == 0, private.stderr[-3000:]
    assert cluster_line(private.stderr) != f"cluster: {HEAD_CPUS} CPUs, 0 GPUs"

    (tmp_path / "joined").mkdir()
    joined = restyle("run", str(job(tmp_path / "joined", ray_address=address)), env=environment(ray_tmpdir))
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert cluster_line(joined.stderr) == f"cluster: {HEAD_CPUS} CPUs, 0 GPUs"


@pytest.mark.parametrize("setting", ["run.ray_address", "RAY_ADDRESS"])
def test_an_unreachable_address_is_one_line_and_exit_2(ray_tmpdir, tmp_path, setting):
    address = f"127.0.0.1:{free_port()}"
    if setting == "RAY_ADDRESS":
        finished = restyle("run", str(job(tmp_path)), env=environment(ray_tmpdir, RAY_ADDRESS=address), timeout=120)
    else:
        finished = restyle("run", str(job(tmp_path, ray_address=address)), env=environment(ray_tmpdir), timeout=120)
    assert finished.returncode == 2, finished.stderr[-3000:]
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, finished.stderr[-3000:]
    assert errors[0].startswith(f"error: {setting} {address}: nothing answers at {address} (")
    assert "accepted: 'auto'" in errors[0]
    assert "Traceback" not in finished.stderr
