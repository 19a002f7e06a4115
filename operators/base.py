"""What every operator shares: the resource fields of its config, and the row loop of its class.

An operator subclasses `Operator` and supplies four things: `setup()` (load the model, once per
actor), `prepare()` (decode one input row), `process()` (turn a list of items into outputs) and
`record()` (the per-row fields of its stage column). The base class checks columns, passes error
rows through, fans rows out into variants, times each step, and builds the output table, so
every operator returns the same columns and a bad row never raises.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

# Columns the job itself owns; a source column with one of these names would be overwritten.
RESERVED_COLUMNS = (
    "id",
    "image",
    "variant_index",
    "seed",
    "status",
    "error",
    "width",
    "height",
    "ssim",
    "psnr",
    "histogram_distance",
)

logger = logging.getLogger(__name__)


class OperatorConfig(BaseModel):
    """Fields every operator has: its stage name and how its actor pool is sized."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(
        None,
        description="Stage name; its parameters and timings are kept per row in a column of this name. "
        "Defaults to the operator's kind.",
    )
    batch_size: int = Field(4, ge=1, le=65536, description="Rows per batch handed to one actor call.", strict=True)
    num_actors: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Actors in this operator's pool. Default: as many as the cluster's resources allow "
        "while leaving room for reads and writes.",
        strict=True,
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs each actor reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each actor reserves; fractions share a GPU.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device; 'auto' is cuda when the actor reserves a GPU, else cpu."
    )
    torch_threads: int = Field(
        1,
        ge=1,
        le=256,
        description="CPU threads torch uses in each actor of this stage. Part of the config hash, since on cpu "
        "the thread count changes output bytes (kernels split their sums differently); recorded per row. Not "
        "derived from num_cpus, so resizing the pool never changes bytes.",
        strict=True,
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_column_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.isidentifier() or value in RESERVED_COLUMNS):
            raise ValueError(f"name must be an identifier other than {', '.join(RESERVED_COLUMNS)}, got {value!r}")
        return value

    @property
    def stage_name(self) -> str:
        """The column name this stage's per-row record is kept under."""
        return self.name or self.kind  # type: ignore[attr-defined]

    def model_references(self) -> list:
        """The checkpoints and adapters this operator loads (`operators.models.ModelReference`), vetted
        before the job runs; none by default."""
        return []

    def output_libraries(self) -> tuple[str, ...]:
        """The libraries whose versions can change this operator's output bytes: in the config hash and
        recorded per row as `versions`."""
        return ("numpy", "pillow")

    def resolved_device(self) -> str:
        """The torch device the actor runs on, decided by its resources, never by the driver."""
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus > 0 else "cpu"


# Distributions a library is installed as, in the order they are looked for.
LIBRARY_DISTRIBUTIONS = {
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python")
}


def library_versions(names) -> str:
    """Installed versions of libraries, e.g. 'torch 2.13.0, diffusers 0.42.1', read from package
    metadata (nothing is imported), in the order given."""
    from importlib import metadata

    versions = []
    for name in names:
        version = "not installed"
        for distribution in LIBRARY_DISTRIBUTIONS.get(name, (name,)):
            try:
                version = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
        versions.append(f"{name} {version}")
    return ", ".join(versions)


class UserError(ValueError):
    """A mistake the user can fix (config, source, sink, model reference, cluster request): the CLI
    prints its message as one line and exits 2. Every such exception subclasses this one."""


class RowError(ValueError):
    """A problem with one row's data; its message becomes that row's `error`."""


def check_columns(operator: str, table: pa.Table, required: tuple[str, ...]) -> None:
    """Raise a clear error when a batch lacks columns the operator needs."""
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise KeyError(f"{operator} needs columns {missing}; the batch has {table.column_names}")


