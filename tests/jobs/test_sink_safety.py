"""What a sink may never do: delete what restyle did not write, write where it would read or
clobber, be blocked by a crash's leftovers, lose a row to a PNG name, or keep empty shards."""

from __future__ import annotations

import io
import json
import os
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.commits import Commit, SinkError, SinkState, check_sink_location, config_hash, write_shard
from jobs.config import validate_config
from jobs.lease import LEASE, LeaseLost, LeaseSettingError, SinkBusy, SinkLease, lease_seconds
from jobs.pipeline import open_sink, run_job
from jobs.sinks import ParquetImageSink, image_file_name
from operators.storage import filesystem_for
from tests.conftest import png_bytes


def job(source, sink, mode="resume", clip=3.0, **sink_fields):
    return validate_config(
        {
            "source": {"uri": str(source), "format": "images"},
            "operators": [{"kind": "standardize", "steps": [{"op": "clahe", "clip_limit": clip}]}],
            "sink": {"uri": str(sink), "mode": mode, **sink_fields},
            "run": {"seed": 7},
        }
    )


def image_folder(folder, count=3):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"r{index}.png").write_bytes(png_bytes(16, 16, (index * 40, 90, 160)))
    return folder


def files(folder) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


# -- where a sink may be ---------------------------------------------------------------------------


def test_overwrite_of_the_folder_holding_the_source_deletes_nothing(tmp_path):
    source = image_folder(tmp_path / "in")
    (tmp_path / "notes.txt").write_text("mine")
    before = files(tmp_path)
    with pytest.raises(SinkError, match=f"sink.uri {tmp_path} contains source.uri {source}"):
        run_job(job(source, tmp_path, mode="overwrite"))
    assert files(tmp_path) == before


@pytest.mark.parametrize("mode", ["resume", "error", "overwrite"])
def test_a_sink_inside_the_source_or_equal_to_it_is_refused_in_every_mode(tmp_path, mode):
    source = image_folder(tmp_path / "in")
    with pytest.raises(SinkError, match="is inside source.uri"):
        check_sink_location(job(source, source / "out", mode=mode))
    with pytest.raises(SinkError, match="is the same place as source.uri"):
        check_sink_location(job(source, source, mode=mode))
    (tmp_path / "link").symlink_to(source, target_is_directory=True)  # resolved, not compared as text
    with pytest.raises(SinkError, match="is the same place as source.uri"):
        check_sink_location(job(source, tmp_path / "link", mode=mode))


def test_home_working_directory_and_roots_are_refused(tmp_path, monkeypatch):
    source = image_folder(tmp_path / "in")
    home = os.path.realpath(os.path.expanduser("~"))
    with pytest.raises(SinkError, match=f"sink.uri ~ \\(resolved: {home}\\) is the home directory"):
        check_sink_location(job(source, "~"))
    monkeypatch.chdir(tmp_path / "in")
    with pytest.raises(SinkError, match="contains .* the working directory"):
        check_sink_location(job(source / "..", tmp_path))
    with pytest.raises(SinkError, match="is the working directory"):
        check_sink_location(job(tmp_path / "elsewhere", "."))
    with pytest.raises(SinkError, match="sink.uri / is a filesystem root"):
        check_sink_location(job(source, "/"))
    with pytest.raises(SinkError, match="sink.uri s3://bucket-a/ is a bucket root"):
        check_sink_location(job(source, "s3://bucket-a/"))
    parquet = validate_config(
        {
            "source": {"uri": "s3://bucket-a/in/rows.parquet"},
            "operators": [{"kind": "standardize", "steps": [{"op": "clahe"}]}],
            "sink": {"uri": "s3://bucket-a/in"},
        }
    )
    with pytest.raises(SinkError, match="contains source.uri s3://bucket-a/in/rows.parquet"):
        check_sink_location(parquet)
    check_sink_location(job(source, tmp_path / "out"))  # beside the source: fine


def fake_output(sink):
    """A sink as an earlier run left it, plus a file of the user's in `data/` and one beside it."""
    for name in ("data/part-a0001-1a2b3c4d-00000-000.parquet", "images/r0-0123456789abcdef.v0.png"):
        (sink / name).parent.mkdir(parents=True, exist_ok=True)
        (sink / name).write_bytes(b"x")
    (sink / "_commits").mkdir()
    (sink / "_commits" / "part-a0001-1a2b3c4d-00000-000.parquet.json").write_text("{}")
    for name in ("_manifest.json", "summary.json", "report.html"):
        (sink / name).write_text("{}")
    (sink / "data" / "mine.csv").write_text("a,b")
    (sink / "notes.txt").write_text("mine")


