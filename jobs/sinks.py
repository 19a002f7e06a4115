"""The Parquet sink: Hugging Face-loadable shards with deterministic names, plus optional PNGs.

Layout under the sink URI:
  data/part-aAAAA-TTTTT-SSS.parquet   shards (AAAA: run attempt, TTTTT: write task, SSS: shard)
  _commits/<shard>.json               a shard's commit record (see jobs/commits.py)
  images/ID.vN.png                    with `sink.write_images`, each output as a PNG file
  _manifest.json                      written last: every committed shard, rows, config hash
  summary.json, report.html           written by the driver when the job ends

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
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from jobs.commits import Commit, write_shard
from jobs.config import SinkConfig
from jobs.storage import filesystem_for, join, open_atomically

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]")


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
    data = table.column("image").combine_chunks().cast(pa.binary())
    # The null mask, not the bytes themselves, decides which rows get a path.
    paths = [
        None if missing else image_file_name(row_id, variant)
        for row_id, variant, missing in zip(
            table.column("id").to_pylist(),
            table.column("variant_index").to_pylist(),
            data.is_null().to_pylist(),
            strict=True,
        )
    ]
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
    """Ray Data sink writing the layout above; each write task commits its own shards, so a crash
    loses only the shards in flight. Returns the shard names each task committed."""

    def __init__(self, config: SinkConfig, config_hash: str, attempt: int):
        self.config = config
        self.config_hash = config_hash
        self.attempt = attempt

    def get_name(self) -> str:
        return "RestyleParquet"

    def write(self, blocks: Iterable[Block], ctx) -> list[dict]:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables, promote_options="permissive")
        filesystem, root = filesystem_for(self.config.uri, self.config.storage.storage_options())
        if self.config.write_images:
            # Before the shards: a committed row's image file always exists.
            self._write_images(table, filesystem, root)
        written = []
        shard_rows = self.config.rows_per_shard
        for shard_index, offset in enumerate(range(0, table.num_rows, shard_rows)):
            shard = to_output_table(table.slice(offset, shard_rows))
            name = f"data/part-a{self.attempt:04d}-{ctx.task_idx:05d}-{shard_index:03d}.parquet"
            write_shard(filesystem, root, name, shard, Commit(name, shard.num_rows, self.config_hash, self.attempt))
            written.append({"shard": name, "rows": shard.num_rows})
        return written

    def _write_images(self, table: pa.Table, filesystem, root: str) -> None:
        for row_id, variant, data in zip(
            table.column("id").to_pylist(),
            table.column("variant_index").to_pylist(),
            table.column("image").to_pylist(),
            strict=True,
        ):
            if data is not None:
                with open_atomically(filesystem, join(root, "images", image_file_name(row_id, variant))) as handle:
                    handle.write(data)
