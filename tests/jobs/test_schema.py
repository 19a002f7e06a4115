"""Output schema: every column type `datasets` loads, features equal to `datasets`' own, and a job over
a Parquet source with awkward passthrough types whose output `datasets.load_dataset` reads back exactly."""

from __future__ import annotations

import datetime
import json
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from jobs.config import SourceConfig, validate_config
from jobs.schema import SchemaError, conform, features, normalize_table, output_type
from jobs.sources import SourceError, inspect_source
from tests.conftest import png_bytes

POINT = pa.struct([("x", pa.int32()), ("label", pa.string())])

# Types `datasets` represents as they are: each is its own output type.
KEPT = [
    pa.null(),
    pa.bool_(),
    pa.int8(),
    pa.uint64(),
    pa.float16(),
    pa.float32(),
    pa.float64(),
    pa.string(),
    pa.large_string(),
    pa.string_view(),
    pa.binary(),
    pa.large_binary(),
    pa.binary(4),
    pa.date32(),
    pa.date64(),
    pa.time32("ms"),
    pa.time64("ns"),
    pa.timestamp("s"),
    pa.timestamp("us", tz="Europe/Paris"),
    pa.timestamp("ns", tz="+05:30"),
    pa.duration("ms"),
    pa.decimal128(9, 2),
    pa.decimal256(40, 5),
    pa.list_(pa.int32()),
    pa.list_(pa.float32(), 3),
    pa.large_list(pa.string()),
    pa.list_(POINT),
    pa.struct([("source", pa.string()), ("shot", pa.struct([("iso", pa.int32()), ("tags", pa.list_(pa.string()))]))]),
    pa.json_(),
]

# Types converted on the way out, and what they become.
CONVERTED = [
    (pa.dictionary(pa.int8(), pa.string()), pa.string()),
    (pa.dictionary(pa.int32(), pa.int64()), pa.int64()),
    (pa.struct([("kind", pa.dictionary(pa.int16(), pa.string()))]), pa.struct([("kind", pa.string())])),
    (pa.list_(pa.dictionary(pa.int8(), pa.string()), 2), pa.list_(pa.string(), 2)),
    (pa.decimal32(5, 2), pa.decimal128(5, 2)),
    (pa.decimal64(12, 3), pa.decimal128(12, 3)),
    (pa.map_(pa.string(), pa.int64()), pa.list_(pa.struct([("key", pa.string()), ("value", pa.int64())]))),
    (pa.list_view(pa.int32()), pa.list_(pa.int32())),
    (pa.large_list_view(pa.int32()), pa.large_list(pa.int32())),
    (pa.uuid(), pa.binary(16)),
    (pa.bool8(), pa.int8()),
]


@pytest.mark.parametrize("data_type", KEPT + [converted for _, converted in CONVERTED], ids=str)
def test_features_are_those_datasets_derives(data_type):
    import datasets

    schema = pa.schema([("column", data_type)])
    assert output_type(data_type, "column") == data_type
    assert features(schema) == datasets.Features.from_arrow_schema(schema).to_dict()


@pytest.mark.parametrize(("data_type", "written_as"), CONVERTED, ids=lambda value: str(value))
def test_types_datasets_cannot_hold_are_converted(data_type, written_as):
    assert output_type(data_type, "column") == written_as


def test_fixed_size_and_large_lists_keep_their_kind():
    assert features(pa.schema([("v", pa.list_(pa.float32(), 3))])) == {
        "v": {"feature": {"dtype": "float32", "_type": "Value"}, "length": 3, "_type": "List"}
    }
    assert features(pa.schema([("v", pa.large_list(pa.int64()))])) == {
        "v": {"feature": {"dtype": "int64", "_type": "Value"}, "_type": "LargeList"}
    }


def test_converted_values_are_unchanged():
    table = pa.table(
        {
            "category": pa.array(["b", "a", None, "b"]).dictionary_encode(),
            "amount": pa.array([Decimal("1.25"), None, Decimal("-3.50"), Decimal("0.00")], pa.decimal32(5, 2)),
            "tags": pa.array([[("k", 1)], [], None, [("a", 2), ("b", 3)]], pa.map_(pa.string(), pa.int64())),
            "ids": pa.array([b"0123456789abcdef", None, b"fedcba9876543210", b"0000000000000000"], pa.uuid()),
        }
    )
    normalized = normalize_table(table)
    assert normalized.column("category").to_pylist() == ["b", "a", None, "b"]
    assert normalized.column("amount").to_pylist() == [Decimal("1.25"), None, Decimal("-3.50"), Decimal("0.00")]
    assert normalized.column("tags").to_pylist() == [
        [{"key": "k", "value": 1}],
        [],
        None,
        [{"key": "a", "value": 2}, {"key": "b", "value": 3}],
    ]
    assert normalized.column("ids").to_pylist()[0] == b"0123456789abcdef"


def test_conform_gives_every_block_the_same_schema():
    types = {"note": pa.string(), "extra": pa.int64()}
    all_null = conform(pa.table({"id": ["a"], "note": pa.nulls(1)}), types)
    filled = conform(pa.table({"id": ["b"], "extra": [7], "note": ["x"]}), types)
    assert all_null.schema.field("note").type == filled.schema.field("note").type == pa.string()
    assert all_null.column("extra").to_pylist() == [None]
    assert dict(zip(all_null.schema.names, all_null.schema.types)) == dict(
        zip(filled.schema.names, filled.schema.types)
    )


