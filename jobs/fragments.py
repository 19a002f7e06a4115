"""Source fragments: the units a job plans, reads and accounts for.

A fragment is a Parquet row group, an Arrow IPC file, or a run of up to `FOLDER_FRAGMENT_FILES`
files of an image folder (in sorted order). The driver plans them from metadata (Parquet footers,
file listings) and holds this per-fragment list, never a per-row one. Read tasks (`FragmentSource`,
a Ray Data datasource) read whole fragments and tag each row with its fragment's index in the plan
(`_fragment`) and its position in the fragment (`_row`); the sink writes them as the provenance
columns `source_fragment` (the fragment's key) and `source_row`, and sums them into per-fragment
tallies in each shard's commit record (`tally`).

A tally is, per fragment, the number of output rows and a checksum: the sum, modulo 2**64, of a
64-bit mix (splitmix64) of (fragment key, row, variant) over those rows. The driver knows what a
complete fragment's tally must be (`expected_tally`) from its row count and the variants per input,
so "every output row of this fragment exactly once" is a comparison of two numbers per fragment:
a missing row, a duplicate or a row of another fragment changes the sum (a duplicate and a missing
row cancel out with probability 2**-64).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

FRAGMENT = "_fragment"
ROW = "_row"
# What the output keeps of them: which fragment (its key) and which row of it each output came from.
SOURCE_FRAGMENT = "source_fragment"
SOURCE_ROW = "source_row"
FOLDER_FRAGMENT_FILES = 1000
# A row's variant occupies the low bits of the number that is mixed (at most 2**20 variants per input).
VARIANT_BITS = 20
_MASK = (1 << 64) - 1


class Entry(NamedTuple):
    """One row of a folder source, as planned: its id, the file it is read from, why it is not read
    (None when it is), the frame (DICOM, 1-based) or slice (NIfTI, 0-based) of the file it is, the
    file's path relative to the folder (volumes), and an image's sidecar caption and metadata."""

    id: str
    path: str
    problem: str | None = None
    frame: int | None = None
    relative: str | None = None
    extras: tuple | None = None


@dataclass(frozen=True)
class Fragment:
    """One fragment of the plan (see module docstring)."""

    key: str  # stable within the source: "dir/part-0.parquet#3", "rows.arrow", "cats/001.png+999"
    rows: int  # rows the job reads from it (fewer than it holds when source.limit cuts it)
    path: str = ""  # table formats: the file, inside the source's filesystem
    row_group: int | None = None  # Parquet: the row group's index in its file
    entries: tuple[Entry, ...] = ()  # folder sources: one per row


def key_seed(key: str) -> int:
    """The 64-bit number a fragment's key contributes to every row's checksum term."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 values (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = values + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def row_checksum(key: str, rows: np.ndarray, variants: np.ndarray) -> int:
    """The checksum of output rows (row, variant) of fragment `key`: sum of their mixes mod 2**64."""
    numbers = (rows.astype(np.uint64) << np.uint64(VARIANT_BITS)) | variants.astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = _mix(numbers ^ np.uint64(key_seed(key)))
        return int(mixed.sum(dtype=np.uint64))


def expected_tally(fragment: Fragment, variants: int) -> tuple[int, int]:
    """(rows, checksum) a fragment's complete output has: every row once per variant."""
    total = 0
    step = 1 << 16  # bounded memory for large row groups
    for start in range(0, fragment.rows, step):
        rows = np.arange(start, min(start + step, fragment.rows), dtype=np.uint64)
        grid_rows = np.repeat(rows, variants)
        grid_variants = np.tile(np.arange(variants, dtype=np.uint64), len(rows))
        total = (total + row_checksum(fragment.key, grid_rows, grid_variants)) & _MASK
    return fragment.rows * variants, total


def name_fragments(table: pa.Table, keys: list[str]) -> pa.Table:
    """Replace the `_fragment` index and `_row` columns by the provenance columns the output keeps:
    `source_fragment` (the fragment's key) and `source_row` (the row's position in it)."""
    indices = table.column(FRAGMENT).combine_chunks()
    names = pa.DictionaryArray.from_arrays(indices, pa.array(keys, pa.string())).cast(pa.string())
    table = table.drop_columns([FRAGMENT]).append_column(SOURCE_FRAGMENT, names)
    position = table.column_names.index(ROW)
    rows = table.column(ROW).cast(pa.int64())
    return table.remove_column(position).append_column(SOURCE_ROW, rows)


def tally(table: pa.Table) -> dict[str, list[int]]:
    """{fragment key: [rows, checksum]} of output rows (their `source_fragment`, `source_row` and
    `variant_index` columns)."""
    keys = table.column(SOURCE_FRAGMENT).combine_chunks().dictionary_encode()
    codes = keys.indices.to_numpy(zero_copy_only=False)
    rows = table.column(SOURCE_ROW).to_numpy()
    variants = table.column("variant_index").to_numpy()
    result: dict[str, list[int]] = {}
    for code, key in enumerate(keys.dictionary.to_pylist()):
        selected = codes == code
        result[key] = [int(selected.sum()), row_checksum(key, rows[selected], variants[selected])]
    return dict(sorted(result.items()))


def add_tallies(total: dict[str, list[int]], more: dict[str, list[int]]) -> None:
    """Add one shard's tallies into a running total, in place."""
    for key, (rows, checksum) in more.items():
        have = total.setdefault(key, [0, 0])
        have[0] += rows
        have[1] = (have[1] + checksum) & _MASK
