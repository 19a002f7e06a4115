"""Sources: Parquet or Arrow datasets with an image column, or folders of image files, local or s3://.

`inspect_source` runs on the driver before anything else: it checks the columns and plans the
source as fragments (`jobs.fragments`: Parquet row groups from the footers, Arrow files, runs of
image files), holding nothing per row. `check_ids` refuses null or repeated ids with tasks that
hash them into buckets. `read_source` then yields rows in the job's form: `id` (string), `image`
(encoded bytes), `status`, `error`, every other source column cast to the type it is written as
(`jobs.schema`), and the `_fragment`/`_row` tags.

An image folder's inputs are all its regular files, whatever their names: the read task keeps the
bytes of those Pillow can open (multi-frame formats are decoded by their first frame later) and
turns the others into error rows naming them. Hidden files and folders (a name starting with '.'),
and with `source.include` the files matching none of its patterns, are not read but counted as
skipped. A symlink whose target lies outside the folder is never read: it becomes an error row, as
do dangling or looping links; links within the folder are read like the files they point to.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import io
import logging
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute
import pyarrow.dataset
import pyarrow.ipc
import pyarrow.parquet

from jobs.config import FOLDER_FORMATS, SourceConfig
from jobs.fragments import FOLDER_FRAGMENT_FILES, FRAGMENT, ROW, Entry, Fragment
from jobs.schema import SchemaError, conform, output_type
from operators.base import UserError
from operators.rows import ERROR, OK, RESERVED_COLUMNS, RowError, to_pixels
from operators.storage import arrow_filesystem, filesystem_for, is_inside, is_local

logger = logging.getLogger(__name__)

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
FORMAT_NAMES = {
    "parquet": "Parquet",
    "arrow": "Arrow IPC",
    "images": "images",
    "imagefolder": "imagefolder",
    "webdataset": "WebDataset",
    "dicom": "DICOM",
    "nifti": "NIfTI",
}
# Image folders: a text file beside an image, with the image's name and one of these suffixes, is its
# caption (the row's `caption` column), not an input; `.txt` is taken when both exist.
CAPTION_SUFFIXES = (".txt", ".caption")
CAPTION_COLUMN = "caption"
# Hugging Face imagefolder: the files mapping images (`file_name`) to their other columns.
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
METADATA_KEY = "file_name"
SKIPPED_NAMED = 50  # skipped files named in the summary and report; all are counted


class SourceError(UserError):
    """A source that cannot be read as configured."""


@dataclass
class SourceInfo:
    """What the driver learned about a source before the job runs: per fragment, never per row."""

    fragments: list[Fragment]  # the units the job reads and accounts for (`jobs.fragments`), in order
    passthrough_columns: list[str] = field(default_factory=list)
    root: str = ""
    # Image folders: how many files are left out as hidden or not matching `source.include`, and the
    # first `SKIPPED_NAMED` of them (relative to the folder).
    skipped_files: int = 0
    skipped: list[str] = field(default_factory=list)
    # Tables: the type each passthrough column is written as (`jobs.schema.output_type`).
    column_types: dict[str, pa.DataType] = field(default_factory=dict)

    @property
    def row_count(self) -> int:
        """Rows the job will read."""
        return sum(fragment.rows for fragment in self.fragments)


def inspect_source(config: SourceConfig) -> SourceInfo:
    """Check the source and plan its fragments (see module docstring); ids are checked apart
    (`check_ids`), by tasks."""
    filesystem, root = filesystem_for(config.uri, config.storage.storage_options())
    if config.format in FOLDER_FORMATS:
        return _inspect_folder(config, filesystem, root)
    if config.format == "webdataset":
        return _inspect_webdataset(config, filesystem, root)
    return _inspect_table(config, filesystem, root)


def _inspect_table(config: SourceConfig, filesystem, root: str) -> SourceInfo:
    try:
        if config.format == "arrow":
            files, _ = _list_files(config, filesystem, root, ARROW_SUFFIXES, allow_single_file=True)
            schemas, fragments = [], []
            for path in files:  # one file in memory at a time
                table = read_arrow_file(filesystem, path)
                schemas.append(table.schema)
                fragments.append(Fragment(_file_name(path, root), table.num_rows, path))
                del table
            schema = _unified_schema(config, schemas)
        else:
            arrow_fs = arrow_filesystem(filesystem)
            dataset = pyarrow.dataset.dataset(root, filesystem=arrow_fs, format="parquet")
            files = sorted(dataset.get_fragments(), key=lambda item: item.path)
            # Every file's schema, not only the first's: a column null in one file may be text in another.
            schema = _unified_schema(config, [file.physical_schema for file in files])
            fragments = _row_group_fragments(files, root)
    except FileNotFoundError:
        raise SourceError(
            f"cannot read {FORMAT_NAMES[config.format]} at source.uri {config.uri}: it does not exist "
            f"(resolved: {root})"
        ) from None
    except (OSError, pa.ArrowInvalid) as error:
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
    try:
        column_types = {name: output_type(schema.field(name).type, name) for name in passthrough}
    except SchemaError as error:
        raise SourceError(f"source {config.uri}: {error}") from None
    if config.dicom_settings is not None:
        added = _volume_columns(config)
        clashes = sorted(set(added) & set(passthrough))
        if clashes:
            raise SourceError(
                f"source columns {clashes} clash with the DICOM columns source.dicom adds; rename them or leave "
                "them out of source.dicom.attributes"
            )
        passthrough += list(added)
        column_types.update(added)
    return SourceInfo(
        fragments=limited(fragments, config.limit),
        passthrough_columns=passthrough,
        root=root,
        column_types=column_types,
    )


def limited(fragments: list[Fragment], limit: int | None) -> list[Fragment]:
    """The fragments that hold the first `limit` rows, in source order, the last one cut short."""
    if limit is None:
        return fragments
    kept, left = [], limit
    for fragment in fragments:
        if left <= 0:
            break
        kept.append(dataclasses.replace(fragment, rows=min(fragment.rows, left)))
        left -= kept[-1].rows
    return kept


def _row_group_fragments(files: list, root: str) -> list[Fragment]:
    """One fragment per row group of every file (pyarrow's file fragments, in path order), from the
    footers their schemas were read from (no data read)."""
    fragments = []
    for file_fragment in files:
        metadata = file_fragment.metadata
        relative = _file_name(file_fragment.path, root)
        for index in range(metadata.num_row_groups):
            rows = metadata.row_group(index).num_rows
            fragments.append(Fragment(f"{relative}#{index}", rows, file_fragment.path, index))
    return fragments


def _unified_schema(config: SourceConfig, schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for all files (null widens to any type, integers and floats to the wider one)."""
    if not schemas:
        raise SourceError(f"source.uri {config.uri} holds no {FORMAT_NAMES[config.format]} files")
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise SourceError(f"the files of source.uri {config.uri} disagree on a column's type: {error}") from None


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


# WebDataset. The tar shards are read with the standard library's `tarfile` rather than Ray Data's
# `read_webdataset` or the `webdataset` package: the job reads fragments through its own datasource
# (resume skips committed samples by their position, accounting needs each shard's sample count
# before anything is decoded), and both come straight from the tar's member headers.
WEBDATASET_SUFFIXES = (".tar",)
# Members read as text columns (UTF-8); any other non-image member is a binary column.
WEBDATASET_TEXT = frozenset({"txt", "text", "caption", "json", "cls", "cls2", "index", "inx", "id", "tags", "prompt"})


def webdataset_split(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member as WebDataset splits its name: the key is the path up to the
    first '.' of the base name, the extension the rest, lower-cased; None for a name without one or a
    hidden one."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem or not extension:
        return None
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def webdataset_column(extension: str) -> str:
    """The column a sample's member becomes: its extension, '.' as '_' (`seg.png` -> `seg_png`)."""
    return extension.replace(".", "_")


@functools.cache
def _image_extensions() -> frozenset[str]:
    """Extensions of every format Pillow reads (without the dot)."""
    from PIL import Image

    return frozenset(extension.lstrip(".") for extension in Image.registered_extensions())


def _webdataset_members(handle, stream: bool):
    """(key, extension, member, tar) of each file member of a tar, in order; `stream` reads it front to
    back (data included), otherwise headers only, seeking past the data."""
    import tarfile

    try:
        with tarfile.open(fileobj=handle, mode="r|" if stream else "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split = webdataset_split(member.name)
                if split is None or _is_hidden(member.name):
                    continue
                yield split[0], split[1], member, tar
                if not stream:
                    tar.members = []  # headers are not kept: a shard may hold millions of members
    except tarfile.TarError as error:
        raise OSError(f"not a readable tar file ({error})") from None


def _webdataset_keys(handle) -> tuple[list[str], list[list[str]]]:
    """The sample keys of a tar, in order, and each sample's extensions (from the headers alone). A
    sample is a run of consecutive members sharing a key, as WebDataset groups them."""
    keys: list[str] = []
    extensions: list[list[str]] = []
    for key, extension, _, _ in _webdataset_members(handle, stream=False):
        if not keys or keys[-1] != key:
            keys.append(key)
            extensions.append([])
        extensions[-1].append(extension)
    return keys, extensions


def _inspect_webdataset(config: SourceConfig, filesystem, root: str) -> SourceInfo:
    """One fragment per tar shard, its samples counted from the member headers (nothing decoded). The
    image member is `source.image_column` when it names an extension, else the first extension of a
    format Pillow reads in the first sample; every other extension is a column (text or binary)."""
    try:
        files, _ = _list_files(config, filesystem, root, WEBDATASET_SUFFIXES, allow_single_file=True)
    except FileNotFoundError:
        raise SourceError(f"cannot read WebDataset at source.uri {config.uri}: it does not exist") from None
    fragments: list[Fragment] = []
    seen: dict[str, None] = {}  # extensions in order of first appearance
    first_sample: list[str] = []
    for path in files:
        try:
            with filesystem.open(path, "rb") as handle:
                keys, extensions = _webdataset_keys(handle)
        except OSError as error:
            raise SourceError(
                f"cannot read WebDataset shard {_file_name(path, root)} of source.uri {config.uri}: {error}"
                f"{_credentials_hint(error)}"
            ) from None
        if keys and not first_sample:
            first_sample = extensions[0]
        for sample in extensions:
            seen.update(dict.fromkeys(sample))
        fragments.append(Fragment(_file_name(path, root), len(keys), path))
    image = _webdataset_image_extension(config, first_sample, list(seen))
    columns = {webdataset_column(extension): extension for extension in seen if extension != image}
    clashes = sorted(name for name in columns if name in RESERVED_COLUMNS)
    if clashes:
        raise SourceError(
            f"WebDataset members {clashes} of source.uri {config.uri} clash with columns the job writes "
            f"({', '.join(RESERVED_COLUMNS)}); rename them"
        )
    column_types = {
        name: pa.string() if extension.rsplit(".", 1)[-1] in WEBDATASET_TEXT else pa.binary()
        for name, extension in columns.items()
    }
    return SourceInfo(
        fragments=limited(fragments, config.limit),
        passthrough_columns=list(column_types),
        root=root,
        column_types=column_types,
    )


def _webdataset_image_extension(config: SourceConfig, first_sample: list[str], extensions: list[str]) -> str | None:
    if config.image_column != "image":
        if config.image_column.lower() not in extensions:
            raise SourceError(
                f"source.image_column {config.image_column!r} is no member extension of the WebDataset at "
                f"source.uri {config.uri}; extensions: {extensions}"
            )
        return config.image_column.lower()
    images = [extension for extension in first_sample if extension.rsplit(".", 1)[-1] in _image_extensions()]
    if extensions and not images:
        raise SourceError(
            f"the first sample of the WebDataset at source.uri {config.uri} has no image member (extensions "
            f"{first_sample}); name the image's extension as source.image_column"
        )
    return images[0] if images else None


def _read_webdataset_fragment(
    config: SourceConfig,
    filesystem,
    index: int,
    fragment: Fragment,
    column_types: dict[str, pa.DataType],
    keep_source_image: bool,
    skip_rows,
    first: int | None,
) -> pa.Table:
    """One tar shard's samples as rows, streamed front to back: the key as id, the image member's bytes
    (a sample without one, or whose image Pillow cannot open, is an error row naming it), every other
    member in its column."""

    wanted = min(fragment.rows, first or fragment.rows)
    image_extension = None if config.image_column == "image" else config.image_column.lower()
    samples: list[tuple[str, dict[str, bytes]]] = []
    with filesystem.open(fragment.path, "rb") as handle:
        for key, extension, member, tar in _webdataset_members(handle, stream=True):
            if not samples or samples[-1][0] != key:
                if len(samples) == wanted:
                    break
                samples.append((key, {}))
            if (skip_rows and len(samples) - 1 in skip_rows) or extension in samples[-1][1]:
                continue
            samples[-1][1][extension] = tar.extractfile(member).read()
    positions = [position for position in range(len(samples)) if not (skip_rows and position in skip_rows)]
    ids, images, errors = [], [], []
    values: dict[str, list] = {name: [] for name in column_types}
    for position in positions:
        key, members = samples[position]
        extension = image_extension or next(
            (
                found
                for found in members
                if webdataset_column(found) not in column_types and found.rsplit(".", 1)[-1] in _image_extensions()
            ),
            None,
        )
        data = members.get(extension) if extension else None
        problem = f"sample has no {extension or 'image'} member" if data is None else _not_an_image(data)
        ids.append(key)
        images.append(None if problem else data)
        errors.append(f"{problem}: {fragment.key} {key}" if problem else None)
        by_column = {webdataset_column(found): value for found, value in members.items()}
        for name, kind in column_types.items():
            value = by_column.get(name)
            if value is not None and pa.types.is_string(kind):
                value = value.decode("utf-8", errors="replace")
            values[name].append(value)
    added = {name: pa.array(column, column_types[name]) for name, column in values.items()}
    return _rows_table(ids, pa.array(images, pa.binary()), errors, positions, index, keep_source_image, added)


# Folder formats whose rows are image files, with captions beside them (and imagefolder's metadata).
IMAGE_FOLDER_FORMATS = ("images", "imagefolder")


def _stem(relative: str) -> str:
    """A path without its last suffix: `a/photo.png` -> `a/photo`."""
    folder, _, base = relative.rpartition("/")
    name = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    return f"{folder}/{name}" if folder else name


def _group_key(relative: str) -> str:
    """A path up to the first '.' of its base name: every file sharing it is listed together (the
    listing is sorted), so a caption and its image meet within one group."""
    folder, _, base = relative.rpartition("/")
    return f"{folder}/{base.partition('.')[0]}"


class _Captions:
    """What an image folder's rows carry besides the image: a caption file beside it (`NAME.txt`, else
    `NAME.caption`, next to `NAME.png`: the `caption` column, read with the image; the caption file is
    then no input) and, for an imagefolder, the row of `metadata.jsonl`/`metadata.csv` whose `file_name`
    (relative to that metadata file's folder) names the image: its other fields are columns. The metadata
    files are read here, on the driver, as `datasets` reads them; each image's values travel in its entry."""

    def __init__(self, config: SourceConfig, filesystem, root: str):
        self.config, self.filesystem, self.root = config, filesystem, root
        self.captions = 0
        self.metadata: dict[str, str] = {}  # image path relative to the folder -> its values as JSON text
        self.metadata_types: dict[str, pa.DataType] = {}
        if config.format == "imagefolder":
            self._read_metadata()

    def column_types(self) -> dict[str, pa.DataType]:
        """The columns the captions and metadata add, with their output types."""
        return {**({CAPTION_COLUMN: pa.string()} if self.captions else {}), **self.metadata_types}

    def attach(self, entries):
        """The listing's (relative, path, problem) entries as (relative, path, problem, extras), extras
        being (caption file or None, metadata JSON or None), or None when there is neither; caption and
        metadata files are left out."""
        group: list = []
        key = None
        for entry in entries:
            relative = entry[0]
            if not relative or relative.endswith("/"):
                yield (*entry, None)
                continue
            if self.config.format == "imagefolder" and relative.rsplit("/", 1)[-1] in METADATA_FILES:
                continue
            if group and _group_key(relative) != key:
                yield from self._resolve(group)
                group = []
            key = _group_key(relative)
            group.append(entry)
        if group:
            yield from self._resolve(group)

    def _resolve(self, group: list):
        def is_caption(entry) -> bool:
            return entry[2] is None and entry[0].lower().endswith(CAPTION_SUFFIXES)

        inputs = {_stem(entry[0]) for entry in group if not is_caption(entry)}
        captions: dict[str, str] = {}
        for entry in group:
            stem = _stem(entry[0])
            if is_caption(entry) and stem in inputs and (stem not in captions or entry[0].lower().endswith(".txt")):
                captions[stem] = entry[1]
        for relative, path, problem in group:
            stem = _stem(relative)
            if is_caption((relative, path, problem)) and stem in captions:
                continue
            caption, metadata = captions.get(stem), self.metadata.get(relative)
            self.captions += caption is not None
            yield relative, path, problem, (caption, metadata) if caption or metadata else None

    def _read_metadata(self) -> None:
        import json
        import posixpath

        import pyarrow.csv
        import pyarrow.json

        if is_local(self.filesystem):
            paths = [path for relative, path, problem in _walk_local_folder(self.root) if problem is None]
        else:
            paths = sorted(self.filesystem.find(self.root))
        tables = []
        for path in paths:
            relative = _relative(path, self.root)
            if relative.rsplit("/", 1)[-1] not in METADATA_FILES or _is_hidden(relative):
                continue
            try:
                data = io.BytesIO(self.filesystem.cat_file(path))
                table = pyarrow.json.read_json(data) if relative.endswith(".jsonl") else pyarrow.csv.read_csv(data)
            except (OSError, pa.ArrowInvalid) as error:
                raise SourceError(
                    f"cannot read imagefolder metadata {relative} of source.uri {self.config.uri}: {error}"
                ) from None
            if METADATA_KEY not in table.column_names:
                raise SourceError(
                    f"imagefolder metadata {relative} of source.uri {self.config.uri} has no {METADATA_KEY!r} column; "
                    f"columns: {table.column_names}"
                )
            tables.append((relative.rpartition("/")[0], relative, table.drop_columns([METADATA_KEY]), table))
        if not tables:
            return
        try:
            schema = pa.unify_schemas([table.schema for _, _, table, _ in tables], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise SourceError(
                f"the imagefolder metadata files of source.uri {self.config.uri} disagree: {error}"
            ) from None
        clashes = [name for name in schema.names if name in RESERVED_COLUMNS]
        if clashes:
            raise SourceError(
                f"imagefolder metadata columns {clashes} clash with columns the job writes "
                f"({', '.join(RESERVED_COLUMNS)}); rename them"
            )
        try:
            self.metadata_types = {name: output_type(schema.field(name).type, name) for name in schema.names}
        except SchemaError as error:
            raise SourceError(f"imagefolder metadata of source.uri {self.config.uri}: {error}") from None
        for folder, relative, values, table in tables:
            for name, row in zip(table.column(METADATA_KEY).to_pylist(), values.to_pylist(), strict=True):
                if name is None:
                    raise SourceError(f"imagefolder metadata {relative}: a row has no {METADATA_KEY}")
                image = posixpath.normpath(posixpath.join(folder, str(name)))
                self.metadata[image] = json.dumps(row, default=str)


def _extra_columns(extras: list, filesystem, column_types: dict[str, pa.DataType]) -> tuple[dict, list]:
    """The caption and metadata columns of a run of image rows (their entries' extras), and per row the
    problem reading its caption file raised (or None)."""
    import json

    values: dict[str, list] = {name: [] for name in column_types}
    problems: list[str | None] = []
    for extra in extras:
        caption, metadata = extra or (None, None)
        fields = json.loads(metadata) if metadata else {}
        problem = None
        if caption is not None and fields.get(CAPTION_COLUMN) is None:
            try:
                fields[CAPTION_COLUMN] = filesystem.cat_file(caption).decode("utf-8", errors="replace").strip()
            except OSError as error:
                problem = f"cannot read the caption file {caption.rsplit('/', 1)[-1]} ({type(error).__name__})"
        problems.append(problem)
        for name in column_types:
            values[name].append(fields.get(name))
    columns = {}
    for name, kind in column_types.items():
        try:
            columns[name] = pa.array(values[name], kind)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):  # a value JSON gave as text (a date)
            columns[name] = pa.array([None if value is None else str(value) for value in values[name]]).cast(kind)
    return columns, problems


def _inspect_folder(config: SourceConfig, filesystem, root: str) -> SourceInfo:
    """Plan an image folder by streaming its listing into fragments: each file's entry is held once,
    in its fragment, and the skipped ones only counted (the first `SKIPPED_NAMED` named)."""
    fragments: list[Fragment] = []
    chunk: list[tuple[str, str, str | None]] = []
    skipped: list[str] = []
    skipped_files = inputs = 0
    try:
        if not filesystem.isdir(root):
            raise SourceError(f"source.uri {config.uri} is not a directory")
        if is_local(filesystem):
            entries = _walk_local_folder(root)
        else:  # an object store lists a prefix in one paginated call: its list is sorted in place
            paths = filesystem.find(root)
            paths.sort()
            entries = ((_relative(path, root), path, None) for path in paths)
        captions = _Captions(config, filesystem, root)
        if config.format in IMAGE_FOLDER_FORMATS:
            entries = captions.attach(entries)

        def inputs_listed():
            """The listing's inputs; the hidden and excluded files only counted, and nothing after the
            limit is reached (the listing is still walked to count what is skipped)."""
            nonlocal skipped_files
            for relative, path, problem, *extras in entries:
                if not relative or relative.endswith("/"):
                    continue  # an object store's folder marker
                if (
                    _is_hidden(relative)
                    or (config.include is not None and not _included(relative, config.include))
                    or (config.format == "dicom" and relative.rsplit("/", 1)[-1].upper() == "DICOMDIR")
                ):
                    skipped_files += 1
                    if len(skipped) < SKIPPED_NAMED:
                        skipped.append(relative)
                    continue
                if config.limit is None or inputs < config.limit:
                    yield relative, path, problem, *extras

        planned = (
            (
                [Entry(relative, path, problem, extras=extras[0] if extras else None)]
                for relative, path, problem, *extras in inputs_listed()
            )
            if config.format in IMAGE_FOLDER_FORMATS
            else _VolumePlanner(config, filesystem).plan(inputs_listed())
        )
        for rows in planned:
            for row in rows:
                if config.limit is not None and inputs >= config.limit:
                    break
                inputs += 1
                chunk.append(row)
                if len(chunk) == FOLDER_FRAGMENT_FILES:
                    fragments.append(_folder_fragment(chunk))
                    chunk = []
    except OSError as error:  # PermissionError for bad credentials, among others
        raise SourceError(f"cannot list source.uri {config.uri}: {error}{_credentials_hint(error)}") from None
    if chunk:
        fragments.append(_folder_fragment(chunk))
    if skipped_files:
        logger.info(
            "source: %d files are not read (hidden, matching no source.include pattern, or a DICOMDIR index)",
            skipped_files,
        )
    if not fragments:
        if config.include is not None:
            raise SourceError(
                f"no file under source.uri {config.uri} matches source.include {config.include} "
                f"({skipped_files} files skipped)"
            )
        raise SourceError(f"source.uri {config.uri} holds no files to read ({skipped_files} hidden files skipped)")
    added = {**_volume_columns(config), **captions.column_types()}
    return SourceInfo(
        fragments=fragments,
        root=root,
        skipped_files=skipped_files,
        skipped=skipped,
        passthrough_columns=list(added),
        column_types=added,
    )


def _folder_fragment(chunk: list[Entry]) -> Fragment:
    """A run of a folder's rows. Its key names the first row by its place in the folder (a volume's
    row by file and frame or slice), so keys do not change when ids do."""
    first = chunk[0]
    name = first.id if first.relative is None else f"{first.relative}#{first.frame}"
    return Fragment(f"{name}+{len(chunk)}", len(chunk), entries=tuple(chunk))


def _volume_columns(config: SourceConfig) -> dict[str, pa.DataType]:
    """The columns a DICOM or NIfTI source adds to each row, with their output types: the record of
    what was read and applied, and (DICOM) each kept attribute."""
    dicom, nifti = config.dicom_settings, config.nifti_settings
    if dicom is not None:
        from operators import dicom as dicom_module

        return {
            **{name: output_type(kind, name) for name, kind in dicom.column_types().items()},
            dicom_module.RECORD_COLUMN: output_type(dicom_module.RECORD_TYPE, dicom_module.RECORD_COLUMN),
        }
    if nifti is not None:
        from operators import nifti as nifti_module

        return {nifti_module.RECORD_COLUMN: output_type(nifti_module.RECORD_TYPE, nifti_module.RECORD_COLUMN)}
    return {}


# Bytes read from the start of a NIfTI file to plan it: its header (348 or 540 bytes, gzip-compressed
# in a .nii.gz) and room for the compression's framing.
NIFTI_HEAD_BYTES = 64 * 1024
PLANNING_THREADS = 8
PLANNING_LOOKAHEAD = 64


class _VolumePlanner:
    """Plans the rows of a DICOM or NIfTI folder's files from their headers only: a DICOM file is one
    row per frame, with its SOP Instance UID as id (`source.dicom.id`), a NIfTI volume one row per
    slice. A row is an entry (id, path, problem, frame or slice, path relative to the folder); a file
    that is no input is one row whose problem says why. Headers are read ahead on a few threads (an
    object store answers each with a round trip)."""

    def __init__(self, config: SourceConfig, filesystem):
        self.config, self.filesystem = config, filesystem

    def plan(self, files):
        """Each (relative, path, problem) file's rows, in order, reading up to `PLANNING_LOOKAHEAD`
        headers ahead."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(PLANNING_THREADS) as pool:
            pending: deque = deque()
            for listed in files:
                pending.append(pool.submit(self.rows, *listed))
                if len(pending) >= PLANNING_LOOKAHEAD:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def rows(self, relative: str, path: str, problem: str | None, *extras) -> list[Entry]:
        if problem is not None:
            return [Entry(relative, path, problem, relative=relative)]
        if self.config.format == "nifti":
            return self._nifti_rows(relative, path)
        return self._dicom_rows(relative, path)

    def _dicom_rows(self, relative: str, path: str) -> list[Entry]:
        from operators.dicom import header_facts

        try:
            with self.filesystem.open(path, "rb") as handle:
                facts = header_facts(handle)
        except OSError as error:
            return [Entry(relative, path, f"cannot read the file ({type(error).__name__})", relative=relative)]
        if facts.problem is not None:
            return [Entry(relative, path, facts.problem, relative=relative)]
        by_path = self.config.dicom_settings.id == "path" or not facts.sop_instance_uid
        base = relative if by_path else facts.sop_instance_uid
        if facts.frames == 1:
            return [Entry(base, path, relative=relative)]
        return [Entry(f"{base}#{frame}", path, None, frame, relative) for frame in range(1, facts.frames + 1)]

    def _nifti_rows(self, relative: str, path: str) -> list[Entry]:
        from operators.nifti import slice_count

        try:
            with self.filesystem.open(path, "rb") as handle:
                head = handle.read(NIFTI_HEAD_BYTES)
        except OSError as error:
            return [Entry(relative, path, f"cannot read the file ({type(error).__name__})", relative=relative)]
        try:
            count = slice_count(head, self.config.nifti_settings)
        except RowError as problem:
            return [Entry(relative, path, str(problem), relative=relative)]
        return [Entry(f"{relative}#{index}", path, None, index, relative) for index in range(count)]


def _walk_local_folder(root: str):
    """Yield (path relative to root, path, problem or None) for every entry under a local folder that
    is not a folder, in the order of the relative paths. Links are resolved here, so a link out of the
    folder is never followed."""
    real_root = os.path.realpath(root)

    def walk(directory: str, prefix: str, chain: frozenset[str]):
        with os.scandir(directory) as listing:
            entries = []
            for entry in listing:
                target = os.path.realpath(entry.path) if entry.is_symlink() else None
                into = (
                    os.path.isdir(target) and is_inside(target, real_root)
                    if target is not None
                    else entry.is_dir(follow_symlinks=False)
                )
                # A folder sorts as "name/": then the walk yields relative paths in sorted order.
                entries.append((entry.name + "/" if into else entry.name, entry, target))
        entries.sort(key=lambda item: item[0])
        for _, entry, target in entries:
            relative = prefix + entry.name
            if target is not None:
                if not is_inside(target, real_root):
                    yield relative, entry.path, "symlink leaves the source folder"
                elif not os.path.exists(target):
                    yield relative, entry.path, "symlink target does not exist"
                elif os.path.isdir(target):
                    if target in chain:
                        yield relative, entry.path, "symlink loops back into a folder it is in"
                    else:
                        yield from walk(entry.path, relative + "/", chain | {target})
                elif os.path.isfile(target):
                    yield relative, entry.path, None
                else:
                    yield relative, entry.path, "not a regular file"
            elif entry.is_dir(follow_symlinks=False):
                yield from walk(entry.path, relative + "/", chain | {os.path.realpath(entry.path)})
            elif entry.is_file(follow_symlinks=False):
                yield relative, entry.path, None
            else:  # a FIFO, socket or device would block or never end a read
                yield relative, entry.path, "not a regular file"

    yield from walk(root, "", frozenset({real_root}))


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _included(relative: str, patterns: list[str]) -> bool:
    """Whether a relative path matches a `source.include` pattern (case ignored; `**/` may match nothing)."""
    name = relative.lower()
    for pattern in (pattern.lower() for pattern in patterns):
        if fnmatch.fnmatchcase(name, pattern):
            return True
        if pattern.startswith("**/") and fnmatch.fnmatchcase(name, pattern[3:]):
            return True
    return False


def read_arrow_file(filesystem, path: str) -> pa.Table:
    """Read an Arrow IPC file in either the random-access file format or the stream format."""
    with filesystem.open(path, "rb") as handle:
        buffer = pa.py_buffer(handle.read())
    try:
        return pa.ipc.open_file(buffer).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_stream(buffer).read_all()


# Batches of `align` rows in a block that `read_source` splits from a fragment: enough that the cost
# of a task (a tenth of a second on two busy cores) is small beside its rows' work. Measured with
# bench/duty_cycle.py (256 inputs, batches of 4): blocks of 4 rows kept the accelerator 0.62-0.67 busy
# (one prepare task at a time, each waiting to start longer than it ran), 16 rows 0.88, 32 rows 0.92.
ALIGNED_BLOCK_BATCHES = 8


def read_source(
    config: SourceConfig,
    info: SourceInfo,
    keep_source_image: bool = False,
    fragments: list[int] | None = None,
    skip_rows: dict[int, frozenset[int]] | None = None,
    num_cpus: float | None = None,
    min_blocks: int = 1,
    align: int | None = None,
):
    """A Ray Dataset of the source's rows in the job's form, each tagged with its fragment and its
    position in it (`jobs.fragments`): those of every fragment, or of the fragments whose indices
    `fragments` lists, less the rows `skip_rows` names per fragment (a resumed job's). With
    `keep_source_image`, a copy of each image travels as `source_image` (for the fidelity checks of
    the finish step). `num_cpus` is what each read task reserves (Ray's default of one when None).

    Unless `source.read_blocks` says otherwise, each fragment is one block when there are at least
    `min_blocks` of them: Ray then reads a fragment in the same task as the CPU steps after it (it
    fuses a read with nothing once it splits its blocks), so rows never wait in the object store in
    between. Fewer fragments are split for parallelism, by Ray in the read task: when `align` is
    given, into parts of a multiple of `align` rows (where the fragment's rows allow) of at most
    `ALIGNED_BLOCK_BATCHES` batches, so a model stage's batches and its model calls are full and its
    tasks are not mostly overhead; else as Ray's default does, into 200 blocks cut anywhere (1 024 rows
    into blocks of 5 and 6, and a model call of 4 rows then ran as one of 4 and one of 1 or 2)."""
    import ray.data

    remote = {"num_cpus": num_cpus} if num_cpus is not None else {}  # Ray's default is one CPU
    indices = range(len(info.fragments)) if fragments is None else fragments
    selected = [(index, info.fragments[index], (skip_rows or {}).get(index)) for index in indices]
    if not selected:
        return ray.data.from_arrow(no_rows(keep_source_image))
    blocks = config.read_blocks
    if blocks is None and len(selected) >= min_blocks:
        blocks = len(selected)
    elif blocks is None and align:
        # One read task per fragment, whose block Ray splits into `blocks / len(selected)` parts of
        # equal rows (one more in the first few when they do not divide): at least `min_blocks` in
        # all, of a multiple of `align` rows where the fragment allows, and at most
        # `ALIGNED_BLOCK_BATCHES` batches each.
        largest = max(fragment.rows - len(skip or ()) for _, fragment, skip in selected)
        batches = math.ceil(largest / math.ceil(min_blocks / len(selected)) / align)
        part = align * max(1, min(ALIGNED_BLOCK_BATCHES, batches))
        blocks = len(selected) * max(1, math.ceil(largest / part))
    source = _fragment_source_class()(config, info.column_types, selected, keep_source_image)
    return ray.data.read_datasource(source, override_num_blocks=blocks, **remote)


def _fragment_source_class():
    """Ray Data's datasource over planned fragments (defined lazily so importing needs no Ray)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class FragmentSource(Datasource):
        """Reads fragments, one block per fragment, in the job's row form (see `read_fragment`)."""

        def __init__(self, config, column_types, fragments, keep_source_image):
            super().__init__()
            self.config, self.column_types, self.fragments = config, column_types, fragments
            self.keep_source_image = keep_source_image

        def get_name(self) -> str:
            return FORMAT_NAMES[self.config.format].replace(" ", "")

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
            return [
                ReadTask(
                    functools.partial(self._read, group),
                    BlockMetadata(
                        num_rows=sum(fragment.rows - len(skip or ()) for _, fragment, skip in group),
                        size_bytes=None,
                        input_files=None,
                        exec_stats=None,
                    ),
                    per_task_row_limit=per_task_row_limit,
                )
                for group in _balanced_groups(self.fragments, max(parallelism, 1))
            ]

        def _read(self, group):
            filesystem, root = filesystem_for(self.config.uri, self.config.storage.storage_options())
            for index, fragment, skip in group:
                yield read_fragment(
                    self.config, filesystem, root, index, fragment, self.column_types, self.keep_source_image, skip
                )

    return FragmentSource


def _balanced_groups(fragments: list, count: int) -> list[list]:
    """Split (index, fragment, skip) triples into at most `count` runs of consecutive fragments with
    about the same number of rows each."""
    total = sum(item[1].rows for item in fragments)
    target = max(total / min(count, len(fragments)), 1)
    groups, current, rows = [], [], 0
    for item in fragments:
        current.append(item)
        rows += item[1].rows
        if rows >= target * (len(groups) + 1) and len(groups) < count - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def read_fragment(
    config: SourceConfig,
    filesystem,
    root: str,
    index: int,
    fragment: Fragment,
    column_types: dict[str, pa.DataType],
    keep_source_image: bool = False,
    skip_rows: frozenset[int] | None = None,
    columns: list[str] | None = None,
    first: int | None = None,
) -> pa.Table:
    """One fragment's rows in the job's form, with `_fragment` (= `index`) and `_row` (the row's
    position in the fragment) as the last columns, less the rows at the positions in `skip_rows`.
    With `columns` (tables only), just those source columns, untouched, plus the two tags; with
    `first`, only the first rows (a Parquet row group is then read page by page, not whole; an image
    folder's later files are not opened)."""
    import numpy as np

    if config.format in IMAGE_FOLDER_FORMATS:
        return _read_folder_fragment(
            filesystem, root, index, fragment, keep_source_image, skip_rows, first, column_types
        )
    if config.format in FOLDER_FORMATS:
        return _read_volume_fragment(config, filesystem, root, index, fragment, keep_source_image, skip_rows, first)
    if config.format == "webdataset":
        return _read_webdataset_fragment(
            config, filesystem, index, fragment, column_types, keep_source_image, skip_rows, first
        )
    if config.format == "arrow":
        raw = read_arrow_file(filesystem, fragment.path)
        raw = raw.select([name for name in columns if name in raw.column_names]) if columns is not None else raw
    else:
        with filesystem.open(fragment.path, "rb") as handle:
            parquet = pyarrow.parquet.ParquetFile(handle, buffer_size=1 << 20 if first else 0, pre_buffer=not first)
            present = None if columns is None else [name for name in columns if name in parquet.schema_arrow.names]
            if first:
                batches = parquet.iter_batches(
                    batch_size=first, row_groups=[fragment.row_group], columns=present, use_threads=False
                )
                batch = next(batches, None)
                empty = parquet.schema_arrow.empty_table()
                raw = (
                    pa.Table.from_batches([batch]) if batch is not None else empty.select(present or empty.column_names)
                )
            else:
                raw = parquet.read_row_group(fragment.row_group, columns=present)
    raw = raw.slice(0, min(fragment.rows, first or fragment.rows))
    raw = raw.append_column(FRAGMENT, pa.array(np.full(raw.num_rows, index, np.int32)))
    raw = raw.append_column(ROW, pa.array(np.arange(raw.num_rows, dtype=np.int64)))
    if skip_rows:
        raw = raw.filter(pa.array(np.isin(np.arange(raw.num_rows), list(skip_rows), invert=True)))
    if columns is not None:
        return raw
    if config.id_column not in raw.column_names:
        raw = raw.append_column(config.id_column, pa.nulls(raw.num_rows, pa.string()))
    table = normalize_parquet_batch(
        raw, config.id_column, config.image_column, keep_source_image, column_types, config.dicom_settings is not None
    )
    if config.dicom_settings is not None:
        table = _decode_dicom_cells(table, config, keep_source_image)
    return _tags_last(table)


def _read_folder_fragment(
    filesystem,
    root: str,
    index: int,
    fragment: Fragment,
    keep_source_image,
    skip_rows,
    first: int | None = None,
    column_types: dict[str, pa.DataType] | None = None,
):
    """A run of an image folder's files as rows, with their caption and metadata columns
    (`column_types`); a file that is no image, cannot be read, or is a link out of the folder (when
    listed, or since) becomes an error row naming it, as does an image whose caption file cannot be read."""
    local_root = os.path.realpath(root) if is_local(filesystem) else None
    ids, images, errors, positions, extras = [], [], [], [], []
    for position, (row_id, path, problem, _, _, extra) in enumerate(fragment.entries[:first]):
        if skip_rows and position in skip_rows:
            continue
        data, problem = _file_bytes(filesystem, path, local_root, problem)
        if problem is None:
            problem = _not_an_image(data)
        if problem is not None:
            data = None
        ids.append(row_id)
        images.append(data)
        errors.append(f"{problem}: {row_id}" if problem else None)
        positions.append(position)
        extras.append(extra)
    added, caption_problems = _extra_columns(extras, filesystem, column_types or {})
    for position, problem in enumerate(caption_problems):
        if problem is not None and errors[position] is None:
            images[position], errors[position] = None, f"{problem}: {ids[position]}"
    return _rows_table(ids, pa.array(images, pa.binary()), errors, positions, index, keep_source_image, added)


def _rows_table(
    ids: list, images: pa.Array, errors: list, positions: list, index: int, keep_source_image: bool, added: dict
) -> pa.Table:
    """A folder fragment's rows in the job's form: id, image (bytes or pixels), status, error, the
    source image when kept, the columns `added`, then the `_fragment`/`_row` tags."""
    columns = {
        "id": pa.array(ids, pa.string()),
        "image": images,
        "status": pa.array([OK if error is None else ERROR for error in errors], pa.string()),
        "error": pa.array(errors, pa.string()),
    }
    if keep_source_image:
        columns["source_image"] = images
    columns.update(added)
    columns[FRAGMENT] = pa.array([index] * len(ids), pa.int32())
    columns[ROW] = pa.array(positions, pa.int64())
    return pa.table(columns)


def _file_bytes(filesystem, path: str, local_root: str | None, problem: str | None) -> tuple[bytes | None, str | None]:
    """A folder file's bytes, or why they are not read: the problem planning found, a link that has
    left the (local) folder since, or a read that failed."""
    if problem is None and local_root is not None and not is_inside(os.path.realpath(path), local_root):
        problem = "symlink leaves the source folder"
    if problem is not None:
        return None, problem
    try:
        return filesystem.cat_file(path), None
    except OSError as error:
        return None, f"cannot read the file ({type(error).__name__})"


def _read_volume_fragment(
    config: SourceConfig, filesystem, root: str, index: int, fragment: Fragment, keep_source_image, skip_rows, first
) -> pa.Table:
    """A run of a DICOM or NIfTI folder's rows: each file read once for the frames or slices of it the
    run holds, decoded to pixels (`operators.dicom`, `operators.nifti`), with the record of what was
    read and applied and (DICOM) the kept attributes; a file or frame that cannot be read becomes an
    error row naming the file (and frame), never an identifying header value."""
    from itertools import groupby

    local_root = os.path.realpath(root) if is_local(filesystem) else None
    wanted = [
        (position, entry)
        for position, entry in enumerate(fragment.entries[:first])
        if not (skip_rows and position in skip_rows)
    ]
    ids, arrays, errors, records, attributes, positions = [], [], [], [], [], []
    for path, group in groupby(wanted, key=lambda item: item[1].path):
        group = list(group)
        problem, relative = group[0][1].problem, group[0][1].relative
        data, problem = _file_bytes(filesystem, path, local_root, problem)
        results = [RowError(problem)] * len(group) if problem is not None else _decode_volume(config, data, group)
        for (position, entry), result in zip(group, results, strict=True):
            ids.append(entry.id)
            positions.append(position)
            if isinstance(result, RowError):
                where = relative if entry.frame is None else f"{relative} {_frame_word(config)} {entry.frame}"
                arrays.append(None), records.append(None), attributes.append({})
                errors.append(f"{result}: {where}")
            else:
                arrays.append(result[0]), records.append(result[1]), attributes.append(result[2])
                errors.append(None)
    added = _volume_record_columns(config, records, attributes)
    return _rows_table(ids, to_pixels(arrays), errors, positions, index, keep_source_image, added)


def _frame_word(config: SourceConfig) -> str:
    return "slice" if config.format == "nifti" else "frame"


def _decode_volume(config: SourceConfig, data: bytes, group: list) -> list:
    """(array, record, attributes) or RowError for each (position, entry) of one file's rows."""
    if config.format == "nifti":
        from operators.nifti import read_slices

        results = read_slices(data, config.nifti_settings, [entry.frame for _, entry in group])
        return [result if isinstance(result, RowError) else (*result, {}) for result in results]
    from operators.dicom import decode_frames

    frames = [entry.frame or 1 for _, entry in group]
    results = decode_frames(data, config.dicom_settings, frames)
    return [
        result if isinstance(result, RowError) else (result.array, result.record, result.attributes)
        for result in results
    ]


def _volume_record_columns(config: SourceConfig, records: list, attributes: list[dict]) -> dict[str, pa.Array]:
    """The record column and (DICOM) one column per kept attribute, in the types `_volume_columns` fixes."""
    types = _volume_columns(config)
    if config.dicom_settings is not None:
        from operators.dicom import RECORD_COLUMN
    else:
        from operators.nifti import RECORD_COLUMN
    columns = {RECORD_COLUMN: pa.array(records, types[RECORD_COLUMN])}
    for name, kind in types.items():
        if name != RECORD_COLUMN:
            columns[name] = pa.array([values.get(name) for values in attributes], kind)
    return columns


def _decode_dicom_cells(table: pa.Table, config: SourceConfig, keep_source_image: bool) -> pa.Table:
    """A table whose image column holds DICOM files: each ok row's file decoded to pixels (one frame:
    a multi-frame file in a cell is an error row, as is a cell that holds no DICOM), with its record
    and kept attributes as columns."""
    from operators.dicom import decode_frames, header_facts, is_dicom

    image_column = config.image_column
    statuses = table.column("status").to_pylist()
    errors = table.column("error").to_pylist()
    arrays, records, attributes = [], [], []
    for position, data in enumerate(table.column("image").to_pylist()):
        result: object = None
        if statuses[position] == OK:
            if not is_dicom(data):
                result = RowError(f"{image_column} holds no DICOM file in this row (no DICM preamble)")
            else:
                facts = header_facts(io.BytesIO(data))
                if facts.problem is not None:
                    result = RowError(facts.problem)
                elif facts.frames > 1:
                    result = RowError(
                        f"{image_column} holds a multi-frame DICOM file ({facts.frames} frames) in this row; read "
                        "multi-frame files as a folder (source.format: dicom), one row per frame"
                    )
                else:
                    result = decode_frames(data, config.dicom_settings, [1])[0]
        if isinstance(result, RowError):
            statuses[position], errors[position] = ERROR, str(result)
        ok = result is not None and not isinstance(result, RowError)
        arrays.append(result.array if ok else None)
        records.append(result.record if ok else None)
        attributes.append(result.attributes if ok else {})
    pixels = to_pixels(arrays)
    columns = {
        "image": pixels,
        "status": pa.array(statuses, pa.string()),
        "error": pa.array(errors, pa.string()),
        **({"source_image": pixels} if keep_source_image else {}),
        **_volume_record_columns(config, records, attributes),
    }
    for name, column in columns.items():
        table = (
            table.set_column(table.column_names.index(name), name, column)
            if name in table.column_names
            else table.append_column(name, column)
        )
    return table


def _tags_last(table: pa.Table) -> pa.Table:
    names = [name for name in table.column_names if name not in (FRAGMENT, ROW)]
    return table.select([*names, FRAGMENT, ROW])


def normalize_parquet_batch(
    batch: pa.Table,
    id_column: str,
    image_column: str,
    keep_source_image: bool = False,
    column_types: dict[str, pa.DataType] | None = None,
    dicom: bool = False,
) -> pa.Table:
    """Turn a Parquet batch into the job's row form (ids as strings, image as bytes, the other
    columns cast to `column_types`, the types they are written as, and added as nulls if missing).
    A cell holding a DICOM file is an error row unless the source reads DICOM (`dicom`)."""
    ids = pa.array(
        [None if value is None else str(value) for value in batch.column(id_column).to_pylist()], pa.string()
    )
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
    if not dicom:
        for index, value in enumerate(images.to_pylist()):
            if errors[index] is None and value[128:132] == b"DICM":
                errors[index] = f"{image_column} holds a DICOM file in this row; add a source.dicom section to read it"
    images = images.cast(pa.binary())
    passthrough = batch.drop_columns(list({id_column, image_column}))
    columns = {
        "id": ids,
        "image": images,
        "status": pa.array([OK if error is None else ERROR for error in errors], pa.string()),
        "error": pa.array(errors, pa.string()),
    }
    if keep_source_image:
        columns["source_image"] = images
    table = pa.table(columns)
    for name in passthrough.column_names:
        table = table.append_column(name, passthrough.column(name))
    return conform(table, column_types) if column_types else table


def no_rows(keep_source_image: bool = False) -> pa.Table:
    """An empty table in the job's row form (a job whose fragments are all done or empty)."""
    columns = {name: pa.array([], pa.string()) for name in ("id", "status", "error")}
    columns["image"] = pa.array([], pa.binary())
    if keep_source_image:
        columns["source_image"] = pa.array([], pa.binary())
    columns[FRAGMENT] = pa.array([], pa.int32())
    columns[ROW] = pa.array([], pa.int64())
    return pa.table(columns)


def _not_an_image(data: bytes | None) -> str | None:
    """Why bytes are no input for an operator, or None when Pillow recognises them (a damaged or
    oversized image of a known format is left for decoding to describe)."""
    from PIL import Image

    if not data:
        return "empty file"
    if data[128:132] == b"DICM":
        return "a DICOM file (read DICOM folders with source.format: dicom)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)):
                pass  # reads the header only
    except Image.UnidentifiedImageError:
        return "not an image Pillow can open"
    except Exception:  # a known format Pillow cannot read here: decoding names the problem per row
        return None
    return None


def _credentials_hint(error: Exception) -> str:
    return " (check source.storage credentials)" if isinstance(error, PermissionError) else ""


def _is_image_type(data_type: pa.DataType) -> bool:
    if pa.types.is_binary(data_type) or pa.types.is_large_binary(data_type):
        return True
    return pa.types.is_struct(data_type) and data_type.get_field_index("bytes") >= 0


def _file_name(path: str, root: str) -> str:
    """A file's name in fragment keys: relative to the source folder, or its base name when the
    source is the file itself (so keys do not change when the source moves)."""
    path = path.split("://", 1)[-1]
    return path.rsplit("/", 1)[-1] if path.rstrip("/") == root.rstrip("/") else _relative(path, root)


def _relative(path: str, root: str) -> str:
    path = path.split("://", 1)[-1]
    root = root.rstrip("/")
    return path[len(root) + 1 :] if path.startswith(root + "/") else path


ID_HASH_BYTES = 8
MAX_ID_BUCKETS = 16
# A source this small has its ids checked on the driver, which then holds at most this many: a few
# milliseconds, where the first Ray tasks of a job wait seconds for worker processes to start.
DRIVER_ID_CHECK_ROWS = 100_000
DRIVER_ID_CHECK_FRAGMENTS = 16  # each read one after another here (one request each on a store)
ROWS_PER_ID_BUCKET = 1_000_000


def check_ids(config: SourceConfig, info: SourceInfo, tasks: int = 1, num_cpus: float | None = None) -> None:
    """Refuse null or repeated ids (a SourceError naming up to five), checked without holding the ids
    on the driver: under Ray, `tasks` tasks each read the id column of a run of fragments and split
    the ids' 64-bit hashes into buckets; one task per bucket sorts its hashes and counts repeats; only
    a repeated hash is looked up again, to name the id (and to tell a repeat from a collision).
    Without Ray (`--dry-run`), or for a source of at most `DRIVER_ID_CHECK_ROWS` rows in at most
    `DRIVER_ID_CHECK_FRAGMENTS` fragments, the same functions run here. An image folder's ids are its
    unique paths."""
    if config.format in ("images", "imagefolder", "nifti") or not info.fragments:
        return  # ids are paths (and slice indices): unique
    groups = _balanced_groups([(index, fragment, None) for index, fragment in enumerate(info.fragments)], tasks)
    buckets = max(1, min(MAX_ID_BUCKETS, info.row_count // ROWS_PER_ID_BUCKET + 1))
    what, hint = f"source.id_column {config.id_column!r}", ""
    if config.format == "dicom":
        what = "the DICOM files' SOP Instance UIDs (source.dicom.id)"
        hint = " (a file copied twice? source.dicom.id: path uses each file's path instead)"
    small = info.row_count <= DRIVER_ID_CHECK_ROWS and len(info.fragments) <= DRIVER_ID_CHECK_FRAGMENTS
    submit, get = _runner(num_cpus, in_process=small)
    parts = [submit(_hash_ids, config, group, buckets, returns=buckets + 1) for group in groups]
    nulls = sum(get([part[0] for part in parts]))
    if nulls:
        raise SourceError(f"{what} has {nulls} null ids")
    counts = get([submit(_repeated_hashes, *[part[1 + bucket] for part in parts]) for bucket in range(buckets)])
    suspects = {value for _, examples in counts for value in examples}
    found = get([submit(_ids_with_hashes, config, group, suspects) for group in groups]) if suspects else []
    repeated = sum(count for count, _ in counts)
    if not repeated:
        return
    seen = Counter(row_id for ids in found for row_id in ids)
    named = sorted(row_id for row_id, count in seen.items() if count > 1)
    # A suspect hash none of whose ids repeats is two ids that share a hash, not a repeat.
    repeated -= len(suspects) - len({_id_hash(row_id) for row_id in named})
    if repeated > 0:
        raise SourceError(f"{what} has {repeated} repeated ids, e.g. {named[:5]}; ids must be unique{hint}")


def _runner(num_cpus: float | None, in_process: bool = False):
    """(submit, get) for `check_ids`: Ray tasks of `num_cpus` when Ray runs (their results stay in
    the object store until fetched, and a task's result passed to another is not fetched here), else
    (or when `in_process`) plain calls in this process."""
    import ray

    if in_process or not ray.is_initialized():
        return (lambda function, *arguments, returns=1: function(*arguments)), (lambda values: values)
    remote = {"num_cpus": num_cpus} if num_cpus is not None else {}

    def submit(function, *arguments, returns=1):
        return ray.remote(function).options(num_returns=returns, **remote).remote(*arguments)

    return submit, ray.get


def _id_hash(row_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(row_id.encode(), digest_size=ID_HASH_BYTES).digest(), "little")


def fragment_ids(config: SourceConfig, filesystem, root: str, index: int, fragment: Fragment) -> list[str | None]:
    """One fragment's ids in row order (strings; None for a null id): an image folder's from its
    listing, a table's from its id column alone."""
    if config.format in FOLDER_FORMATS:
        return [entry.id for entry in fragment.entries]
    if config.format == "webdataset":
        with filesystem.open(fragment.path, "rb") as handle:
            return _webdataset_keys(handle)[0][: fragment.rows]
    table = read_fragment(config, filesystem, root, index, fragment, {}, columns=[config.id_column])
    if config.id_column not in table.column_names:
        return [None] * table.num_rows
    return [None if value is None else str(value) for value in table.column(config.id_column).to_pylist()]


def _group_ids(config: SourceConfig, group: list):
    """The ids of a run of fragments, one fragment at a time (`fragment_ids`)."""
    filesystem, root = filesystem_for(config.uri, config.storage.storage_options())
    for index, fragment, _ in group:
        yield fragment_ids(config, filesystem, root, index, fragment)


def _hash_ids(config: SourceConfig, group: list, buckets: int) -> list:
    """[null ids, then one sorted uint64 array of id hashes per bucket] for a run of fragments."""
    import numpy as np

    nulls = 0
    hashes = []
    for ids in _group_ids(config, group):
        nulls += sum(value is None for value in ids)
        hashes.append(np.fromiter((_id_hash(value) for value in ids if value is not None), np.uint64))
    values = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
    return [nulls, *(np.sort(values[values % np.uint64(buckets) == bucket]) for bucket in range(buckets))]


def _repeated_hashes(*parts) -> tuple[int, list[int]]:
    """(how many hashes occur more than once, up to five of them) in one bucket's parts."""
    import numpy as np

    values = np.sort(np.concatenate(parts)) if parts else np.empty(0, np.uint64)
    repeats = np.unique(values[1:][values[1:] == values[:-1]])
    return len(repeats), [int(value) for value in repeats[:5]]


def _ids_with_hashes(config: SourceConfig, group: list, hashes: set[int]) -> list[str]:
    """The ids of a run of fragments whose hash is one of `hashes`, each as often as it occurs."""
    return [
        value for ids in _group_ids(config, group) for value in ids if value is not None and _id_hash(value) in hashes
    ]
