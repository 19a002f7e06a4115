"""The job config: pydantic models for `source`, `operators`, `sink` and `run`, and YAML loading.

Every error names the field by its dotted path, the bad value and what is accepted, and is
raised before Ray starts or any model loads.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from operators import OPERATORS
from operators.base import UserError
from operators.dicom import DicomConfig
from operators.fidelity import FidelityConfig
from operators.images import DEFAULT_MAX_IMAGE_PIXELS, EncodingConfig
from operators.nifti import NiftiConfig
from operators.storage import REMOTE_SCHEMES, library_options, missing_library, redact, scheme_of

OperatorEntry = Annotated[Union[tuple(OPERATORS)], Field(discriminator="kind")]  # noqa: UP007


class ConfigError(UserError):
    """A config that does not validate; the message lists every problem, one per line."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# The largest value a signed 64-bit integer (Parquet's and Arrow's int64) holds.
MAX_INT64 = 2**63 - 1
ACCEPTED_URIS = (
    "a local path, file://PATH, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://CONTAINER/PREFIX (or abfs://), "
    "hf://datasets/OWNER/NAME/PATH or memory://PATH"
)
MEBIBYTE = 1024 * 1024
# Below Arrow's limit of 2 GiB for one binary array (32-bit offsets), with room for a row's other columns.
MAX_SHARD_BYTES = 1536 * MEBIBYTE
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# `file:/x` or `local:x`: fsspec reads a protocol there although there is no `//`.
_BARE_PROTOCOL = re.compile(r"^(file|local):(?!//)", re.IGNORECASE)


def check_location(uri: str) -> str:
    """Refuse a URI whose scheme restyle cannot read or write (gs://, https://, ...)."""
    match = _SCHEME.match(uri)
    if match and match.group(1) != "file" and match.group(1) not in REMOTE_SCHEMES:
        raise ValueError(f"unsupported URI scheme {match.group(1)!r}; accepted: {ACCEPTED_URIS}")
    problem = missing_library(uri) if match else None
    if problem:
        raise ValueError(problem)
    bare = _BARE_PROTOCOL.match(uri)
    if bare:
        raise ValueError(f"{bare.group(0)!r} without '//' is ambiguous; accepted: {ACCEPTED_URIS}")
    if not uri.strip():
        raise ValueError(f"must not be empty; accepted: {ACCEPTED_URIS}")
    return uri


