"""The job config: pydantic models for `source`, `operators`, `sink` and `run`, and YAML loading.

Every error names the field by its dotted path, the bad value and what is accepted, and is
raised before Ray starts or any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from operators import OPERATORS
from operators.base import UserError
from operators.fidelity import FidelityConfig
from operators.images import DEFAULT_MAX_IMAGE_PIXELS

OperatorEntry = Annotated[Union[tuple(OPERATORS)], Field(discriminator="kind")]  # noqa: UP007


class ConfigError(UserError):
    """A config that does not validate; the message lists every problem, one per line."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StorageConfig(_Frozen):
    """Object-storage settings. Left empty, the standard AWS chain applies (AWS_* variables,
    shared config, instance or pod identity). Secrets are never printed or logged."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000.")
    region: str | None = Field(None, description="Region name.")
    access_key_id: SecretStr | None = Field(None, description="Access key id.")
    secret_access_key: SecretStr | None = Field(None, description="Secret access key.")
    session_token: SecretStr | None = Field(None, description="Session token for temporary credentials.")
    anon: bool = Field(False, description="Access public buckets without credentials.")

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
        return options


class SourceConfig(_Frozen):
    """Where the input rows come from."""

    uri: str = Field(description="A Parquet or Arrow file or directory, or an image folder; local path or s3://.")
    format: Literal["parquet", "arrow", "images"] = Field(
        "parquet",
        description="'parquet': Parquet rows with an image column; 'arrow': Arrow IPC files (file or stream "
        "format, e.g. `datasets.save_to_disk` shards) with an image column; 'images': a folder of image files.",
    )
    image_column: str = Field("image", description="Parquet column with encoded bytes or {bytes, path} structs.")
    id_column: str = Field("id", description="Parquet column of unique row ids (images: ids are relative paths).")
    limit: int | None = Field(None, ge=1, description="Process only the first N rows (in id order).")
    read_blocks: int | None = Field(
        None,
        ge=1,
        description="Blocks to read the source into (Ray's `override_num_blocks`, a hint Ray may combine for small "
        "Parquet files); output is committed a block at a time, so more blocks mean smaller steps. Default: Ray's.",
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, ge=1, description="Larger images become error rows (decompression-bomb limit)."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-storage settings.")


class SinkConfig(_Frozen):
    """Where the output rows go."""

    uri: str = Field(description="Output directory; local path or s3://.")
    mode: Literal["resume", "error", "overwrite"] = Field(
        "resume",
        description="'resume': continue the same config's committed output (a finished job writes nothing new; "
        "a different config is refused); 'error': refuse a non-empty directory; 'overwrite': clear it first.",
    )
    rows_per_shard: int = Field(1000, ge=1, description="Upper bound on rows in one Parquet shard.")
    write_images: bool = Field(False, description="Also write each output as a PNG under images/.")
    report_rows: int = Field(24, ge=0, description="Rows shown in report.html (input beside output).")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-storage settings.")


class ResourcesConfig(_Frozen):
    """Resources of a local Ray instance, and how much to keep free for reads and writes."""

    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray instance (default: all).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the local Ray instance (default: detected).")
    reserved_cpus: float = Field(
        1.0,
        ge=1,
        description="CPUs left free for read and write tasks when sizing pools; at least 1, since each of "
        "those tasks takes a whole CPU and a job with none free hangs.",
    )


class RunConfig(_Frozen):
    """How the job runs."""

    seed: int = Field(0, ge=0, description="Run seed; each output's seed derives from it, the row id and variant.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto' or ray://...); default RAY_ADDRESS, else a local instance."
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Local resources and reserve.")
    offline: bool = Field(True, description="Never reach a model hub; models must be local, on S3 or cached.")
    progress_interval_seconds: float = Field(
        30.0, ge=1, description="Seconds between progress log lines when stdout is not a terminal."
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
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with source, operators, sink and run")
    for override in overrides:
        apply_override(data, override)
    return validate_config(data, source_name=str(path))


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
            else f", got {given!r}"
        )
        if problem["type"] in ("union_tag_invalid", "union_tag_not_found"):
            location += "." + str(problem.get("ctx", {}).get("discriminator", "kind")).strip("'")
        if problem["loc"] and problem["loc"][-1] in _SECRET_FIELDS:
            got = ", got a value that is not shown"
        lines.append(f"  {location or '(top level)'}: {message}{got}")
    return "\n".join(lines)


_SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token")


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
        raise ConfigError(f"--set takes dotted.path=value, got {override!r}")
    dotted, raw = override.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
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