def derive_seed(run_seed: int, row_id: str, variant_index: int) -> int:
    """The seed of one output, a function of (run seed, row id, variant index) only, so it does not
    depend on batch size, block count, actor count or row order. Fits a signed 63-bit integer."""
    key = f"{run_seed}\x1f{row_id}\x1f{variant_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & (2**63 - 1)


def replace_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """Set columns by name: existing ones are replaced in place, new ones appended."""
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table


@dataclass
class Item:
    """One output row in the making: which input it comes from, its variant, and what became of it."""

    source_index: int
    row_id: str
    variant_index: int
    seed: int
    row: dict  # the input row's columns other than the image (for prompt templates)
    input: Any = None  # what prepare() returned
    parameters: dict = field(default_factory=dict)  # per-variant parameters (sweeps)
    error: str | None = None
    output: bytes | None = None  # encoded image
    size: tuple[int, int] | None = None
    record: dict = field(default_factory=dict)  # stage fields set by process()
    prepare_seconds: float = 0.0
    process_seconds: float | None = None


# Fault injection for the fault-tolerance tests: when this variable names a file that does not
# exist yet, the first batch call creates it and kills its own process, as a crash mid-batch would.
KILL_ONCE_VARIABLE = "RESTYLE_TESTING_KILL_ACTOR_ONCE"


def _kill_once_if_asked() -> None:
    marker = os.environ.get(KILL_ONCE_VARIABLE)
    if marker:
        try:
            with open(marker, "x") as handle:
                handle.write(str(os.getpid()))
        except FileExistsError:
            return
        logger.warning("%s is set: killing this actor process once", KILL_ONCE_VARIABLE)
        os._exit(1)


# Fields the base class adds to every stage column: what made the row's bytes (library versions and
# torch's CPU thread count, null where the stage runs no torch), where, and how long it took.
RUNTIME_FIELDS = [
    ("versions", pa.string()),
    ("torch_threads", pa.int32()),
    ("node_id", pa.string()),
    ("prepare_seconds", pa.float64()),
    ("process_seconds", pa.float64()),
]