class StorageConfig(_Frozen):
    """Object-storage settings. Left empty, each store's standard chain applies: for S3 the AWS_*
    variables, shared config, instance or pod identity; for gs:// GOOGLE_APPLICATION_CREDENTIALS or
    the machine's identity; for az:// the AZURE_STORAGE_* variables; for hf:// HF_TOKEN or a saved
    login. Secrets are never printed or logged."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000.")
    region: str | None = Field(None, description="Region name.")
    access_key_id: SecretStr | None = Field(None, description="Access key id.")
    secret_access_key: SecretStr | None = Field(None, description="Secret access key.")
    session_token: SecretStr | None = Field(None, description="Session token for temporary credentials.")
    anon: bool = Field(False, description="Access public buckets without credentials (s3://, gs://, az://).")
    credentials: str | None = Field(
        None, description="gs:// only: a service-account JSON file (gcsfs `token`), or 'google_default'."
    )
    project: str | None = Field(None, description="gs:// only: the Google Cloud project.")
    account_name: str | None = Field(None, description="az:// and abfs:// only: the storage account name.")
    account_key: SecretStr | None = Field(None, description="az:// and abfs:// only: the storage account key.")
    sas_token: SecretStr | None = Field(None, description="az:// and abfs:// only: a shared access signature.")
    connection_string: SecretStr | None = Field(None, description="az:// and abfs:// only: a connection string.")
    hub_token: SecretStr | None = Field(None, description="hf:// only: a Hugging Face token.")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_a_url(cls, value: str | None) -> str | None:
        # The value is never quoted back: a misplaced credential may sit in it.
        if value is None:
            return value
        if "@" in value:
            raise ValueError(
                "must not hold credentials (USER:SECRET@); give them as access_key_id and secret_access_key, "
                "or through the AWS_* environment variables"
            )
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be http://HOST[:PORT] or https://HOST[:PORT]")
        return value

    def storage_options(self) -> dict[str, Any]:
        """s3fs keyword arguments."""
        options: dict[str, Any] = {}
        if self.access_key_id is not None:
            options["key"] = self.access_key_id.get_secret_value()
        if self.secret_access_key is not None:
            options["secret"] = self.secret_access_key.get_secret_value()
        if self.session_token is not None:
            options["token"] = self.session_token.get_secret_value()
        if self.endpoint_url is not None:
            options["endpoint_url"] = self.endpoint_url
        if self.region is not None:
            options["client_kwargs"] = {"region_name": self.region}
        if self.anon:
            options["anon"] = True
        for name in ("credentials", "project", "account_name"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        for name in ("account_key", "sas_token", "connection_string", "hub_token"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name).get_secret_value()
        return options

    def not_for(self, uri: str) -> list[str]:
        """The settings given (by field name) that the remote store `uri` names does not take."""
        scheme = scheme_of(uri)
        if scheme is None:
            return []
        names = {
            "key": "access_key_id",
            "secret": "secret_access_key",
            "token": "session_token",
            "client_kwargs": "region",
        }
        return sorted(
            names.get(name, name)
            for name, value in self.storage_options().items()
            if not library_options(scheme, {name: value})
        )


# Sources read from a folder of files, one fragment per run of files.
FOLDER_FORMATS = ("images", "imagefolder", "dicom", "nifti")


class SourceConfig(_Frozen):
    """Where the input rows come from."""

    uri: str = Field(description="A Parquet or Arrow file or directory, or an image folder; local path or s3://.")
    format: Literal["parquet", "arrow", "images", "imagefolder", "webdataset", "dicom", "nifti"] = Field(
        "parquet",
        description="'parquet': Parquet rows with an image column; 'arrow': Arrow IPC files (file or stream "
        "format, e.g. `datasets.save_to_disk` shards) with an image column; 'images': a folder of image files "
        "(any format Pillow reads, recognised by content; `NAME.txt` or `NAME.caption` beside `NAME.png` becomes "
        "the row's `caption` column); 'imagefolder': a Hugging Face imagefolder, images with `metadata.jsonl` or "
        "`metadata.csv` whose `file_name` column maps each image to its other columns (captions, prompts); "
        "'webdataset': a WebDataset tar shard or a folder of them (one row per sample, its key as id, its image "
        "member as the image and every other member as a column named by its extension: `txt`, `json`, `cls`); "
        "'dicom': a folder of DICOM files (recognised by content, whatever their names; one row per frame); "
        "'nifti': a folder of NIfTI volumes (.nii, .nii.gz; one row per slice).",
    )
    image_column: str = Field("image", description="Parquet column with encoded bytes or {bytes, path} structs.")
    id_column: str = Field("id", description="Parquet column of unique row ids (images: ids are relative paths).")
    limit: int | None = Field(
        None,
        ge=1,
        le=MAX_INT64,
        description="Process only the first N rows (in source order: files sorted by path, rows in file order).",
        strict=True,
    )
    read_blocks: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Blocks to read the source into (Ray's `override_num_blocks`). Default: one per fragment, so "
        "that Ray reads each in the task that runs the CPU steps after it; Ray's own when there are fewer than "
        "two fragments per cluster CPU.",
        strict=True,
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        le=MAX_INT64,
        description="Larger images become error rows (decompression-bomb limit).",
        strict=True,
    )
    include: list[str] | None = Field(
        None,
        min_length=1,
        description="Image folders only: glob patterns on each file's path relative to the folder (e.g. "
        "['*.png', '**/*.jpg']; `*` also crosses '/', a leading `**/` also matches the top level, case is "
        "ignored). Files matching none are not read but counted as `skipped` and listed in the report. "
        "Without it every file is an input, and one that is not an image becomes an error row.",
    )
    dicom: DicomConfig | None = Field(
        None,
        description="How DICOM pixels and headers are read: intensity (window or stored), window, bit_depth, the "
        "attributes kept as columns (never identifying ones), allow_burned_in, id. Applies to format 'dicom' "
        "(default settings when absent) and to a Parquet or Arrow image column that holds DICOM files.",
    )
    nifti: NiftiConfig | None = Field(
        None, description="Format 'nifti' only: the voxel axis slices are taken along (default settings when absent)."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-storage settings.")

    @model_validator(mode="after")
    def _settings_match_the_format(self) -> SourceConfig:
        if self.include is not None and self.format not in FOLDER_FORMATS:
            raise ValueError(
                f"source.include applies to the folder formats ({', '.join(FOLDER_FORMATS)}) only, "
                f"got format {self.format!r}"
            )
        if self.dicom is not None and self.format not in ("dicom", "parquet", "arrow"):
            raise ValueError(f"source.dicom applies to formats dicom, parquet and arrow, got format {self.format!r}")
        if self.nifti is not None and self.format != "nifti":
            raise ValueError(f"source.nifti applies to format 'nifti' only, got format {self.format!r}")
        return self

    @property
    def dicom_settings(self) -> DicomConfig | None:
        """The DICOM settings the source is read with: None when it holds no DICOM."""
        return self.dicom if self.dicom is not None else DicomConfig() if self.format == "dicom" else None

    @property
    def nifti_settings(self) -> NiftiConfig | None:
        return self.nifti if self.nifti is not None else NiftiConfig() if self.format == "nifti" else None

    @field_validator("uri")
    @classmethod
    def _readable_scheme(cls, value: str) -> str:
        return check_location(value)


class SinkConfig(_Frozen):
    """Where the output rows go."""

    uri: str = Field(description="Output directory; local path or s3://.")
    mode: Literal["resume", "error", "overwrite"] = Field(
        "resume",
        description="'resume': continue the same config's committed output (a finished job writes nothing new; "
        "a different config is refused); 'error': refuse a non-empty directory; 'overwrite': clear it first.",
    )
    rows_per_shard: int = Field(
        1000, ge=1, le=1_000_000, description="Upper bound on rows in one Parquet shard.", strict=True
    )
    bytes_per_shard: int = Field(
        512 * MEBIBYTE,
        ge=64 * 1024,
        le=MAX_SHARD_BYTES,
        description="Upper bound on the bytes of one Parquet shard's rows (encoded images and other columns, "
        "before Parquet compression); a row larger than this is a shard of its own. At most 1.5 GiB, so a "
        "shard's image column never reaches Arrow's 2 GiB limit for one binary array.",
        strict=True,
    )
    write_images: bool = Field(
        False, description="Also write each output as an image file under images/, in the `encoding` format."
    )
    webdataset: bool = Field(
        False,
        description="Also write each Parquet shard's ok rows as a WebDataset tar shard `webdataset/part-....tar` "
        "(one sample per output: KEY.png, or .webp/.jpg as `encoding` says, and KEY.json with the row's other "
        "fields), committed with its Parquet shard.",
    )
    imagefolder: bool = Field(
        False,
        description="Also make images/ a Hugging Face imagefolder: each output as an image file (as "
        "`write_images`) and, when the job ends, `images/metadata.jsonl` with every ok row's fields and its "
        "`file_name`, so `datasets.load_dataset('imagefolder', data_dir=SINK/images)` loads it.",
    )
    encoding: EncodingConfig = Field(
        default_factory=EncodingConfig,
        description="How each output image is encoded, once, after the last stage: format (png, webp, jpeg), "
        "png_compress_level, quality. Recorded per row in the last stage's `encoding` field.",
    )
    dicom: bool = Field(
        False,
        description="Also write each output as a derived DICOM instance (Secondary Capture) under dicom/, "
        "referencing its source image, with new deterministic UIDs and no patient identity. Needs a DICOM source.",
    )
    report_rows: int = Field(
        24,
        ge=0,
        le=10_000,
        description="Inputs report.html shows, sampled across the run by a hash of their id, each beside all "
        "its variants.",
        strict=True,
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-storage settings.")

    @property
    def writes_images(self) -> bool:
        """Whether each output is also written as an image file under images/ (`write_images`, `imagefolder`)."""
        return self.write_images or self.imagefolder

    @field_validator("uri")
    @classmethod
    def _readable_scheme(cls, value: str) -> str:
        return check_location(value)


class ResourcesConfig(_Frozen):
    """Resources of a local Ray instance, and how much to keep free for reads and writes."""

    num_cpus: int | None = Field(
        None, ge=1, le=100_000, description="CPUs of the local Ray instance (default: all).", strict=True
    )
    num_gpus: int | None = Field(
        None, ge=0, le=100_000, description="GPUs of the local Ray instance (default: detected).", strict=True
    )
    reserved_cpus: float = Field(
        1.0,
        ge=1,
        description="CPUs left free when sizing actor pools, for the tasks around them (read, prepare, finish and "
        "write); at least 1: a job with none free hangs.",
    )
    cpu_step_cpus: float = Field(
        0.5,
        gt=0,
        le=64,
        description="CPUs each task around the actor pools reserves: read, prepare (decode, resize, control "
        "images), finish (fidelity, encode) and write. Below 1 so these single-threaded tasks share the CPUs "
        "left free, and the same for all of them so none waits for a whole free CPU while others keep taking it.",
    )


class RunConfig(_Frozen):
    """How the job runs."""

    seed: int = Field(
        0,
        ge=0,
        le=MAX_INT64,
        description="Run seed; each output's seed derives from it, the row id and variant.",
        strict=True,
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto' or ray://...); default RAY_ADDRESS, else a local instance."
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Local resources and reserve.")
    offline: bool = Field(True, description="Never reach a model hub; models must be local, on S3 or cached.")
    progress_interval_seconds: float = Field(
        30.0, ge=1, description="Seconds between progress log lines when stderr is not a terminal (a log file)."
    )
    model_storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Object-storage settings for s3:// models."
    )


class JobConfig(_Frozen):
    """A whole job: read `source`, apply `operators` in order, write `sink`."""

    source: SourceConfig = Field(description="Input rows.")
    operators: list[OperatorEntry] = Field(min_length=1, description="Stages applied in order.")
    sink: SinkConfig = Field(description="Output rows.")
    run: RunConfig = Field(default_factory=RunConfig, description="Seed, cluster and resources.")
    fidelity: FidelityConfig | None = Field(
        None, description="Add ssim, psnr and histogram_distance columns against the source; optional thresholds."
    )

    @model_validator(mode="after")
    def _storage_settings_fit_their_store(self) -> JobConfig:
        for where, section in (("source", self.source), ("sink", self.sink)):
            unused = section.storage.not_for(section.uri)
            if unused:
                raise ValueError(
                    f"{where}.storage settings {unused} do not apply to {scheme_of(section.uri)}:// URIs ({where}.uri)"
                )
        return self

    @model_validator(mode="after")
    def _dicom_sink_needs_a_dicom_source(self) -> JobConfig:
        if self.sink.dicom and self.source.dicom_settings is None:
            raise ValueError(
                "sink.dicom writes DICOM derived from DICOM inputs: set source.format to dicom, or add a "
                f"source.dicom section for a {self.source.format} column of DICOM files"
            )
        return self

    @model_validator(mode="after")
    def _unique_stage_names(self) -> JobConfig:
        names = [operator.stage_name for operator in self.operators]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; give operators a distinct name: repeated {duplicates}")
        return self


def load_config(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read a YAML job file, apply `dotted.path=value` overrides, and validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give the path of a YAML job file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text (not UTF-8); give a YAML job file") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or type(error).__name__}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {_one_line(error)}") from None
    if not isinstance(data, dict):
        got = "nothing (an empty file)" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path} must hold a mapping with source, operators, sink and run; it holds {got}")
    for override in overrides:
        apply_override(data, override)
    return validate_config(data, source_name=str(path))


def _one_line(error: yaml.YAMLError) -> str:
    """A YAML error as one line: its problem and where (`line L, column C`)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def validate_config(data: dict, source_name: str = "config") -> JobConfig:
    """Validate a config mapping, turning pydantic's errors into one readable message."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source_name} is invalid:\n" + format_errors(error)) from None


def format_errors(error: ValidationError) -> str:
    """One line per problem: `dotted.path: message, got VALUE`."""
    lines = []
    for problem in error.errors():
        location, parent = _walk(problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden" and parent is not None:
            message = f"unknown field; accepted: {', '.join(sorted(parent.model_fields))}"
        given = problem.get("input")
        got = (
            ""
            if problem["type"] in ("missing", "union_tag_not_found") or isinstance(given, dict)
            else f", got {redact(repr(given))}"
        )
        if problem["type"] in ("union_tag_invalid", "union_tag_not_found"):
            location += "." + str(problem.get("ctx", {}).get("discriminator", "kind")).strip("'")
        if got and _may_hold_a_secret(problem):
            got = ", got a value that is not shown"
        lines.append(f"  {location or '(top level)'}: {message}{got}{_accepted_range(problem, parent)}")
    return "\n".join(lines)


# Values inside these mappings, or under a key that looks like a credential, are never quoted
# back, wherever they appear: a user may put a secret in the wrong field.
_STORAGE_FIELDS = ("storage", "model_storage")
_CREDENTIAL_NAME = re.compile(r"secret|passw|token|key|credential|auth|storage", re.IGNORECASE)
_MAPPING_EXPECTED = ("model_type", "model_attributes_type", "dict_type")


def _may_hold_a_secret(problem: dict) -> bool:
    """Whether the value of a validation problem may be a misplaced credential: anything inside a
    storage mapping, under a credential-like key, or a plain value given where a mapping is expected."""
    names = [part for part in problem["loc"] if isinstance(part, str)]
    return problem["type"] in _MAPPING_EXPECTED or any(
        name in _STORAGE_FIELDS or _CREDENTIAL_NAME.search(name) for name in names
    )


def _accepted_range(problem: dict, parent: type[BaseModel] | None) -> str:
    """`; accepted: whole numbers from 1 to 65536` for a number outside its field's bounds."""
    name = problem["loc"][-1] if problem["loc"] else None
    if not problem["type"].startswith(("greater_than", "less_than", "int_")) or not isinstance(name, str):
        return ""
    field = parent.model_fields.get(name) if parent is not None else None
    if field is None:
        return ""
    bounds = {}
    for constraint in field.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(constraint, key, None) is not None:
                bounds[key] = getattr(constraint, key)
    low = f"{bounds['ge']}" if "ge" in bounds else f"above {bounds['gt']}" if "gt" in bounds else None
    high = f"{bounds['le']}" if "le" in bounds else f"below {bounds['lt']}" if "lt" in bounds else None
    kind = "whole numbers" if int in getattr(field.annotation, "__args__", (field.annotation,)) else "numbers"
    if low and high:
        return f"; accepted: {kind} from {low} to {high}"
    if low or high:
        return f"; accepted: {kind} {'from ' + low if low else 'up to ' + high}"
    return ""


