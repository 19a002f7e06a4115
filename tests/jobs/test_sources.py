"""Sources: column checks, id rules, Parquet, Arrow IPC (as `datasets.save_to_disk` writes it)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import SourceConfig
from jobs.sources import SourceError, inspect_source, read_source
from tests.conftest import png_bytes, write_image_parquet


def rows(count: int) -> list[dict]:
    return [{"id": f"r{i}", "image": png_bytes(16, 16, (i, i, i)), "label": i} for i in range(count)]


def test_parquet_ids_are_sorted_strings_and_limit_takes_the_first(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"uid": [30, 10, 20], "img": [png_bytes()] * 3, "note": ["c", "a", "b"]}), path)
    info = inspect_source(SourceConfig(uri=str(path), id_column="uid", image_column="img"))
    assert info.ids == ["10", "20", "30"] and info.passthrough_columns == ["note"]
    assert inspect_source(SourceConfig(uri=str(path), id_column="uid", image_column="img", limit=2)).ids == ["10", "20"]


def test_limit_is_applied_when_reading(ray_session, tmp_path):
    path = write_image_parquet(tmp_path / "rows.parquet", rows(5))
    config = SourceConfig(uri=str(path), limit=2)
    read = read_source(config, inspect_source(config)).take_all()
    assert sorted(row["id"] for row in read) == ["r0", "r1"]
    assert {row["label"] for row in read} == {0, 1}


@pytest.mark.parametrize(
    ("table", "options", "message"),
    [
        ({"id": ["a", "a", "b"], "image": [b"x"] * 3}, {}, r"has 1 repeated ids, e.g. \['a'\]; ids must be unique"),
        ({"id": ["a", None], "image": [b"x"] * 2}, {}, "has 1 null ids"),
        (
            {"id": ["a"], "picture": [b"x"]},
            {},
            r"source.image_column 'image' is not a column of .*columns: \['id', 'picture'\]",
        ),
        ({"id": ["a"], "image": ["path/a.png"]}, {}, "has type string; accepted: binary"),
        ({"id": ["a"], "image": [b"x"], "status": ["new"]}, {}, r"source columns \['status'\] clash with columns"),
    ],
)
def test_bad_sources_are_refused_with_the_reason(tmp_path, table, options, message):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table(table), path)
    with pytest.raises(SourceError, match=message):
        inspect_source(SourceConfig(uri=str(path), **options))


def test_missing_source_names_the_uri(tmp_path):
    with pytest.raises(SourceError, match=f"cannot read Parquet at source.uri {tmp_path / 'nope'}"):
        inspect_source(SourceConfig(uri=str(tmp_path / "nope")))
    with pytest.raises(SourceError, match="is not a directory"):
        inspect_source(SourceConfig(uri=str(tmp_path / "nope"), format="images"))


def test_hugging_face_save_to_disk_arrow_shards(ray_session, tmp_path):
    import datasets

    data = datasets.Dataset.from_dict(
        {"id": ["x", "y", "z"], "image": [png_bytes(8, 8)] * 3, "caption": ["one", "two", "three"]},
        features=datasets.Features(
            {"id": datasets.Value("string"), "image": datasets.Image(), "caption": datasets.Value("string")}
        ),
    )
    data.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    config = SourceConfig(uri=str(tmp_path / "saved"), format="arrow")
    info = inspect_source(config)
    assert info.ids == ["x", "y", "z"] and info.passthrough_columns == ["caption"]
    assert len(info.files) == 2
    read = sorted(read_source(config, info).take_all(), key=lambda row: row["id"])
    assert [(row["id"], row["caption"], row["status"]) for row in read] == [
        ("x", "one", "ok"),
        ("y", "two", "ok"),
        ("z", "three", "ok"),
    ]
    assert read[0]["image"] == png_bytes(8, 8)
