"""Output schema: every column in a type Hugging Face `datasets` loads, and the features that say so.

`output_type` maps an Arrow type to the one it is written as: dictionary (pandas categorical)
columns are decoded to their values, decimal32/64 widen to decimal128, maps become lists of
{key, value} structs (their own storage layout), list views become lists, and extension types
other than JSON are written as their storage type. Nothing is lost in these conversions. Types
`datasets` has no feature for (unions, intervals, run-end encoded) are refused with a
`SchemaError` naming the column, which `inspect_source` raises before the job starts.

The mapping is a pure function of the type, so every write task normalises a block the same
way; the source's own columns are cast to the types `inspect_source` derived from the whole
source's schema as they are read, so a column that is all null in one file still gets the one
type every shard shares.

`features` is the `datasets` feature dictionary of a schema, equal to
`datasets.Features.from_arrow_schema(schema).to_dict()` for every output type (tested against it)
without importing `datasets` where the shards are written.
"""

from __future__ import annotations

import re

import pyarrow as pa

from operators.base import UserError

ACCEPTED = (
    "booleans, integers, floats, decimals, strings, binaries, dates, times, timestamps, durations, "
    "and lists, structs and maps of them"
)


class SchemaError(UserError):
    """A column whose type Hugging Face `datasets` cannot represent."""


def output_type(data_type: pa.DataType, column: str) -> pa.DataType:
    """The type a column of `data_type` is written as (see module docstring); `column` names it in errors."""
    if pa.types.is_dictionary(data_type):
        return output_type(data_type.value_type, column)
    if isinstance(data_type, pa.JsonType):
        return data_type
    if isinstance(data_type, pa.BaseExtensionType):
        return output_type(data_type.storage_type, column)
    if pa.types.is_struct(data_type):
        return pa.struct([pa.field(item.name, output_type(item.type, f"{column}.{item.name}")) for item in data_type])
    if pa.types.is_map(data_type):
        return pa.list_(
            pa.struct(
                [
                    pa.field("key", output_type(data_type.key_type, f"{column}.key")),
                    pa.field("value", output_type(data_type.item_type, f"{column}.value")),
                ]
            )
        )
    if pa.types.is_fixed_size_list(data_type):
        return pa.list_(output_type(data_type.value_type, f"{column}[]"), data_type.list_size)
    if pa.types.is_list(data_type) or pa.types.is_list_view(data_type):
        return pa.list_(output_type(data_type.value_type, f"{column}[]"))
    if pa.types.is_large_list(data_type) or pa.types.is_large_list_view(data_type):
        return pa.large_list(output_type(data_type.value_type, f"{column}[]"))
    if pa.types.is_decimal32(data_type) or pa.types.is_decimal64(data_type):
        return pa.decimal128(data_type.precision, data_type.scale)
    if value_dtype(data_type) is None:
        raise SchemaError(
            f"column {column!r} has type {data_type}, which Hugging Face datasets cannot load; accepted: "
            f"{ACCEPTED}. Convert or drop the column in the source"
        )
    return data_type


def output_schema(schema: pa.Schema) -> pa.Schema:
    """`output_type` of every field, all fields nullable (as `datasets` reads them), no metadata."""
    return pa.schema([pa.field(item.name, output_type(item.type, item.name)) for item in schema])


def normalize_table(table: pa.Table) -> pa.Table:
    """Cast every column to its `output_type`; the schema metadata is dropped."""
    return conform(table, output_schema(table.schema))


def conform(table: pa.Table, schema: pa.Schema | dict[str, pa.DataType]) -> pa.Table:
    """Cast the columns named in `schema` to its types, adding the ones the table lacks as nulls;
    other columns are kept as they are, in order, with the added ones last."""
    types = schema if isinstance(schema, dict) else {item.name: item.type for item in schema}
    fields, columns = [], []
    for name in table.column_names:
        column = table.column(name)
        target = types.get(name, column.type)
        fields.append(pa.field(name, target))
        columns.append(column if column.type == target else column.cast(target))
    for name, target in types.items():
        if name not in table.column_names:
            fields.append(pa.field(name, target))
            columns.append(pa.nulls(table.num_rows, target))
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def features(schema: pa.Schema) -> dict:
    """The `datasets` feature dictionary of a schema already in output types."""
    return {item.name: feature(item.type) for item in schema}


def feature(data_type: pa.DataType) -> dict:
    """The `datasets` feature of one output type (as `datasets.features.generate_from_arrow_type` gives it)."""
    if pa.types.is_struct(data_type):
        return {item.name: feature(item.type) for item in data_type}
    if pa.types.is_fixed_size_list(data_type):
        return {"feature": feature(data_type.value_type), "length": data_type.list_size, "_type": "List"}
    if pa.types.is_list(data_type):
        return {"feature": feature(data_type.value_type), "_type": "List"}
    if pa.types.is_large_list(data_type):
        return {"feature": feature(data_type.value_type), "_type": "LargeList"}
    if isinstance(data_type, pa.JsonType):
        return {"_type": "Json"}
    dtype = value_dtype(data_type)
    if dtype is None:
        raise SchemaError(f"type {data_type} has no Hugging Face datasets feature")
    return {"dtype": dtype, "_type": "Value"}


def yaml_features(features: dict) -> list[dict]:
    """A feature dictionary in the list form a dataset card's `dataset_info.features` holds (as
    `datasets.Features._to_yaml_list` writes it): `{name, dtype}` for a value or `Image`, `{name, list,
    length}` for lists (the item's dtype inline when it is a plain value), `{name, struct: [...]}`."""
    return _yaml_feature(dict(features))["struct"]


def _yaml_feature(feature: dict) -> dict:
    feature = dict(feature)
    kind = feature.pop("_type", None)
    if kind in ("List", "LargeList"):
        item = _yaml_feature(feature.pop("feature"))
        key = "list" if kind == "List" else "large_list"
        # A plain value or struct item is written inline (`list: int32`, `list: [...]`).
        only = list(item)
        inline = item[only[0]] if only in (["dtype"], ["struct"]) else item
        return {key: inline, **feature}
    if kind == "Value":
        return feature
    if kind:
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()
        return {"dtype": snake} if not feature else {"dtype": {snake: feature}}
    return {"struct": [{"name": name, **_yaml_feature(item)} for name, item in feature.items()]}


_SIMPLE_DTYPES = {
    pa.null(): "null",
    pa.bool_(): "bool",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.date32(): "date32",
    pa.date64(): "date64",
    pa.binary(): "binary",
    pa.large_binary(): "large_binary",
    pa.binary_view(): "binary_view",
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.string_view(): "string_view",
}


def value_dtype(data_type: pa.DataType) -> str | None:
    """The `datasets.Value` dtype string of a non-nested type, or None when there is none."""
    if data_type in _SIMPLE_DTYPES:
        return _SIMPLE_DTYPES[data_type]
    if pa.types.is_time32(data_type):
        return f"time32[{data_type.unit}]"
    if pa.types.is_time64(data_type):
        return f"time64[{data_type.unit}]"
    if pa.types.is_timestamp(data_type):
        return f"timestamp[{data_type.unit}, tz={data_type.tz}]" if data_type.tz else f"timestamp[{data_type.unit}]"
    if pa.types.is_duration(data_type):
        return f"duration[{data_type.unit}]"
    if pa.types.is_decimal128(data_type) or pa.types.is_decimal256(data_type):
        return f"decimal{data_type.bit_width}({data_type.precision}, {data_type.scale})"
    if pa.types.is_fixed_size_binary(data_type):
        return f"fixed_size_binary[{data_type.byte_width}]"
    return None
