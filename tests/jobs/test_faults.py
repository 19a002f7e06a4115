"""Jobs that meet crashes: a killed driver, a killed actor, error rows to redo.

Crashing runs are `restyle run` subprocesses with a Ray of their own, killed as a whole process
group; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.config import validate_config
from jobs.pipeline import run_job
from operators.base import KILL_ONCE_VARIABLE
from operators.rows import derive_seed
from tests.conftest import png_bytes

RESTYLE = [sys.executable, "-m", "jobs.cli"]
ROWS = 12


def write_folder(folder: Path, count: int = ROWS) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"r{index:02d}.png").write_bytes(png_bytes(64, 64, (index * 20, 60, 120)))


def job_file(path: Path, folder: Path, sink: Path, model: Path, steps: int) -> Path:
    config = {
        "source": {"uri": str(folder), "format": "images", "read_blocks": ROWS},
        "operators": [
            {
                "kind": "img2img",
                "model": str(model),
                "prompt": "x",
                "num_inference_steps": steps,
                "strength": 0.5,
                "batch_size": 1,
            }
        ],
        "sink": {"uri": str(sink)},
        "run": {"seed": 21, "progress_interval_seconds": 1},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start(config: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*RESTYLE, "run", str(config)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[2],
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def committed(sink: Path) -> int:
    folder = sink / "_commits"
    return len(list(folder.glob("*.json"))) if folder.exists() else 0


def rows(sink: Path) -> list[dict]:
    return pq.read_table(sink / "data", columns=["id", "variant_index", "seed", "status", "image"]).to_pylist()


def test_driver_killed_half_way_then_a_rerun_finishes_with_no_loss_and_no_duplicate(ray_session, sd_model, tmp_path):
    folder, sink = tmp_path / "in", tmp_path / "out"
    write_folder(folder)
    config = job_file(tmp_path / "job.yaml", folder, sink, sd_model, steps=400)
    process = start(config, tmp_path / "run.log")
    try:
        wait_for(lambda: committed(sink) >= 3 or process.poll() is not None, 240, "a few committed shards")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    before = committed(sink)
    log = (tmp_path / "run.log").read_text()
    assert 0 < before < ROWS, log[-2000:]
    assert re.search(rf"progress: \d+/{ROWS} rows committed \(\d+\.\d%\), ", log), log[-2000:]
    assert not (sink / "_manifest.json").exists()
    # A torn leftover of the killed attempt: a shard without a commit record.
    (sink / "data" / "part-a0001-99999-000.parquet").write_bytes(b"PAR1 torn")

    resumed = run_job(validate_config(yaml.safe_load(config.read_text())))
    summary = resumed.summary
    assert summary["rows_already_committed"] == before
    assert summary["inputs_processed"] == ROWS - before
    assert (summary["rows_out"], summary["missing"], summary["duplicated"]) == (ROWS, 0, 0)
    assert not (sink / "data" / "part-a0001-99999-000.parquet").exists()
    output = rows(sink)
    assert sorted(row["id"] for row in output) == [f"r{index:02d}.png" for index in range(ROWS)]
    assert all(row["seed"] == derive_seed(21, row["id"], 0) and row["status"] == "ok" for row in output)
    manifest = json.loads((sink / "_manifest.json").read_text())
    assert manifest["rows"] == ROWS and len(manifest["shards"]) == len(list((sink / "data").glob("*.parquet")))


def test_actor_killed_mid_batch_is_restarted_and_redoes_its_rows_with_the_same_bytes(ray_session, sd_model, tmp_path):
    folder = tmp_path / "in"
    write_folder(folder, 4)
    marker = tmp_path / "killed"
    crashed_sink, clean_sink = tmp_path / "crashed", tmp_path / "clean"
    config = job_file(tmp_path / "job.yaml", folder, crashed_sink, sd_model, steps=4)
    process = start(config, tmp_path / "run.log", env={KILL_ONCE_VARIABLE: str(marker)})
    assert process.wait(timeout=240) == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert marker.exists()  # the actor really died once

    clean = yaml.safe_load(config.read_text())
    clean["sink"]["uri"] = str(clean_sink)
    run_job(validate_config(clean))
    crashed_rows = {row["id"]: row for row in rows(crashed_sink)}
    clean_rows = {row["id"]: row for row in rows(clean_sink)}
    assert crashed_rows.keys() == clean_rows.keys() and len(crashed_rows) == 4
    for row_id, row in crashed_rows.items():
        assert row["status"] == "ok"
        assert row["seed"] == clean_rows[row_id]["seed"]
        assert row["image"]["bytes"] == clean_rows[row_id]["image"]["bytes"]


def test_rerun_failed_redoes_only_error_rows(ray_session, sd_model, tmp_path):
    folder, sink = tmp_path / "in", tmp_path / "out"
    write_folder(folder, 3)
    (folder / "broken.png").write_bytes(b"not a png")
    config_path = job_file(tmp_path / "job.yaml", folder, sink, sd_model, steps=2)
    config = validate_config(yaml.safe_load(config_path.read_text()))
    first = run_job(config).summary
    assert (first["ok"], first["error"]) == (3, 1)
    good_before = {row["id"]: row["image"]["bytes"] for row in rows(sink) if row["status"] == "ok"}

    (folder / "broken.png").write_bytes(png_bytes(64, 64))  # the input was fixed upstream
    second = run_job(config, rerun_failed=True).summary
    assert second["error_rows_dropped_for_rerun"] == 1 and second["inputs_processed"] == 1
    assert (second["rows_out"], second["ok"], second["error"], second["duplicated"]) == (4, 4, 0, 0)
    after = {row["id"]: row["image"]["bytes"] for row in rows(sink)}
    assert {key: after[key] for key in good_before} == good_before
    assert len(list((sink / "_commits").glob("*.json"))) == len(list((sink / "data").glob("*.parquet")))


@pytest.mark.parametrize("mode", ["overwrite"])
def test_overwrite_replaces_earlier_output(ray_session, sd_model, tmp_path, mode):
    folder, sink = tmp_path / "in", tmp_path / "out"
    write_folder(folder, 2)
    data = yaml.safe_load(job_file(tmp_path / "job.yaml", folder, sink, sd_model, steps=2).read_text())
    run_job(validate_config(data))
    data["operators"][0]["strength"] = 0.75
    data["sink"]["mode"] = mode
    summary = run_job(validate_config(data)).summary
    assert summary["rows_out"] == 2 and summary["attempt"] == 1
    assert {row["seed"] for row in rows(sink)} == {derive_seed(21, f"r{i:02d}.png", 0) for i in range(2)}


def run_on_cluster(config: Path, *flags: str) -> dict:
    """Run a job with tests/jobs/cluster_job.py on a three-node local cluster; return its outcome."""
    finished = subprocess.run(
        [sys.executable, "-m", "tests.jobs.cluster_job", str(config), *flags],
        capture_output=True,
        text=True,
        timeout=420,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = [line for line in finished.stdout.splitlines() if line.startswith("CLUSTER_JOB_RESULT ")]
    assert result, finished.stdout[-2000:] + finished.stderr[-2000:]
    outcome = json.loads(result[-1].removeprefix("CLUSTER_JOB_RESULT "))
    assert outcome["finished"] and "error" not in outcome, outcome
    return outcome


def test_worker_node_removed_mid_job_still_commits_every_input_once(sd_model, tmp_path):
    folder, sink = tmp_path / "in", tmp_path / "out"
    write_folder(folder)
    data = yaml.safe_load(job_file(tmp_path / "job.yaml", folder, sink, sd_model, steps=200).read_text())
    data["operators"][0]["num_actors"] = 2
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
    outcome = run_on_cluster(tmp_path / "job.yaml", "--remove-worker-after", "2")
    assert 0 < outcome["removed_after_commits"] < ROWS  # the node really left mid-job
    summary = outcome["summary"]
    assert (summary["rows_out"], summary["ok"], summary["missing"], summary["duplicated"]) == (ROWS, ROWS, 0, 0)
    assert sorted(row["id"] for row in rows(sink)) == [f"r{index:02d}.png" for index in range(ROWS)]
