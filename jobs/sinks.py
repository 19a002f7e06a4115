"""The Parquet sink: Hugging Face-loadable shards with deterministic names, plus optional PNGs.

Layout under the sink URI:
  data/part-TTTTT-SSS.parquet   one or more shards per write task (TTTTT: task index)
  images/ID.vN.png              with `sink.write_images`, each output as a PNG file
  summary.json, report.html     written by the driver when the job ends

The `image` column is the Hugging Face `Image` struct `{bytes, path}` and the schema carries the
`huggingface` metadata, so `datasets.load_dataset("parquet", data_files=".../data/*.parquet")`
yields PIL images without a cast.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from jobs.config import SinkConfig
from jobs.storage import filesystem_for, join, open_for_write

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


class SinkError(ValueError):
    """A sink that cannot be written as configured."""


def prepare_sink(config: SinkConfig) -> None:
    """Refuse (mode 'error') or clear (mode 'overwrite') a non-empty output directory."""
    filesystem, root = filesystem_for(config.uri, config.storage.storage_options())
    if not filesystem.exists(root):
        return
    existing = filesystem.ls(root)
    if not existing:
        return
    if config.mode == "error":
        raise SinkError(
            f"sink.uri {config.uri} is not empty ({len(existing)} entries); choose a new uri or set "
            "sink.mode: overwrite"
        )
    filesystem.rm(root, recursive=True)


def image_file_name(row_id: str, variant_index: int) -> str:
    """A safe relative PNG path for one output; ids that needed escaping get a hash suffix."""
    safe = "/".join(part for part in _UNSAFE.sub("_", row_id).split("/") if part not in ("", ".", ".."))
    if safe != row_id:
        safe = f"{safe or 'row'}-{hashlib.sha256(row_id.encode()).hexdigest()[:8]}"
    return f"{safe}.v{variant_index}.png"


def hf_feature(data_type: pa.DataType) -> dict | list:
    """The `datasets` feature description of an Arrow type."""
    if pa.types.is_struct(data_type):
        return {field.name: hf_feature(field.type) for field in data_type}
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type) or pa.types.is_fixed_size_list(data_type):
        return {"feature": hf_feature(data_type.value_type), "_type": "List"}
    names = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}
    return {"dtype": names.get(data_type, str(data_type)), "_type": "Value"}


def to_output_table(table: pa.Table) -> pa.Table:
    """Wrap the `image` bytes as the Hugging Face Image struct and add the `huggingface` metadata."""
    paths = [
        image_file_name(row_id, variant) if data is not None else None
        for row_id, variant, data in zip(
            table.column("id").to_pylist(),
            table.column("variant_index").to_pylist(),
            table.column("image").to_pylist(),
            strict=True,
        )
    ]
    data = table.column("image").combine_chunks().cast(pa.binary())
    images = pa.StructArray.from_arrays(
        [data, pa.array(paths, pa.string())], fields=list(IMAGE_TYPE), mask=data.is_null()
    )
    table = table.set_column(table.column_names.index("image"), "image", images)
    features = {
        field.name: {"_type": "Image"} if field.name == "image" else hf_feature(field.type) for field in table.schema
    }
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return table.replace_schema_metadata(metadata)


class ParquetImageSink(Datasink):
    """Ray Data sink writing the output layout above; each write task returns its shard names."""

    def __init__(self, config: SinkConfig):
        self.config = config

    def get_name(self) -> str:
        return "RestyleParquet"

    def write(self, blocks: Iterable[Block], ctx) -> list[dict]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables, promote_options="permissive")
        filesystem, root = filesystem_for(self.config.uri, self.config.storage.storage_options())
        written = []
        shard_rows = self.config.rows_per_shard
        for shard_index, offset in enumerate(range(0, table.num_rows, shard_rows)):
            shard = to_output_table(table.slice(offset, shard_rows))
            name = f"data/part-{ctx.task_idx:05d}-{shard_index:03d}.parquet"
            with open_for_write(filesystem, join(root, name)) as handle:
                pq.write_table(shard, handle)
            written.append({"shard": name, "rows": shard.num_rows})
        if self.config.write_images:
            self._write_images(table, filesystem, root)
        return written

    def _write_images(self, table: pa.Table, filesystem, root: str) -> None:
        for row_id, variant, data in zip(
            table.column("id").to_pylist(),
            table.column("variant_index").to_pylist(),
            table.column("image").to_pylist(),
            strict=True,
        ):
            if data is not None:
                with open_for_write(filesystem, join(root, "images", image_file_name(row_id, variant))) as handle:
                    handle.write(data)
