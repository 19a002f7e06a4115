"""Sources: Parquet datasets with an image column, or folders of image files, local or s3://.

`inspect_source` runs on the driver before anything else: it checks the columns, reads the id
column (or lists the files), and refuses duplicate or missing ids, so every input can be
accounted for exactly once. `read_source` then yields rows in the job's form: `id` (string),
`image` (encoded bytes), `status`, `error`, and every other source column untouched.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute
import pyarrow.dataset
import pyarrow.ipc

from jobs.config import SourceConfig
from jobs.storage import arrow_filesystem, filesystem_for
from operators.base import RESERVED_COLUMNS, UserError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
FORMAT_NAMES = {"parquet": "Parquet", "arrow": "Arrow IPC", "images": "images"}


class SourceError(UserError):
    """A source that cannot be read as configured."""


@dataclass
class SourceInfo:
    """What the driver learned about a source before the job runs."""

    ids: list[str]
    passthrough_columns: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # image folders: paths inside the filesystem
    root: str = ""
    skipped_files: int = 0

    @property
    def row_count(self) -> int:
        """Rows the job will read."""
        return len(self.ids)


def inspect_source(config: SourceConfig) -> SourceInfo:
    """Check the source and collect its ids (see module docstring)."""
    filesystem, root = filesystem_for(config.uri, config.storage.storage_options())
    if config.format == "images":
        return _inspect_folder(config, filesystem, root)
    return _inspect_table(config, filesystem, root)


def _inspect_table(config: SourceConfig, filesystem, root: str) -> SourceInfo:
    try:
        if config.format == "arrow":
            files, _ = _list_files(config, filesystem, root, ARROW_SUFFIXES, allow_single_file=True)
            schema = read_arrow_file(filesystem, files[0]).schema
            id_values = pa.chunked_array(
                [read_arrow_file(filesystem, path).column(config.id_column) for path in files]
                if config.id_column in schema.names
                else [pa.array([])]
            )
        else:
            dataset = pyarrow.dataset.dataset(root, filesystem=arrow_filesystem(filesystem), format="parquet")
            schema = dataset.schema
            files = []
    except (FileNotFoundError, OSError, pa.ArrowInvalid) as error:
        raise SourceError(
            f"cannot read {FORMAT_NAMES[config.format]} at source.uri {config.uri}: {error}{_credentials_hint(error)}"
        ) from None
    for option, column in (("source.id_column", config.id_column), ("source.image_column", config.image_column)):
        if column not in schema.names:
            raise SourceError(f"{option} {column!r} is not a column of {config.uri}; columns: {schema.names}")
    image_type = schema.field(config.image_column).type
    if not _is_image_type(image_type):
        raise SourceError(
            f"source.image_column {config.image_column!r} has type {image_type}; accepted: binary "
            "(encoded image bytes) or a struct with a 'bytes' field (Hugging Face Image)"
        )
    passthrough = [name for name in schema.names if name not in (config.id_column, config.image_column)]
    clashes = [name for name in passthrough if name in RESERVED_COLUMNS]
    if clashes:
        raise SourceError(
            f"source columns {clashes} clash with columns the job writes ({', '.join(RESERVED_COLUMNS)}); rename them"
        )
    if config.format == "parquet":
        id_values = dataset.to_table(columns=[config.id_column]).column(0)
    if id_values.null_count:
        raise SourceError(f"source.id_column {config.id_column!r} has {id_values.null_count} null ids")
    ids = [str(value) for value in id_values.to_pylist()]
    _refuse_duplicates(ids, f"source.id_column {config.id_column!r}")
    ids.sort()
    if config.limit is not None:
        ids = ids[: config.limit]
    return SourceInfo(ids=ids, passthrough_columns=passthrough, files=files, root=root)


def _list_files(
    config: SourceConfig, filesystem, root: str, suffixes: tuple[str, ...], allow_single_file: bool
) -> tuple[list[str], int]:
    """Files under root (or root itself) ending in one of suffixes, sorted, and how many others were skipped."""
    try:
        if allow_single_file and filesystem.isfile(root):
            files = [root]
        elif filesystem.isdir(root):
            files = sorted(filesystem.find(root))
        else:
            raise SourceError(f"source.uri {config.uri} is not a directory")
    except OSError as error:  # PermissionError for bad credentials, among others
        raise SourceError(f"cannot list source.uri {config.uri}: {error}{_credentials_hint(error)}") from None
    matching = [path for path in files if path.lower().endswith(suffixes)]
    skipped = len(files) - len(matching)
    if skipped:
        logger.info("source: %d files without a suffix in (%s) are not read", skipped, ", ".join(suffixes))
    if not matching:
        raise SourceError(f"source.uri {config.uri} holds no files ending in {', '.join(suffixes)}")
    return matching, skipped


def _inspect_folder(config: SourceConfig, filesystem, root: str) -> SourceInfo:
    images, skipped = _list_files(config, filesystem, root, IMAGE_SUFFIXES, allow_single_file=False)
    if config.limit is not None:
        images = images[: config.limit]
    ids = [_relative(path, root) for path in images]
    return SourceInfo(ids=ids, files=images, root=root, skipped_files=skipped)


def read_arrow_file(filesystem, path: str) -> pa.Table:
    """Read an Arrow IPC file in either the random-access file format or the stream format."""
    with filesystem.open(path, "rb") as handle:
        buffer = pa.py_buffer(handle.read())
    try:
        return pa.ipc.open_file(buffer).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(buffer).read_all()


def _arrow_datasource_class():
    """Ray Data's file-based reader for Arrow IPC files (defined lazily so importing needs no Ray)."""
    from ray.data.datasource import FileBasedDatasource

    class ArrowIPCDatasource(FileBasedDatasource):
        """Reads Arrow IPC files, file or stream format, one record batch group per block."""

        def _read_stream(self, f, path: str):
            buffer = f.read_buffer()
            try:
                reader = pa.ipc.open_file(buffer)
                batches = (reader.get_batch(index) for index in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                batches = iter(pa.ipc.open_stream(buffer))
            for batch in batches:
                yield pa.Table.from_batches([batch])

    return ArrowIPCDatasource


def read_source(config: SourceConfig, info: SourceInfo, keep_source_image: bool = False, ids: list[str] | None = None):
    """A Ray Dataset of the source's rows in the job's form: all of them, those of `source.limit`, or
    just `ids` (a resumed job's remaining inputs). With `keep_source_image`, a copy of each image
    travels as `source_image` (for the fidelity stage)."""
    import ray.data

    filesystem, root = filesystem_for(config.uri, config.storage.storage_options())
    arrow_fs = arrow_filesystem(filesystem)
    if ids is None and config.limit is not None:
        ids = info.ids
    if config.format == "images":
        wanted = set(ids) if ids is not None else None
        files = [path for row_id, path in zip(info.ids, info.files, strict=True) if wanted is None or row_id in wanted]
        dataset = ray.data.read_binary_files(
            files, filesystem=arrow_fs, include_paths=True, override_num_blocks=config.read_blocks
        )
        return dataset.map_batches(
            normalize_folder_batch,
            batch_format="pyarrow",
            fn_kwargs={"root": root, "keep_source_image": keep_source_image},
            zero_copy_batch=True,
        )
    if config.format == "arrow":
        dataset = ray.data.read_datasource(
            _arrow_datasource_class()(info.files, filesystem=arrow_fs), override_num_blocks=config.read_blocks
        )
    else:
        dataset = ray.data.read_parquet(root, filesystem=arrow_fs, override_num_blocks=config.read_blocks)
    keep = set(ids) if ids is not None else None
    return dataset.map_batches(
        normalize_parquet_batch,
        batch_format="pyarrow",
        fn_kwargs={
            "id_column": config.id_column,
            "image_column": config.image_column,
            "keep_ids": keep,
            "keep_source_image": keep_source_image,
        },
        zero_copy_batch=True,
    )


def normalize_parquet_batch(
    batch: pa.Table,
    id_column: str,
    image_column: str,
    keep_ids: set[str] | None = None,
    keep_source_image: bool = False,
) -> pa.Table:
    """Turn a Parquet batch into the job's row form (ids as strings, image as bytes)."""
    ids = pa.array([str(value) for value in batch.column(id_column).to_pylist()], pa.string())
    if keep_ids is not None:
        batch = batch.filter(pa.array([value in keep_ids for value in ids.to_pylist()], pa.bool_()))
        ids = pa.array([str(value) for value in batch.column(id_column).to_pylist()], pa.string())
    images = batch.column(image_column)
    errors: list[str | None] = [None] * batch.num_rows
    if pa.types.is_struct(images.type):
        images = pyarrow.compute.struct_field(images, "bytes")
        for index, value in enumerate(images.to_pylist()):
            if value is None:
                errors[index] = f"{image_column} has no bytes in this row (path-only references are not read)"
    else:
        for index, value in enumerate(images.to_pylist()):
            if value is None:
                errors[index] = f"{image_column} is null in this row"
    images = images.cast(pa.binary())
    passthrough = batch.drop_columns(list({id_column, image_column}))
    columns = {
        "id": ids,
        "image": images,
        "status": pa.array(["ok" if error is None else "error" for error in errors], pa.string()),
        "error": pa.array(errors, pa.string()),
    }
    if keep_source_image:
        columns["source_image"] = images
    table = pa.table(columns)
    for name in passthrough.column_names:
        table = table.append_column(name, passthrough.column(name))
    return table


def normalize_folder_batch(batch: pa.Table, root: str, keep_source_image: bool = False) -> pa.Table:
    """Turn `read_binary_files` rows (bytes, path) into the job's row form."""
    ids = [_relative(path, root) for path in batch.column("path").to_pylist()]
    images = batch.column("bytes").cast(pa.binary())
    columns = {
        "id": pa.array(ids, pa.string()),
        "image": images,
        "status": pa.array(["ok"] * batch.num_rows, pa.string()),
        "error": pa.array([None] * batch.num_rows, pa.string()),
    }
    if keep_source_image:
        columns["source_image"] = images
    return pa.table(columns)


def _credentials_hint(error: Exception) -> str:
    return " (check source.storage credentials)" if isinstance(error, PermissionError) else ""


def _is_image_type(data_type: pa.DataType) -> bool:
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return True
    return pa.types.is_struct(data_type) and data_type.get_field_index("bytes") >= 0


def _relative(path: str, root: str) -> str:
    path = path.split("://", 1)[-1]
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else path


def _refuse_duplicates(ids: list[str], what: str) -> None:
    counts = Counter(ids)
    repeated = [value for value, count in counts.items() if count > 1]
    if repeated:
        raise SourceError(f"{what} has {len(repeated)} repeated ids, e.g. {sorted(repeated)[:5]}; ids must be unique")