def test_overwrite_refuses_foreign_files_and_with_force_deletes_only_its_own(tmp_path):
    source, sink = image_folder(tmp_path / "in"), tmp_path / "out"
    sink.mkdir()
    fake_output(sink)
    before = files(sink)
    config = job(source, sink, mode="overwrite")
    with pytest.raises(SinkError, match=r"holds files restyle did not write \(2 entries: data/mine.csv, notes.txt\)"):
        open_sink(config, config_hash(config), "run00001")
    assert files(sink) == before  # refused before anything was deleted

    state, lease = open_sink(config, config_hash(config), "run00002", force=True)
    try:
        assert files(sink) == {"data/mine.csv", "notes.txt", LEASE} and not state.commits
    finally:
        lease.release()
    assert files(sink) == {"data/mine.csv", "notes.txt"}


# -- crash leftovers -------------------------------------------------------------------------------


def test_probe_and_truncated_commit_record_left_by_a_crash_do_not_block_a_run(ray_session, tmp_path, caplog):
    source, sink = image_folder(tmp_path / "in", 4), tmp_path / "out"
    config = job(source, sink, rows_per_shard=1)
    first = run_job(config).summary
    assert first["rows_out"] == 4
    (sink / "_commits" / ".write-probe-x").write_bytes(b"")
    records = sorted((sink / "_commits").glob("*.json"))
    records[0].write_bytes(records[0].read_bytes()[:20])  # a record torn mid-write

    summary = run_job(config).summary
    assert (summary["rows_out"], summary["ok"], summary["missing"], summary["duplicated"]) == (4, 4, 0, 0)
    assert summary["inputs_processed"] == 1 and summary["rows_already_committed"] == 3
    assert f"ignoring the unreadable commit record {records[0]}" in caplog.text
    assert not (sink / "_commits" / ".write-probe-x").exists()
    table = pq.read_table(sink / "data")
    assert sorted(table.column("id").to_pylist()) == ["r0.png", "r1.png", "r2.png", "r3.png"]
    assert not (sink / LEASE).exists()


# -- PNG file names --------------------------------------------------------------------------------

HOSTILE_IDS = ["a b", "a_b-c8687a08", "x", "x.v0.png/y", "../up", ".hidden", "é" * 3, "z" * 5000]


def test_image_file_names_are_capped_distinct_and_flat():
    names = [image_file_name(row_id, variant) for row_id in HOSTILE_IDS for variant in (0, 1)]
    assert len(set(names)) == len(names)
    assert all("/" not in name and len(name) <= 120 and not name.startswith(".") for name in names)
    assert image_file_name("a b", 0) == "a_b-" + __import__("hashlib").sha256(b"a b\x1f0").hexdigest()[:16] + ".v0.png"


def write_rows(sink_dir, ids, monkeypatch=None):
    config = job(sink_dir.parent / "in", sink_dir, write_images=True)
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "variant_index": pa.array([0] * len(ids), pa.int64()),
            "image": pa.array([png_bytes(8, 8, (index, 0, 0)) for index in range(len(ids))], pa.binary()),
            "status": pa.array(["ok"] * len(ids), pa.string()),
            "error": pa.array([None] * len(ids), pa.string()),
        }
    )
    filesystem, root = filesystem_for(str(sink_dir))
    lease = SinkLease(filesystem, root, str(sink_dir), "run00001", "hash", seconds=60)
    lease.acquire()
    try:
        sink = ParquetImageSink(config.sink, "hash", 1, "run00001")
        written = sink.write([table], types.SimpleNamespace(task_idx=0))
    finally:
        lease.release()
    return pq.read_table(sink_dir / written[0]["shard"]).to_pylist()


def test_hostile_ids_each_get_their_own_png_and_the_row_names_it(tmp_path):
    rows = write_rows(tmp_path / "out", HOSTILE_IDS)
    assert [row["status"] for row in rows] == ["ok"] * len(HOSTILE_IDS)
    for row in rows:
        assert (tmp_path / "out" / "images" / row["image"]["path"]).read_bytes() == row["image"]["bytes"]
    assert len({row["image"]["path"] for row in rows}) == len(HOSTILE_IDS)