@pytest.mark.parametrize(
    ("data_type", "named"),
    [
        (pa.month_day_nano_interval(), "'when'"),
        (pa.sparse_union([pa.field("a", pa.int64()), pa.field("b", pa.string())]), "'when'"),
        (pa.run_end_encoded(pa.int32(), pa.string()), "'when'"),
        (pa.struct([("span", pa.month_day_nano_interval())]), "'when.span'"),
        (pa.list_(pa.month_day_nano_interval()), r"'when\[\]'"),
    ],
    ids=str,
)
def test_types_datasets_cannot_represent_are_refused_naming_the_column(data_type, named):
    with pytest.raises(SchemaError, match=f"column {named} has type .*which Hugging Face datasets cannot load"):
        output_type(data_type, "when")


def test_a_source_column_datasets_cannot_represent_is_refused_before_the_job(tmp_path):
    table = pa.table(
        {
            "id": ["a"],
            "image": [png_bytes(8, 8)],
            "span": pa.array([pa.MonthDayNano([1, 2, 3])], pa.month_day_nano_interval()),
        }
    )
    with pa.ipc.new_file(tmp_path / "rows.arrow", table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(SourceError, match="column 'span' has type month_day_nano_interval, which Hugging Face"):
        inspect_source(SourceConfig(uri=str(tmp_path / "rows.arrow"), format="arrow"))


def passthrough_columns(start: int) -> dict[str, pa.Array]:
    """Two rows of every awkward passthrough type, different per file."""
    paris = datetime.timezone(datetime.timedelta(hours=1))
    return {
        "id": pa.array([f"r{start}", f"r{start + 1}"]),
        "image": pa.array([png_bytes(16, 16, (start * 40, 10, 10)), png_bytes(16, 16, (10, start * 40, 10))]),
        "category": pa.array(pd.Categorical(["cat", None] if start else ["dog", "cat"], categories=["cat", "dog"])),
        "taken": pa.array(
            [datetime.datetime(2024, 3, start + 1, 12, 30, tzinfo=paris), None], pa.timestamp("us", tz="Europe/Paris")
        ),
        "price": pa.array([Decimal(f"{start}.25"), Decimal("-0.10")], pa.decimal128(9, 2)),
        "vector": pa.array([[1.5, 2.0, float(start)], None], pa.list_(pa.float32(), 3)),
        "caption": pa.array([f"caption {start}", "ü"], pa.large_string()),
        "meta": pa.array(
            [{"source": "cam", "shot": {"iso": 100 + start, "lens": "35mm"}}, {"source": None, "shot": None}]
        ),
        "boxes": pa.array([[{"x": start, "label": "face"}, {"x": 2, "label": None}], []], pa.list_(POINT)),
        # All null in the first file, text in the second: every shard must still say string.
        "note": pa.nulls(2) if start == 0 else pa.array(["checked", None]),
    }


def test_job_output_with_awkward_source_types_loads_in_datasets(ray_session, tmp_path):
    import datasets

    from jobs.pipeline import run_job

    source = tmp_path / "source"
    source.mkdir()
    expected = {}
    for number, start in enumerate((0, 2)):
        table = pa.table(passthrough_columns(start))
        assert pa.types.is_dictionary(table.schema.field("category").type)
        pq.write_table(table, source / f"part-{number}.parquet")
        for row in table.to_pylist():
            expected[row.pop("id")] = {name: value for name, value in row.items() if name != "image"}
    config = validate_config(
        {
            "source": {"uri": str(source), "read_blocks": 2},
            "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}], "output_mode": "rgb"}],
            "sink": {"uri": str(tmp_path / "out"), "rows_per_shard": 1},
        }
    )
    column_types = inspect_source(config.source).column_types
    assert (column_types["category"], column_types["note"]) == (pa.string(), pa.string())

    result = run_job(config)

    assert (result.summary["ok"], result.summary["error"], result.summary["skipped"]) == (4, 0, 0)
    shards = sorted((tmp_path / "out" / "data").glob("*.parquet"))
    assert len(shards) == 4
    schemas = [pq.read_schema(shard) for shard in shards]
    assert all(schema.equals(schemas[0], check_metadata=True) for schema in schemas)
    feature_json = json.loads(schemas[0].metadata[b"huggingface"])["info"]["features"]
    assert feature_json["category"] == {"dtype": "string", "_type": "Value"}
    assert feature_json["taken"] == {"dtype": "timestamp[us, tz=Europe/Paris]", "_type": "Value"}
    assert feature_json["vector"] == {"feature": {"dtype": "float32", "_type": "Value"}, "length": 3, "_type": "List"}
    assert feature_json["caption"] == {"dtype": "large_string", "_type": "Value"}
    assert feature_json["image"] == {"_type": "Image"}

    loaded = datasets.load_dataset(
        "parquet", data_files=[str(shard) for shard in shards], split="train", cache_dir=str(tmp_path / "hf")
    )
    assert loaded.num_rows == 4
    assert loaded.features["image"] == datasets.Image()
    rows = {row["id"]: row for row in loaded}
    assert sorted(rows) == sorted(expected)
    for row_id, values in expected.items():
        assert {name: rows[row_id][name] for name in values} == values, row_id
        assert rows[row_id]["image"].size == (16, 16)
    assert rows["r0"]["taken"].utcoffset() == datetime.timedelta(hours=1)
