"""What every operator shares: the resource fields of its config, and the three steps of its class.

An operator runs as three steps with one contract (see ARCHITECTURE.md, "How a row flows"):

- *prepare* (`Operator.prepare_batch`, a CPU task, no model): decode each input (encoded bytes, or
  the pixels of the stage before), orient, convert and size it, compute control images and masks:
  `prepare()` per row. Pixels leave as `operators.rows.PIXELS_TYPE` columns.
- *model* (`Operator.model_batch`, on the stage's actor, which loads its model once in `setup()`):
  fans rows out into variants, derives seeds, runs `process()` on the ready arrays, and returns
  arrays plus the stage column (`record()`) and the parameters text (`parameters_text()`).
- *finish* (`operators.finish.finish_batch`, a CPU task after the last stage): fidelity, then one
  encode per output for the sink.

An operator subclass supplies `config_class`, `stage_fields`, `setup()`, `prepare()`, `process()`,
`record()` and, for its file's text chunk, `parameters_text()`. The base class checks columns, passes
error rows through, times each step and builds every table, so every operator returns the same
columns and a bad row never raises. Calling an operator on a table runs all three steps in one
process (tests, and the in-actor pattern the duty-cycle benchmark compares with).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.rows import (
    ERROR,
    OK,
    PARAMETERS,
    PREPARE_SECONDS,
    PREPARED_PREFIX,
    RESERVED_COLUMNS,
    RowError,
    derive_seed,
    is_pixels,
    pixel_arrays,
    to_pixels,
)

logger = logging.getLogger(__name__)


class OperatorConfig(BaseModel):
    """Fields every operator has: its stage name and how its actor pool is sized."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Each operator's config narrows this to `Literal["its kind"]`: the job config's discriminator.
    kind: str

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
        return self.name or self.kind

    def variant_count(self) -> int:
        """Output rows this stage makes of each input row; one by default."""
        return 1

    def input_columns(self) -> set[str]:
        """Source columns this stage reads besides `id` and `image` (prompt templates, prompt and
        control-image columns), checked against the source before the job runs; none by default."""
        return set()

    def written_columns(self) -> set[str]:
        """Columns this stage adds to every row besides the ones every stage sets (such as a control
        image kept with `save_as`): later stages may read them; none by default."""
        return set()

    def model_references(self) -> list:
        """The checkpoints and adapters this operator loads (`operators.models.ModelReference`), vetted
        before the job runs; none by default."""
        return []

    def loads_model(self) -> bool:
        """Whether `setup()` loads something worth keeping (a model), so that the model step runs on
        an actor pool that loads it once per actor; yes by default."""
        return True

    def runs_as_tasks(self) -> bool:
        """Whether this stage runs as CPU tasks (its prepare and model steps in one) instead of an
        actor pool: it loads no model, reserves no GPU and asks for no fixed `num_actors`. An actor
        of such a stage would hold a CPU mostly idle between the tasks that feed it."""
        return not self.loads_model() and self.num_gpus == 0 and self.num_actors is None

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


def check_columns(operator: str, table: pa.Table, required: tuple[str, ...]) -> None:
    """Raise a clear error when a batch lacks columns the operator needs."""
    missing = [name for name in required if name not in table.column_names]
    if missing:
        raise KeyError(f"{operator} needs columns {missing}; the batch has {table.column_names}")


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
    input: Any = None  # what prepare() returned: an array, or a dict of named arrays
    parameters: dict = field(default_factory=dict)  # per-variant parameters (sweeps)
    error: str | None = None
    output: Any = None  # the output pixels: a uint8 or uint16 array, H x W or H x W x C
    size: tuple[int, int] | None = None  # (width, height) of the output, set from its shape
    record: dict = field(default_factory=dict)  # stage fields set by process()
    prepare_seconds: float | None = None
    model_seconds: float | None = None


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
# torch's CPU thread count, null where the stage runs no torch), where, how long each step took, and
# (on the last stage, set by the finish step) how the output was encoded.
RUNTIME_FIELDS = [
    ("versions", pa.string()),
    ("torch_threads", pa.int32()),
    ("node_id", pa.string()),
    ("prepare_seconds", pa.float64()),
    ("model_seconds", pa.float64()),
    ("finish_seconds", pa.float64()),
    ("encoding", pa.string()),
]