def current_node_id() -> str | None:
    """The Ray node this actor runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # Ray missing or not connected: no node to name
        return None


class Operator:
    """Base class of every operator's Ray Data actor class (see module docstring).

    Takes and returns `pyarrow.Table` batches. Needs `id` and `image` (encoded bytes); honours an
    incoming `status` (error rows pass through untouched but for the stage's own columns) and
    `variant_index`. Sets `variant_index`, `seed`, `status`, `error`, `image`, `width`, `height` and
    a struct column named after the stage; every other column passes through untouched.
    """

    required_columns: ClassVar[tuple[str, ...]] = ("id", "image")
    # The fields of this operator's stage column, without the `RUNTIME_FIELDS` the base adds.
    stage_fields: ClassVar[list[tuple[str, pa.DataType]]] = []

    def __init__(
        self,
        config: OperatorConfig,
        seed: int = 0,
        offline: bool = True,
        model_storage_options: dict | None = None,
        max_image_pixels: int | None = None,
    ):
        from operators.images import DEFAULT_MAX_IMAGE_PIXELS

        self.config = config
        self.seed = seed
        self.offline = offline
        self.model_storage_options = model_storage_options or {}
        self.max_image_pixels = max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
        self.device = config.resolved_device()
        self.stage_type = pa.struct(self.stage_fields + RUNTIME_FIELDS)
        self.node_id = current_node_id()
        self.versions = library_versions(config.output_libraries())
        self.torch_threads: int | None = None  # set by start_torch
        self.setup()

    def setup(self) -> None:
        """Load models and references; runs once per actor."""

    def start_torch(self) -> None:
        """Ready this actor process for a diffusers model: switch the Hub client offline (before it is
        imported) when the job is offline, and give torch `torch_threads` CPU threads (from config, never
        from `num_cpus`: the count changes CPU output bytes)."""
        if self.offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
        import torch

        torch.set_num_threads(self.config.torch_threads)
        self.torch_threads = torch.get_num_threads()

    def variant_count(self) -> int:
        """Output rows per input row; `variants()` returns this many parameter sets."""
        count = getattr(self.config, "variant_count", None)
        return count() if count is not None else 1

    def variants(self, row: dict) -> list[dict]:
        """Per-variant parameters for one input row; one entry per output row. Raise RowError to
        fail the row."""
        return [{}]

    def prepare(self, data: bytes | None, row: dict) -> Any:
        """Decode and check one input image; raise RowError for a bad row."""
        raise NotImplementedError

    def process(self, items: list[Item]) -> None:
        """Set `output`, `size` and `record` (or `error`) on each item."""
        raise NotImplementedError

    def record(self, item: Item) -> dict:
        """The stage column's fields for one item (also called for error rows); the base class adds
        `RUNTIME_FIELDS` (versions, torch threads, node, timings)."""
        return dict(item.record)

    @property
    def stage_label(self) -> str:
        return f"{self.config.kind} stage {self.config.stage_name!r}"  # type: ignore[attr-defined]

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(self.stage_label, batch, self.required_columns)
        _kill_once_if_asked()
        images = batch.column("image").to_pylist()
        rows = batch.drop_columns(["image"]).to_pylist()
        items: list[Item] = []
        for index, row in enumerate(rows):
            started = time.perf_counter()
            error = row.get("error") or "failed in an earlier stage" if row.get("status") == "error" else None
            decoded = None
            parameter_sets: list[dict] = [{}] * self.variant_count()
            if error is None:
                try:
                    parameter_sets = self.variants(row)
                    decoded = self.prepare(images[index], row)
                except RowError as problem:
                    error = str(problem)
            prepare_seconds = time.perf_counter() - started
            previous = row.get("variant_index") or 0
            for offset, parameters in enumerate(parameter_sets):
                variant_index = previous * len(parameter_sets) + offset
                seed = parameters.get("seed")
                items.append(
                    Item(
                        source_index=index,
                        row_id=row["id"],
                        variant_index=variant_index,
                        seed=seed if seed is not None else derive_seed(self.seed, row["id"], variant_index),
                        row=row,
                        input=decoded,
                        parameters=parameters,
                        error=error,
                        prepare_seconds=prepare_seconds,
                    )
                )
        ready = [item for item in items if item.error is None]
        if ready:
            started = time.perf_counter()
            try:
                self.process(ready)
            except RowError as problem:
                for item in ready:
                    item.error = str(problem)
            share = (time.perf_counter() - started) / len(ready)
            for item in ready:
                item.process_seconds = share
                if item.error is None and item.output is None:
                    item.error = f"{self.stage_label} produced no output for this row"
        return self._output_table(batch, items)

    def _output_table(self, batch: pa.Table, items: list[Item]) -> pa.Table:
        records = []
        for item in items:
            record = self.record(item)
            record["versions"] = self.versions
            record["torch_threads"] = self.torch_threads
            record["node_id"] = self.node_id
            record["prepare_seconds"] = item.prepare_seconds
            record["process_seconds"] = item.process_seconds
            records.append(record)
        for item in items:
            if item.error is not None:
                item.output, item.size = None, None
        columns = {
            "variant_index": pa.array([item.variant_index for item in items], pa.int32()),
            "seed": pa.array([item.seed for item in items], pa.int64()),
            "status": pa.array(["ok" if item.error is None else "error" for item in items], pa.string()),
            "error": pa.array([item.error for item in items], pa.string()),
            "image": pa.array([item.output for item in items], pa.binary()),
            "width": pa.array([item.size[0] if item.size else None for item in items], pa.int32()),
            "height": pa.array([item.size[1] if item.size else None for item in items], pa.int32()),
            self.config.stage_name: pa.array(records, self.stage_type),  # type: ignore[attr-defined]
        }
        return replace_columns(batch.take([item.source_index for item in items]), columns)
