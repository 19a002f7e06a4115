"""The driver holds per fragment and per shard, never per row: resume and accounting run with the id
column unreadable on the driver, and the tallies of the commit records still catch a duplicate."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import validate_config
from jobs.pipeline import run_job
from jobs.report import AccountingError
from tests.conftest import png_bytes

FILES, GROUPS, ROWS_PER_GROUP = 4, 3, 150  # 1 800 rows in 12 fragments


@pytest.fixture
def source(tmp_path):
    image = {"bytes": png_bytes(8, 8, (10, 120, 200)), "path": None}
    folder = tmp_path / "in"
    folder.mkdir()
    for file in range(FILES):
        ids = [f"f{file}-r{row:04d}" for row in range(GROUPS * ROWS_PER_GROUP)]
        table = pa.table({"id": ids, "image": [image] * len(ids), "label": list(range(len(ids)))})
        pq.write_table(table, folder / f"part-{file}.parquet", row_group_size=ROWS_PER_GROUP)
    return folder


def job(source, sink):
    return validate_config(
        {
            "source": {"uri": str(source)},
            "operators": [{"kind": "standardize", "steps": [{"op": "resize", "width": 4, "height": 4}]}],
            "sink": {"uri": str(sink), "rows_per_shard": 100, "report_rows": 0},
        }
    )


@pytest.fixture
def ids_unreadable_here(monkeypatch):
    """From now on, this process (the driver; Ray's workers are others) cannot read an `id` column:
    not from the source (a row group, a fragment), not from the committed shards."""
    from jobs import commits, sources

    driver = os.getpid()  # the guards travel with the code Ray ships; they refuse only here

    def refuse(columns):
        if os.getpid() == driver and (columns is None or "id" in columns):
            raise AssertionError(f"the driver read per-row ids (columns {columns})")

    read_row_group, read_table, read_fragment = pq.ParquetFile.read_row_group, pq.read_table, sources.read_fragment

    def guarded_read_row_group(self, index, columns=None, **options):
        refuse(columns)
        return read_row_group(self, index, columns=columns, **options)

    def guarded_read_table(source, columns=None, **options):
        refuse(columns)
        return read_table(source, columns=columns, **options)

    def guarded_read_fragment(config, *arguments, columns=None, **options):
        refuse(columns)
        return read_fragment(config, *arguments, columns=columns, **options)

    def no_committed_ids(self, columns, ids=None):
        raise AssertionError(f"the driver read committed rows (columns {columns})")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", guarded_read_row_group)
    monkeypatch.setattr(pq, "read_table", guarded_read_table)
    monkeypatch.setattr(sources, "read_fragment", guarded_read_fragment)
    monkeypatch.setattr(commits.SinkState, "read", no_committed_ids)
    monkeypatch.setattr(sources, "DRIVER_ID_CHECK_ROWS", 0)  # as for a source past it: ids checked by tasks


def test_resume_and_accounting_never_read_ids_on_the_driver(ray_session, source, tmp_path, request):
    sink = tmp_path / "out"
    first = run_job(job(source, sink)).summary
    rows = FILES * GROUPS * ROWS_PER_GROUP
    assert (first["rows_in"], first["rows_out"], first["ok"], first["missing"]) == (rows, rows, rows, 0)
    assert first["fragments"] == FILES * GROUPS

    request.getfixturevalue("ids_unreadable_here")
    again = run_job(job(source, sink)).summary  # a finished job: nothing to read at all
    assert (again["inputs_processed"], again["rows_out"], again["duplicated"]) == (0, rows, 0)

    # A crash that lost a third of the shards: only the fragments they held are read again.
    records = sorted((sink / "_commits").iterdir())
    lost = records[::3]
    lost_rows = 0
    for record in lost:
        commit = json.loads(record.read_text())
        lost_rows += commit["rows"]
        (sink / commit["shard"]).unlink()
        record.unlink()
    resumed = run_job(job(source, sink)).summary
    assert resumed["inputs_processed"] == lost_rows and resumed["rows_already_committed"] == rows - lost_rows
    assert (resumed["rows_out"], resumed["ok"], resumed["missing"], resumed["duplicated"]) == (rows, rows, 0, 0)


def test_a_duplicated_shard_is_caught_by_the_tallies_and_named(ray_session, source, tmp_path):
    sink = tmp_path / "out"
    run_job(job(source, sink))
    record = sorted((sink / "_commits").iterdir())[0]
    commit = json.loads(record.read_text())
    copy = commit["shard"].replace(".parquet", "9.parquet")  # a second live copy of the same rows
    shutil.copy(sink / commit["shard"], sink / copy)
    (sink / "_commits" / f"{copy.rsplit('/', 1)[-1]}.json").write_text(json.dumps({**commit, "shard": copy}))
    with pytest.raises(AccountingError, match=r"0 missing .*, \d+ duplicated \(e.g. \['f0-r0000 \(variant 0\)'"):
        run_job(job(source, sink))
    summary = json.loads((sink / "summary.json").read_text())
    assert summary["duplicated"] == commit["rows"] and summary["missing"] == 0
    assert len(summary["examples"]["duplicated"]) == min(commit["rows"], 20)