def test_a_png_that_cannot_be_written_makes_its_row_an_error_after_retries(tmp_path, monkeypatch):
    import jobs.sinks

    real = jobs.sinks.open_atomically
    tries = []

    def failing(filesystem, path):
        if "/images/bad-" in path:
            tries.append(path)
            raise OSError(28, "No space left on device")
        return real(filesystem, path)

    monkeypatch.setattr(jobs.sinks, "open_atomically", failing)
    monkeypatch.setattr(jobs.sinks, "IMAGE_RETRY_SECONDS", 0)
    rows = {row["id"]: row for row in write_rows(tmp_path / "out", ["good", "bad"])}
    assert len(tries) == jobs.sinks.IMAGE_WRITE_ATTEMPTS
    assert rows["good"]["status"] == "ok" and rows["good"]["image"]["bytes"]
    assert rows["bad"]["status"] == "error" and rows["bad"]["image"] is None
    assert rows["bad"]["error"] == (
        f"cannot write image file images/{image_file_name('bad', 0)}: OSError: [Errno 28] No space left on device"
    )


# -- --rerun-failed ---------------------------------------------------------------------------------


def test_rerun_failed_leaves_no_empty_shard(tmp_path):
    sink = tmp_path / "out"
    config = job(tmp_path / "in", sink)
    filesystem, root = filesystem_for(str(sink))
    for name, statuses in (("all-errors", ["error", "error"]), ("mixed", ["ok", "error"]), ("clean", ["ok"])):
        table = pa.table({"id": [f"{name}-{i}" for i in range(len(statuses))], "status": statuses})
        shard = f"data/part-a0001-old00000-{name}-000.parquet"
        write_shard(filesystem, root, shard, table, Commit(shard, table.num_rows, "h", 1, run_id="old00000"))
    state = SinkState(config.sink)
    assert state.drop_error_rows(2, "h", "new00000") == 3

    after = SinkState(config.sink)
    shards = sorted(path.name for path in (sink / "data").glob("*.parquet"))
    assert shards == ["part-a0001-old00000-clean-000.parquet", "part-a0002-new00000-r0002-000.parquet"]
    assert sorted(after.commits) == [f"data/{name}" for name in shards]
    assert {commit.rows for commit in after.commits.values()} == {1}
    assert sorted(after.read(["id"]).column("id").to_pylist()) == ["clean-0", "mixed-0"]
    assert len(list((sink / "_commits").glob("*.json"))) == 2


# -- the lease --------------------------------------------------------------------------------------


def test_local_lease_is_exclusive_renewed_by_its_holder_and_taken_over_when_stale(tmp_path):
    filesystem, root = filesystem_for(str(tmp_path / "out"))
    first = SinkLease(filesystem, root, "out", "run00001", "h", seconds=60)
    first.acquire()
    second = SinkLease(filesystem, root, "out", "run00002", "h", seconds=60)
    with pytest.raises(Exception, match=r"sink.uri out is in use by another run \(host .*, pid .*, run run00001"):
        second.acquire()
    assert first.renew()
    record = json.loads((tmp_path / "out" / LEASE).read_text())
    record.update(expires=0)  # expired: the holder stopped renewing
    (tmp_path / "out" / LEASE).write_text(json.dumps(record))
    second.acquire()
    assert not first.renew() and "taken by another run" in first.lost
    first.release()  # not its lease any more: left alone
    assert json.loads((tmp_path / "out" / LEASE).read_text())["run_id"] == "run00002"
    second.release()
    assert not (tmp_path / "out" / LEASE).exists()