def current_node_id() -> str | None:
    """The Ray node this actor runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # Ray missing or not connected: no node to name
        return None


class Operator:
    """Base class of every operator (see module docstring).

    `prepare_batch` needs `id` and `image` (encoded bytes, or pixels from the stage before) and sets
    `image` to the prepared pixels; `model_batch` honours an incoming `status` (error rows pass
    through untouched but for the stage's own columns) and `variant_index`, and sets `variant_index`,
    `seed`, `status`, `error`, `image` (output pixels), `width`, `height` and a struct column named
    after the stage. Every other column passes through untouched.
    """

    # The config class this operator runs; `operators.OPERATORS` is derived from it.
    config_class: ClassVar[type[OperatorConfig]]
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
        load: bool = True,
    ):
        from operators.images import DEFAULT_MAX_IMAGE_PIXELS

        self.config = config
        self.seed = seed
        self.offline = offline
        self.model_storage_options = model_storage_options or {}
        self.max_image_pixels = max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS
        self.device = config.resolved_device()
        self.stage_type = pa.struct(self.stage_fields + RUNTIME_FIELDS)
        self.torch_threads: int | None = None  # set by the set-up of an operator that runs torch
        if load:  # the model step's actor; the prepare step needs no model
            self.node_id = current_node_id()
            self.versions = library_versions(config.output_libraries())
            self.setup()

    def setup(self) -> None:
        """Load models and references; runs once per actor."""

    def variants(self, row: dict) -> list[dict]:
        """Per-variant parameters for one input row; `config.variant_count()` entries. Raise RowError
        to fail the row."""
        return [{}]

    def prepare(self, image, row: dict) -> Any:
        """Decode and check one input image (encoded bytes, or an array from the stage before) on a CPU
        worker: return its array, or a dict of named arrays with the model's input under "image" (a
        named value that is not an array, such as a note on what prepare did, travels as text).
        Raise RowError for a bad row."""
        raise NotImplementedError

    def prepare_extras(self, row: dict) -> dict:
        """Named inputs every operator of a family prepares besides its own (a diffusers operator's
        per-row IP-Adapter reference), added to what `prepare` returned; none by default."""
        return {}

    def process(self, items: list[Item]) -> None:
        """Set `output` (an array) and `record` (or `error`) on each item."""
        raise NotImplementedError

    def parameters_text(self, item: Item) -> str | None:
        """The AUTOMATIC1111 `parameters` text the output file carries; `item.size` is set."""
        return None

    def output_columns(self, items: list[Item]) -> dict[str, pa.Array]:
        """Columns this stage writes besides the ones every stage sets, one value per item in order
        (such as a control image kept as its own column); none by default."""
        return {}

    def record(self, item: Item) -> dict:
        """The stage column's fields for one item (also called for error rows); the base class adds
        `RUNTIME_FIELDS` (versions, torch threads, node, timings)."""
        return dict(item.record)

    @property
    def stage_label(self) -> str:
        return f"{self.config.kind} stage {self.config.stage_name!r}"

    def __call__(self, batch: pa.Table, encoding=None) -> pa.Table:
        """All three steps in this process: prepare, model, then finish with `encoding` (the sink's
        default when None). The job runs them as separate Ray Data stages."""
        from operators.finish import finish_batch

        return finish_batch(self.model_batch(self.prepare_batch(batch)), self.config.stage_name, encoding)

    def prepare_batch(self, batch: pa.Table) -> pa.Table:
        """The prepare step (see module docstring): error rows pass through; a row `prepare` refuses
        becomes an error row."""
        check_columns(self.stage_label, batch, self.required_columns)
        count = batch.num_rows
        column = batch.column("image")
        from_stage = is_pixels(column.type)
        images = pixel_arrays(column) if from_stage else column.to_pylist()
        statuses = batch.column("status").to_pylist() if "status" in batch.column_names else [OK] * count
        errors = batch.column("error").to_pylist() if "error" in batch.column_names else [None] * count
        rows = batch.drop_columns(["image"]).to_pylist()
        prepared: list[dict | None] = [None] * count
        seconds: list[float | None] = [None] * count
        for index in range(count):
            if statuses[index] == ERROR:
                continue
            started = time.perf_counter()
            image = images[index]
            try:
                value = self.prepare(image, rows[index])
                prepared[index] = {
                    **(value if isinstance(value, dict) else {"image": value}),
                    **self.prepare_extras(rows[index]),
                }
            except RowError as problem:
                statuses[index], errors[index] = ERROR, str(problem)
            seconds[index] = time.perf_counter() - started
        names = sorted({name for value in prepared if value for name in value if name != "image"})
        columns = {
            "status": pa.array(statuses, pa.string()),
            "error": pa.array(errors, pa.string()),
            "image": to_pixels([value["image"] if value else None for value in prepared]),
            PREPARE_SECONDS: pa.array(seconds, pa.float64()),
        }
        for name in names:
            values = [value.get(name) if value else None for value in prepared]
            # Arrays travel as pixels; anything else a prepare step returns (a note on what it did) as text.
            texts = not any(isinstance(value, np.ndarray) for value in values)
            columns[PREPARED_PREFIX + name] = pa.array(values, pa.string()) if texts else to_pixels(values)
        return replace_columns(batch, columns)

    def model_batch(self, batch: pa.Table) -> pa.Table:
        """The model step (see module docstring): takes what `prepare_batch` made."""
        check_columns(self.stage_label, batch, ("id", "image", "status", PREPARE_SECONDS))
        _kill_once_if_asked()
        extras = [name for name in batch.column_names if name.startswith(PREPARED_PREFIX)]
        images = pixel_arrays(batch.column("image"))
        extra_values = {
            name[len(PREPARED_PREFIX) :]: (
                pixel_arrays(batch.column(name))
                if is_pixels(batch.column(name).type)
                else batch.column(name).to_pylist()
            )
            for name in extras
        }
        prepare_seconds = batch.column(PREPARE_SECONDS).to_pylist()
        passed = batch.drop_columns([PREPARE_SECONDS, *extras])
        rows = passed.drop_columns(["image"]).to_pylist()
        items: list[Item] = []
        count = self.config.variant_count()
        for index, row in enumerate(rows):
            error = row.get("error") or "failed in an earlier stage" if row.get("status") == ERROR else None
            parameter_sets: list[dict] = [{}] * count
            decoded = None
            if error is None:
                try:
                    parameter_sets = self.variants(row)
                except RowError as problem:
                    error = str(problem)
                decoded = images[index]
                if extras:
                    decoded = {"image": decoded, **{key: values[index] for key, values in extra_values.items()}}
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
                        prepare_seconds=prepare_seconds[index],
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
                item.model_seconds = share
                if item.error is None and item.output is None:
                    item.error = f"{self.stage_label} produced no output for this row"
        return self._output_table(passed, items)

    def _output_table(self, batch: pa.Table, items: list[Item]) -> pa.Table:
        texts = []
        for item in items:
            text = None
            if item.error is None:
                item.size = (item.output.shape[1], item.output.shape[0])
                try:
                    text = self.parameters_text(item)
                except RowError as problem:
                    item.error = str(problem)
            texts.append(text)
        records = []
        for item in items:
            record = self.record(item)
            record.update(
                versions=self.versions,
                torch_threads=self.torch_threads,
                node_id=self.node_id,
                prepare_seconds=item.prepare_seconds,
                model_seconds=item.model_seconds,
            )
            records.append(record)
        for item in items:
            if item.error is not None:
                item.output, item.size = None, None
        columns = {
            "variant_index": pa.array([item.variant_index for item in items], pa.int32()),
            "seed": pa.array([item.seed for item in items], pa.int64()),
            "status": pa.array([OK if item.error is None else ERROR for item in items], pa.string()),
            "error": pa.array([item.error for item in items], pa.string()),
            "image": to_pixels([item.output for item in items]),
            "width": pa.array([item.size[0] if item.size else None for item in items], pa.int32()),
            "height": pa.array([item.size[1] if item.size else None for item in items], pa.int32()),
            self.config.stage_name: pa.array(records, self.stage_type),
            PARAMETERS: pa.array(texts, pa.string()),
            **self.output_columns(items),
        }
        return replace_columns(batch.take([item.source_index for item in items]), columns)
