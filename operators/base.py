"""What every operator shares: the resource fields of its config and the column check."""

from __future__ import annotations

import hashlib
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

# Columns the job itself owns; a source column with one of these names would be overwritten.
RESERVED_COLUMNS = ("id", "image", "variant_index", "seed", "status", "error", "width", "height")


class OperatorConfig(BaseModel):
    """Fields every operator has: its stage name and how its actor pool is sized."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = Field(
        None,
        description="Stage name; its parameters and timings are kept per row in a column of this name. "
        "Defaults to the operator's kind.",
    )
    batch_size: int = Field(4, ge=1, description="Rows per batch handed to one actor call.")
    num_actors: int | None = Field(
        None,
        ge=1,
        description="Actors in this operator's pool. Default: as many as the cluster's resources allow "
        "while leaving room for reads and writes.",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs each actor reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each actor reserves; fractions share a GPU.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device; 'auto' is cuda when the actor reserves a GPU, else cpu."
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

    def resolved_device(self) -> str:
        """The torch device the actor runs on, decided by its resources, never by the driver."""
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus > 0 else "cpu"


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
