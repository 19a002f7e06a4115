"""Two runs on one sink, locally and on S3: exactly one holds the sink's lease, the other is refused
naming the holder, and the sink ends with every input exactly once. Runs are `restyle run`
subprocesses with tiny standardize jobs; "a run mid-way" is a lease the test holds itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from jobs.commits import SinkError, SinkState, config_hash
from jobs.config import validate_config
from jobs.lease import LEASE, SinkLease
from jobs.pipeline import open_sink
from operators.storage import filesystem_for
from tests.conftest import png_bytes

RESTYLE = str(Path(sys.executable).with_name("restyle"))
IDS = [f"r{index}.png" for index in range(4)]
BUSY = "is in use by another run (host "


@pytest.fixture(params=["local", "s3"])
def sink_place(request, tmp_path) -> tuple[str, dict]:
    """A sink URI and its storage mapping, on a local path or the loopback S3 server."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    bucket, storage, _ = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", storage


def config_mapping(tmp_path: Path, sink: tuple[str, dict], clip: float = 2.0) -> dict:
    folder = tmp_path / "in"
    if not folder.exists():
        folder.mkdir()
        for index, row_id in enumerate(IDS):
            (folder / row_id).write_bytes(png_bytes(16, 16, (index * 50, 80, 120)))
    uri, storage = sink
    return {
        "source": {"uri": str(folder), "format": "images"},
        "operators": [{"kind": "standardize", "steps": [{"op": "clahe", "clip_limit": clip}]}],
        "sink": {"uri": uri, "storage": storage} if storage else {"uri": uri},
        "run": {"seed": 3, "resources": {"num_cpus": 2}},
    }


def start(tmp_path: Path, name: str, mapping: dict) -> subprocess.Popen:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(mapping))
    return subprocess.Popen(
        [RESTYLE, "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
        cwd=Path(__file__).resolve().parents[2],
    )


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def committed(mapping: dict) -> tuple[list[tuple[str, int]], set[str], set[str]]:
    """The committed (id, variant) pairs, the run ids of the commit records and their config hashes."""
    state = SinkState(validate_config(mapping).sink)
    table = state.read(["id", "variant_index"])
    pairs = sorted(zip(table.column("id").to_pylist(), table.column("variant_index").to_pylist(), strict=True))
    return pairs, {commit.run_id for commit in state.commits.values()}, {c.config_hash for c in state.commits.values()}


@pytest.mark.parametrize("same_config", [True, False], ids=["same-config", "different-configs"])
def test_runs_started_together_then_one_started_mid_way(sink_place, tmp_path, same_config):
    first = config_mapping(tmp_path, sink_place)
    second = first if same_config else config_mapping(tmp_path, sink_place, clip=4.0)
    runs = [start(tmp_path, "first", first), start(tmp_path, "second", second)]
    outcomes = [finish(process) for process in runs]

    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 2], [err[-2000:] for _, _, err in outcomes]  # never both 0
    (_, out, _), (_, _, refused) = sorted(outcomes, key=lambda outcome: outcome[0])
    assert f"error: sink.uri {sink_place[0]} {BUSY}" in refused and "lease expires" in refused
    assert len(refused.strip().splitlines()[-1]) > 0 and "Traceback" not in refused
    summary = json.loads(out.split("\noutputs:", 1)[0])
    winner = first if outcomes[0][0] == 0 else second
    pairs, run_ids, hashes = committed(winner)
    assert pairs == [(row_id, 0) for row_id in IDS]
    assert run_ids == {summary["run_id"]} and hashes == {config_hash(validate_config(winner))}
    assert summary["rows_out"] == 4 and (summary["missing"], summary["duplicated"]) == (0, 0)

    if not same_config:
        return
    # A run started while another holds the lease (here: the test, as a run mid-way) is refused.
    config = validate_config(winner)
    filesystem, root = filesystem_for(config.sink.uri, config.sink.storage.storage_options())
    holder = SinkLease(filesystem, root, config.sink.uri, "midway01", config_hash(config))
    holder.acquire()
    try:
        code, _, err = finish(start(tmp_path, "late", winner))
        assert code == 2 and f"{BUSY}{holder.record()['host']}, pid {os.getpid()}, run midway01, started " in err
        assert committed(winner)[0] == pairs
    finally:
        holder.release()
    # Once the holder is gone, resuming finds every input committed.
    code, out, err = finish(start(tmp_path, "resume", winner))
    assert code == 0, err[-2000:]
    assert json.loads(out.split("\noutputs:", 1)[0])["inputs_processed"] == 0
    assert committed(winner)[0] == pairs and not filesystem.exists(f"{root}/{LEASE}")


def test_open_sink_from_racing_threads_gives_the_lease_to_exactly_one(sink_place, tmp_path):
    config = validate_config(config_mapping(tmp_path, sink_place))
    barrier = threading.Barrier(4)
    opened, refused = [], []

    def open_one(index: int) -> None:
        barrier.wait()
        try:
            opened.append(open_sink(config, config_hash(config), f"thread{index:02d}")[1])
        except SinkError as error:
            refused.append(str(error))

    threads = [threading.Thread(target=open_one, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(opened) == 1 and len(refused) == 3, refused
    assert all(f"run {opened[0].run_id}, started " in message for message in refused)
    opened[0].release()