def _walk(location: tuple) -> tuple[str, type[BaseModel] | None]:
    """The user-facing path of a pydantic error location (union tags left out) and the model
    that holds its last part."""
    path = ""
    model: type[BaseModel] | None = JobConfig
    parent: type[BaseModel] | None = JobConfig
    annotation: Any = None
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if model is not None and part in model.model_fields:
            path += f".{part}"
            parent = model
            annotation = model.model_fields[part].annotation
            members = _models_in(annotation)
            model = members[0] if len(members) == 1 else None
            continue
        tagged = [member for member in _models_in(annotation) if _tag_of(member) == part]
        if tagged:  # the tag pydantic puts in the location of a discriminated union member
            model = tagged[0]
            continue
        path += f".{part}"
        parent = model
    return path.lstrip("."), parent


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model inside a (possibly nested) type annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for argument in getattr(annotation, "__args__", ()) + tuple(getattr(annotation, "__metadata__", ())):
        found += _models_in(argument)
    return found


def _tag_of(model: type[BaseModel]) -> str | None:
    """The literal value of a union member's `kind` or `op` field."""
    for name in ("kind", "op"):
        field = model.model_fields.get(name)
        if field is not None and getattr(field.annotation, "__args__", None):
            return field.annotation.__args__[0]
    return None


def apply_override(data: dict, override: str) -> None:
    """Set `dotted.path=value` in a config mapping; the value is parsed as YAML, list
    items are addressed by index (`operators.0.strength=0.5`)."""
    if "=" not in override:
        # A mistyped `--set source.storage.secret_access_key:VALUE` must not print VALUE.
        shown = "a value that is not shown" if _CREDENTIAL_NAME.search(override) else repr(redact(override))
        raise ConfigError(f"--set takes dotted.path=value, got {shown}")
    dotted, raw = override.split("=", 1)
    if not dotted or "" in dotted.split("."):
        raise ConfigError(f"--set takes dotted.path=value with a path like run.seed, got path {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as error:
        detail = "" if _CREDENTIAL_NAME.search(dotted) else f" ({_one_line(error)})"
        raise ConfigError(f"--set {dotted}: the value is not valid YAML{detail}; quote it if it is a string") from None
    parts = dotted.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"--set {dotted}: {'.'.join(parts[:depth]) or 'config'} is a list of {len(node)}; "
                    f"{part!r} is not an index in it"
                )
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:depth])} is not a mapping or list")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
