"""The Parquet sink: Hugging Face-loadable shards with deterministic names, plus optional PNGs.

Layout under the sink URI:
  data/part-aAAAA-RRRRRRRR-TTTTT-SSS.parquet  shards (AAAA: attempt, RRRRRRRR: run id, TTTTT: write
                                             task, SSS: shard)
  _commits/<shard>.json               a shard's commit record (see jobs/commits.py)
  images/SLUG-HASH.vN.png             with `sink.write_images`, each output as a file (.png, .webp or
                                     .jpg, as `sink.encoding.format` says)
  dicom/SLUG-HASH.vN.dcm              with `sink.dicom`, each output as a derived DICOM instance
  webdataset/part-....tar             with `sink.webdataset`, each Parquet shard's ok rows as a WebDataset
                                     shard (KEY.png and KEY.json per output; KEY is the image file name
                                     with '_' for '.'), written before the shard is committed
  images/metadata.jsonl               with `sink.imagefolder`, every ok row's fields and `file_name`,
                                     written by the driver from the committed shards when the job ends
  _manifest.json                      written last: every committed shard, rows, config hash
  summary.json, report.html           written by the driver when the job ends
  README.md                           the dataset card, written by the driver when the job ends (jobs/hub.py)
  _lease.json                         while a run is writing (see jobs/lease.py)

A PNG's name is the id made safe (characters other than letters, digits, `.`, `_`, `-` become `_`,
at most 80 of them) plus 16 hex digits of the SHA-256 of the full id and variant: no two outputs
share a file, no id is too long for a filesystem, and no name is a folder of another. A PNG that
cannot be written after a few tries makes its row `status: error` (image null), not the job fail.

The `image` column is the Hugging Face `Image` struct `{bytes, path}` and the schema carries the
`huggingface` metadata, so `datasets.load_dataset("parquet", data_files=".../data/*.parquet")`
yields PIL images without a cast.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import tarfile
import time
from collections.abc import Iterable

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from jobs.commits import IMAGEFOLDER_METADATA, shard_commit, shard_name, webdataset_shard_name, write_shard
from jobs.config import SinkConfig
from jobs.fragments import FRAGMENT, name_fragments
from jobs.lease import require_lease
from jobs.schema import features as hf_features
from jobs.schema import normalize_table
from operators.finish import DICOM_FILE
from operators.rows import ERROR, IMAGE_TYPE, OK
from operators.storage import filesystem_for, join, open_atomically

logger = logging.getLogger(__name__)

IMAGE_WRITE_ATTEMPTS = 3
IMAGE_RETRY_SECONDS = 0.5
SLUG_LENGTH = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def image_file_name(row_id: str, variant_index: int, extension: str = ".png") -> str:
    """The image file name of one output (see module docstring): a capped slug of the id plus a hash
    of the full id and variant, with no `/`."""
    slug = _UNSAFE.sub("_", row_id)[:SLUG_LENGTH].lstrip(".") or "row"
    digest = hashlib.sha256(f"{row_id}\x1f{variant_index}".encode()).hexdigest()[:16]
    return f"{slug}-{digest}.v{variant_index}{extension}"


def to_output_table(table: pa.Table, extension: str = ".png") -> pa.Table:
    """Wrap the `image` bytes as the Hugging Face Image struct, cast every column to the type it is
    written as (`jobs.schema`: the same for every shard) and add the `huggingface` metadata."""
    data = table.column("image").combine_chunks().cast(pa.binary())
    # The null mask, not the bytes themselves, decides which rows get a path.
    paths = [
        None if missing else image_file_name(row_id, variant, extension)
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
    table = normalize_table(table.set_column(table.column_names.index("image"), "image", images))
    features = {**hf_features(table.schema), "image": {"_type": "Image"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return table.replace_schema_metadata(metadata)


def shard_slices(table: pa.Table, max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """(offset, length) of consecutive slices of `table`, each of at most `max_rows` rows and
    `max_bytes` bytes (a row's encoded image plus its share of the other columns); a row larger than
    `max_bytes` alone is a slice of its own."""
    import numpy as np
    import pyarrow.compute as pc

    images = pc.fill_null(pc.binary_length(table.column("image")), 0).to_numpy().astype(np.int64)
    other = (table.nbytes - int(images.sum())) / max(table.num_rows, 1)
    ends = np.cumsum(images + int(other) + 1)  # bytes up to and including each row
    slices = []
    offset = 0
    while offset < table.num_rows:
        before = int(ends[offset - 1]) if offset else 0
        stop = int(np.searchsorted(ends, before + max_bytes, side="right"))
        stop = min(max(stop, offset + 1), offset + max_rows, table.num_rows)
        slices.append((offset, stop - offset))
        offset = stop
    return slices


class ParquetImageSink(Datasink):
    """Ray Data sink writing the layout above; each write task commits its own shards, so a crash
    loses only the shards in flight. Returns the shard names each task committed."""

    def __init__(
        self, config: SinkConfig, config_hash: str, attempt: int, run_id: str, fragment_keys: list[str] | None = None
    ):
        self.config = config
        self.config_hash = config_hash
        self.attempt = attempt
        self.run_id = run_id
        self.fragment_keys = fragment_keys or []  # `_fragment` index -> the fragment's key

    def get_name(self) -> str:
        return "RestyleParquet"

    def write(self, blocks: Iterable[Block], ctx) -> list[dict]:
        """Commit the task's rows shard by shard as its blocks arrive: a shard is written once the rows
        after it start the next one (`shard_slices`), so a task holds at most one shard's rows beyond
        the block in hand, however many rows it writes."""
        filesystem, root = filesystem_for(self.config.uri, self.config.storage.storage_options())
        written: list[dict] = []
        pending: pa.Table | None = None  # rows not yet in a shard
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            if not table.num_rows:
                continue
            if FRAGMENT in table.column_names:
                table = name_fragments(table, self.fragment_keys)
            # Before the shards: a committed row's image and DICOM files always exist.
            if self.config.writes_images:
                table = self._write_files(table, "image", "images", self.config.encoding.extension(), filesystem, root)
            if DICOM_FILE in table.column_names:
                table = self._write_files(table, DICOM_FILE, "dicom", ".dcm", filesystem, root)
                table = table.drop_columns([DICOM_FILE])
            pending = table if pending is None else pa.concat_tables([pending, table], promote_options="permissive")
            slices = shard_slices(pending, self.config.rows_per_shard, self.config.bytes_per_shard)
            for offset, length in slices[:-1]:
                written.append(self._commit(pending.slice(offset, length), filesystem, root, ctx, len(written)))
            pending = pending.slice(*slices[-1])
        if pending is not None:
            written.append(self._commit(pending, filesystem, root, ctx, len(written)))
        return written

    def _commit(self, rows: pa.Table, filesystem, root: str, ctx, index: int) -> dict:
        """Write one shard of `rows` and its commit record, while this run holds the sink's lease."""
        shard = to_output_table(rows, self.config.encoding.extension())
        name = shard_name(self.attempt, self.run_id, f"{ctx.task_idx:05d}", index)
        commit = shard_commit(name, shard, self.config_hash, self.attempt, self.run_id)
        require_lease(filesystem, root, self.run_id)
        if self.config.webdataset:  # before the shard's record: a committed shard always has its tar
            with open_atomically(filesystem, join(root, webdataset_shard_name(name))) as handle:
                handle.write(webdataset_tar(shard, self.config.encoding.extension()))
        write_shard(filesystem, root, name, shard, commit)
        return {"shard": name, "rows": shard.num_rows}

    def _write_files(self, table: pa.Table, column: str, folder: str, extension: str, filesystem, root: str):
        """Write each row's bytes in `column` as `folder/NAME` (`image_file_name`); a row whose file
        cannot be written becomes an error row (and writes no later file)."""
        failed: dict[int, str] = {}
        for index, (row_id, variant, data, status) in enumerate(
            zip(
                table.column("id").to_pylist(),
                table.column("variant_index").to_pylist(),
                table.column(column).to_pylist(),
                table.column("status").to_pylist(),
                strict=True,
            )
        ):
            if data is None or status == ERROR:
                continue
            name = image_file_name(row_id, variant, extension)
            for attempt in range(1, IMAGE_WRITE_ATTEMPTS + 1):
                try:
                    with open_atomically(filesystem, join(root, folder, name)) as handle:
                        handle.write(data)
                    break
                except Exception as error:  # storage or filesystem: retried, then this row's error
                    what = "image file" if folder == "images" else "DICOM file"
                    reason = f"cannot write {what} {folder}/{name}: {type(error).__name__}: {error}"
                    if attempt == IMAGE_WRITE_ATTEMPTS:
                        logger.warning("row %r: %s", row_id, reason)
                        failed[index] = reason
                    else:
                        time.sleep(IMAGE_RETRY_SECONDS * attempt)
        if not failed:
            return table
        statuses = table.column("status").to_pylist()
        errors = table.column("error").to_pylist()
        images = table.column("image").to_pylist()
        for index, reason in failed.items():
            statuses[index], errors[index], images[index] = ERROR, reason, None
        for name, values in (("status", statuses), ("error", errors), ("image", images)):
            position = table.column_names.index(name)
            table = table.set_column(
                position, table.schema.field(position), pa.array(values, table.schema.field(position).type)
            )
        return table


def webdataset_key(row_id: str, variant_index: int) -> str:
    """An output's WebDataset sample key: its image file name (`image_file_name`) without the suffix,
    with '_' for '.' (WebDataset splits a member's key from its extension at the first '.')."""
    return image_file_name(row_id, variant_index, "").replace(".", "_")


def _json_value(value):
    """JSON for what `json` cannot write itself: bytes as base64 text, anything else as text."""
    return base64.b64encode(value).decode() if isinstance(value, bytes) else str(value)


def webdataset_tar(shard: pa.Table, extension: str) -> bytes:
    """A WebDataset tar of an output shard's ok rows, in shard order: per row KEY.png (or .webp, .jpg)
    with the encoded image and KEY.json with every other field (bytes as base64). Members carry no
    time, owner or mode of this machine, so the same rows give the same bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for row in shard.to_pylist():
            image = row.pop("image")
            if row["status"] != OK or image is None or image.get("bytes") is None:
                continue
            key = webdataset_key(row["id"], row["variant_index"])
            fields = json.dumps(row, default=_json_value, ensure_ascii=False).encode()
            for name, data in ((f"{key}{extension}", image["bytes"]), (f"{key}.json", fields)):
                member = tarfile.TarInfo(name)
                member.size, member.mode = len(data), 0o644
                tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


METADATA_BATCH_ROWS = 256


def write_imagefolder_metadata(config: SinkConfig, shards: list[str]) -> int:
    """Write `images/metadata.jsonl` (`sink.imagefolder`): one line per ok output of the committed
    `shards` (paths inside the sink), its fields and `file_name` (its image file under images/), read
    a few hundred rows at a time. Returns the lines written."""
    import pyarrow.parquet as pq

    filesystem, root = filesystem_for(config.uri, config.storage.storage_options())
    lines = 0
    with open_atomically(filesystem, join(root, IMAGEFOLDER_METADATA)) as handle:
        for shard in sorted(shards):
            with filesystem.open(join(root, shard), "rb") as source:
                for batch in pq.ParquetFile(source).iter_batches(batch_size=METADATA_BATCH_ROWS):
                    images = batch.column("image").field("path").to_pylist()
                    rows = batch.drop_columns(["image"]).to_pylist()
                    for row, path in zip(rows, images, strict=True):
                        if row["status"] != OK or path is None:
                            continue
                        record = {"file_name": path, **row}
                        handle.write(json.dumps(record, default=_json_value, ensure_ascii=False).encode() + b"\n")
                        lines += 1
    return lines