def lease_of_a_dead_process(folder, **fields):
    """A lease of run00001 as a driver killed mid-job leaves it: its pid no longer exists."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    filesystem, root = filesystem_for(str(folder))
    SinkLease(filesystem, root, "out", "run00001", "h", seconds=600).acquire()
    record = json.loads((folder / LEASE).read_text())
    (folder / LEASE).write_text(json.dumps({**record, "pid": int(dead.stdout), **fields}))
    return SinkLease(filesystem, root, "out", "run00002", "h", seconds=600)


def test_lease_of_a_killed_process_on_this_host_is_taken_over(tmp_path):
    rerun = lease_of_a_dead_process(tmp_path)
    rerun.acquire()
    assert json.loads(io.BytesIO((tmp_path / LEASE).read_bytes()).read())["run_id"] == "run00002"
    rerun.release()


def test_lease_of_a_dead_pid_on_another_machine_of_the_same_host_name_waits_for_expiry(tmp_path):
    # Two containers with one host name: a pid from the other's namespace says nothing here.
    rerun = lease_of_a_dead_process(tmp_path, machine="another:boot")
    with pytest.raises(SinkBusy, match="run run00001"):
        rerun.acquire()


def test_a_write_task_whose_run_lost_the_lease_commits_nothing(tmp_path):
    config = job(tmp_path / "in", tmp_path / "out")
    filesystem, root = filesystem_for(str(tmp_path / "out"))
    taker = SinkLease(filesystem, root, "out", "run00002", "h", seconds=60)
    taker.acquire()  # run00001 stalled past its expiry and run00002 took the sink over
    table = pa.table(
        {
            "id": pa.array(["a"], pa.string()),
            "variant_index": pa.array([0], pa.int64()),
            "image": pa.array([png_bytes(8, 8)], pa.binary()),
            "status": pa.array(["ok"], pa.string()),
            "error": pa.array([None], pa.string()),
        }
    )
    with pytest.raises(LeaseLost, match=r"run run00001 no longer holds the lease of the sink \(host "):
        ParquetImageSink(config.sink, "h", 1, "run00001").write([table], types.SimpleNamespace(task_idx=0))
    assert not (tmp_path / "out" / "_commits").exists() and not (tmp_path / "out" / "data").exists()
    taker.release()


@pytest.mark.parametrize("value", ["0", "-5", "abc", "nan", "1e9"])
def test_a_bad_lease_time_is_one_line(value, monkeypatch):
    monkeypatch.setenv("RESTYLE_LEASE_SECONDS", value)
    with pytest.raises(
        LeaseSettingError, match=f"RESTYLE_LEASE_SECONDS is '{value}'; accepted: seconds from 5 to 3600"
    ):
        lease_seconds()


def test_overwrite_and_resume_keep_user_files_that_look_like_outputs(tmp_path):
    # A user's PNG named like a variant, and a backup copy of a shard in a subfolder of data/.
    source, sink = image_folder(tmp_path / "in"), tmp_path / "out"
    sink.mkdir()
    fake_output(sink)
    (sink / "data" / "mine.csv").unlink()
    (sink / "notes.txt").unlink()
    (sink / "images" / "logo.v2.png").write_bytes(b"mine")
    (sink / "data" / "backup").mkdir()
    (sink / "data" / "backup" / "part-a0001-1a2b3c4d-00000-000.parquet").write_bytes(b"mine")
    config = job(source, sink, mode="overwrite")
    with pytest.raises(SinkError, match=r"\(2 entries: data/backup, images/logo.v2.png\)"):
        open_sink(config, config_hash(config), "run00001")
    for mode in ("resume", "overwrite"):
        state, lease = open_sink(job(source, sink, mode=mode), config_hash(config), "run00002", force=True)
        lease.release()
        assert (sink / "images" / "logo.v2.png").read_bytes() == b"mine"
        assert (sink / "data" / "backup" / "part-a0001-1a2b3c4d-00000-000.parquet").read_bytes() == b"mine"


@pytest.mark.parametrize("uri", ["file:{source}", "file:", "FILE:/x", "local:{source}", "S3://bucket/out"])
def test_protocols_without_slashes_are_refused_before_they_reach_the_sink_checks(uri, tmp_path):
    from jobs.config import ConfigError

    source = image_folder(tmp_path / "in")
    with pytest.raises(ConfigError, match="sink.uri: "):
        validate_config(
            {
                "source": {"uri": str(source), "format": "images"},
                "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}]}],
                "sink": {"uri": uri.format(source=source)},
            }
        )


def test_accounting_refuses_committed_shards_of_another_config(tmp_path):
    from jobs.report import AccountingError, account_for_rows

    config = job(tmp_path / "in", tmp_path / "out")
    ours, theirs = "data/part-a0001-run00001-00000-000.parquet", "data/part-a0001-run00002-00000-000.parquet"
    state = types.SimpleNamespace(
        commits={
            ours: Commit(ours, 1, config_hash(config), 1, run_id="run00001"),
            theirs: Commit(theirs, 1, "0123456789abcdef", 1, run_id="run00002"),
        }
    )
    with pytest.raises(AccountingError, match=f"1 committed shards .* belong to another config \\(e.g. {theirs}"):
        account_for_rows(config, None, None, state, 1.0)


def test_cli_passes_force_and_refuses_a_foreign_sink_in_one_line(tmp_path, capsys, monkeypatch):
    import yaml

    import jobs.pipeline
    from jobs.cli import main

    source, sink = image_folder(tmp_path / "in"), tmp_path / "out"
    sink.mkdir()
    (sink / "notes.txt").write_text("mine")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job(source, sink, mode="overwrite").model_dump(mode="json", exclude_none=True)))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: sink.uri {sink} holds files restyle did not write (1 entries: notes.txt); ")
    assert err.count("\n") == 1 and (sink / "notes.txt").read_text() == "mine"

    seen = {}

    def run_job_stub(config, **kwargs):
        seen.update(kwargs)
        raise SinkError("stopped here")

    monkeypatch.setattr(jobs.pipeline, "run_job", run_job_stub)
    assert main(["run", str(path), "--force"]) == 2
    assert seen["force"] is True


def test_overwrite_on_s3_refuses_foreign_keys_and_with_force_deletes_only_its_own(s3_bucket, tmp_path):
    bucket, storage, client = s3_bucket
    config = validate_config(
        {
            "source": {"uri": str(image_folder(tmp_path / "in")), "format": "images"},
            "operators": [{"kind": "standardize", "steps": [{"op": "clahe"}]}],
            "sink": {"uri": f"s3://{bucket}/out", "mode": "overwrite", "storage": storage},
        }
    )
    ours = [
        "out/data/part-a0001-1a2b3c4d-00000-000.parquet",
        "out/_commits/part-a0001-1a2b3c4d-00000-000.parquet.json",
        "out/images/r0-0123456789abcdef.v0.png",
        "out/summary.json",
    ]
    for key in [*ours, "out/data/mine.csv", "out/notes.txt", "outside.txt"]:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")

    def keys() -> list[str]:
        return sorted(item["Key"] for item in client.list_objects_v2(Bucket=bucket).get("Contents", []))

    with pytest.raises(SinkError, match=r"holds files restyle did not write \(2 entries: data/mine.csv, notes.txt\)"):
        open_sink(config, config_hash(config), "run00001")
    assert keys() == sorted([*ours, "out/data/mine.csv", "out/notes.txt", "outside.txt"])
    _, lease = open_sink(config, config_hash(config), "run00002", force=True)
    lease.release()
    assert keys() == ["out/data/mine.csv", "out/notes.txt", "outside.txt"]


def test_an_s3_lease_taken_over_while_its_old_holder_releases_it_stays(s3_bucket, monkeypatch):
    bucket, storage, client = s3_bucket
    from jobs.config import StorageConfig

    filesystem, root = filesystem_for(f"s3://{bucket}/out", StorageConfig(**storage).storage_options())
    first = SinkLease(filesystem, root, "out", "run00001", "h", seconds=60)
    first.acquire()
    assert json.loads(client.get_object(Bucket=bucket, Key=f"out/{LEASE}")["Body"].read())["run_id"] == "run00001"
    read_by_first = first._read_remote()
    # run00002 takes the lease over right after run00001 read it (its lease had expired meanwhile).
    taken = json.dumps({**read_by_first[0], "run_id": "run00002", "pid": 1}).encode()
    client.put_object(Bucket=bucket, Key=f"out/{LEASE}", Body=taken)
    monkeypatch.setattr(first, "_read_remote", lambda: read_by_first)
    first.release()
    assert json.loads(client.get_object(Bucket=bucket, Key=f"out/{LEASE}")["Body"].read())["run_id"] == "run00002"

    second = SinkLease(filesystem, root, "out", "run00003", "h", seconds=60)
    client.delete_object(Bucket=bucket, Key=f"out/{LEASE}")
    second.acquire()
    second.release()  # its own, unchanged: deleted
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix=f"out/{LEASE}")


def test_shards_are_capped_by_bytes_as_well_as_rows():
    from jobs.sinks import shard_slices

    sizes = [100_000, 100_000, 100_000, 300_000, 50_000, 50_000, 50_000, 100_000]
    table = pa.table({"id": [str(i) for i in range(len(sizes))], "image": [b"x" * size for size in sizes]})
    slices = shard_slices(table, max_rows=1000, max_bytes=250_000)
    # Consecutive, complete, each within the cap except the one row that alone exceeds it.
    assert slices == [(0, 2), (2, 1), (3, 1), (4, 3), (7, 1)]
    assert shard_slices(table, max_rows=2, max_bytes=10**9) == [(0, 2), (2, 2), (4, 2), (6, 2)]
    nulls = pa.table({"id": ["a", "b"], "image": pa.array([None, b"y"], pa.binary())})
    assert shard_slices(nulls, max_rows=1000, max_bytes=10**6) == [(0, 2)]


def test_a_write_larger_than_the_byte_cap_becomes_several_committed_shards(tmp_path):
    """Before the cap, one write task's rows became shards by row count alone: 2.3 GiB of images
    in one shard failed to build (one binary array holds at most 2 GiB)."""
    config = job(tmp_path / "in", tmp_path / "out")
    config = config.model_copy(update={"sink": config.sink.model_copy(update={"bytes_per_shard": 64 * 1024})})
    images = [bytes(range(256)) * 120 for _ in range(6)]  # 30 KiB each: two per 64 KiB shard
    table = pa.table(
        {
            "id": pa.array([f"row-{i}" for i in range(6)], pa.string()),
            "variant_index": pa.array([0] * 6, pa.int64()),
            "image": pa.array(images, pa.binary()),
            "status": pa.array(["ok"] * 6, pa.string()),
            "error": pa.array([None] * 6, pa.string()),
        }
    )
    filesystem, root = filesystem_for(str(tmp_path / "out"))
    lease = SinkLease(filesystem, root, str(tmp_path / "out"), "run00001", "h", seconds=60)
    lease.acquire()
    try:
        written = ParquetImageSink(config.sink, "h", 1, "run00001").write([table], types.SimpleNamespace(task_idx=0))
    finally:
        lease.release()
    assert [entry["rows"] for entry in written] == [2, 2, 2]
    ids = [row["id"] for entry in written for row in pq.read_table(tmp_path / "out" / entry["shard"]).to_pylist()]
    assert ids == [f"row-{i}" for i in range(6)]
    assert len(list((tmp_path / "out" / "_commits").iterdir())) == len(written)


def test_rerun_failed_reads_only_shards_whose_records_count_error_rows(tmp_path):
    sink = tmp_path / "out"
    config = job(tmp_path / "in", sink)
    filesystem, root = filesystem_for(str(sink))
    for name, statuses in (("clean", ["ok", "ok"]), ("mixed", ["ok", "error"])):
        table = pa.table({"id": [f"{name}-{i}" for i in range(2)], "status": statuses})
        shard = f"data/part-a0001-old00000-{name}-000.parquet"
        counts = {status: statuses.count(status) for status in set(statuses)}
        write_shard(filesystem, root, shard, table, Commit(shard, 2, "h", 1, run_id="old00000", statuses=counts))
    (sink / "data" / "part-a0001-old00000-clean-000.parquet").write_bytes(b"not parquet")  # never read
    assert SinkState(config.sink).drop_error_rows(2, "h", "new00000") == 1


def test_a_write_task_commits_each_shard_before_it_takes_the_next_block(tmp_path):
    """A task that writes a whole fragment holds at most one shard's rows beyond the block in hand:
    a shard is committed as soon as the rows after it begin the next one."""
    config = job(tmp_path / "in", tmp_path / "out")
    config = config.model_copy(update={"sink": config.sink.model_copy(update={"rows_per_shard": 2})})
    commits = tmp_path / "out" / "_commits"
    seen = []

    def blocks():
        for start in range(0, 9, 3):
            seen.append(len(list(commits.iterdir())) if commits.exists() else 0)
            yield pa.table(
                {
                    "id": pa.array([f"row-{i}" for i in range(start, start + 3)], pa.string()),
                    "variant_index": pa.array([0] * 3, pa.int64()),
                    "image": pa.array([png_bytes(4, 4, (i, 0, 0)) for i in range(start, start + 3)], pa.binary()),
                    "status": pa.array(["ok"] * 3, pa.string()),
                    "error": pa.array([None] * 3, pa.string()),
                }
            )

    filesystem, root = filesystem_for(str(tmp_path / "out"))
    lease = SinkLease(filesystem, root, str(tmp_path / "out"), "run00001", "h", seconds=60)
    lease.acquire()
    try:
        written = ParquetImageSink(config.sink, "h", 1, "run00001").write(blocks(), types.SimpleNamespace(task_idx=0))
    finally:
        lease.release()
    assert seen == [0, 1, 2]  # rows 0-1 committed before block 2 was asked for, rows 2-3 before block 3
    assert [entry["rows"] for entry in written] == [2, 2, 2, 2, 1]
    ids = [row["id"] for entry in written for row in pq.read_table(tmp_path / "out" / entry["shard"]).to_pylist()]
    assert ids == [f"row-{i}" for i in range(9)]
