"""NIfTI volumes as rows: one row per slice along a configured voxel axis.

A `.nii` or `.nii.gz` file (NIfTI-1 or NIfTI-2, single file, either byte order; gzip recognised by
its magic bytes, not the name) is a 3D volume, or a 4D one holding a single volume. Planning calls
`slice_count` on the file's first bytes (header only); the read task calls `read_slices` on the
whole file's bytes.

Orientation, kept simple so it is easy to map back: slice `k` along `axis` is
`np.take(volume, k, axis)` on the volume as stored (voxel axes i, j, k in the header's order, no
flip, no reorientation). Its rows are the first remaining voxel axis and its columns the second:
axis 0 gives `pixel[r, c] = volume[k, r, c]`, axis 1 `volume[r, k, c]`, axis 2 `volume[r, c, k]`.
The record holds the volume's affine (the header's best one: sform, else qform, else the voxel
sizes), so a pixel maps to world coordinates (mm) as `affine @ [voxel, 1]` with that voxel index.

Intensities: the stored values are kept, nothing else is applied. uint8 and uint16 data travel
unchanged; int8 and int16 data are shifted by +128 / +32768 into uint8 / uint16 (the shift recorded
as `stored_offset`), and so are other integer data whose values all fit uint16 (no shift) or int16
(+32768). Any other data (wider integers, floats) is mapped linearly onto 0..65535 over the
volume's finite min..max; NaN becomes 0 and infinities the ends of the range. Every record says
`stored value = pixel * value_scale + value_offset` (exactly for integers, within half a step for
the linear map). The header's `scl_slope`/`scl_inter` are recorded, not applied: the real value is
`stored value * scl_slope + scl_inter` (both null when the header says no scaling: slope 0 or not
finite). RGB24 volumes give H x W x 3 uint8 slices.

Header text fields (`descrip`, `aux_file`, `intent_name`, `db_name`) and extensions (which may
carry a whole DICOM header) are never read into a row or a message.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.rows import RowError

RECORD_COLUMN = "nifti"
RECORD_TYPE = pa.struct(
    [
        ("affine", pa.list_(pa.float64())),  # 16 values, row-major: voxel (i, j, k, 1) -> world (mm)
        ("slice_index", pa.int32()),  # 0-based index along `axis`
        ("axis", pa.int32()),
        ("shape", pa.list_(pa.int32())),  # the volume's shape as the header gives it
        ("data_dtype", pa.string()),  # the stored data type ("int16", "float32", "rgb24")
        ("scl_slope", pa.float64()),
        ("scl_inter", pa.float64()),
        ("stored_offset", pa.int64()),  # added to every stored value (integer data kept exactly)
        ("value_scale", pa.float64()),  # stored value = pixel * value_scale + value_offset
        ("value_offset", pa.float64()),
    ]
)

GZIP_MAGIC = b"\x1f\x8b"
NIFTI1_SIZE, NIFTI2_SIZE = 348, 540
NIFTI1_MAGIC, NIFTI2_MAGIC = b"n+1\x00", b"n+2\x00\r\n\x1a\n"
# Header-only files of a .hdr/.img pair: the voxels live in another file.
PAIR_MAGICS = (b"ni1\x00", b"ni2\x00\r\n\x1a\n")

# Stored integer types kept exactly: (output dtype, shift added).
EXACT = {
    np.dtype(np.uint8): (np.uint8, 0),
    np.dtype(np.int8): (np.uint8, 128),
    np.dtype(np.uint16): (np.uint16, 0),
    np.dtype(np.int16): (np.uint16, 32768),
}
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
LEVELS = 65535


class NiftiConfig(BaseModel):
    """How NIfTI volumes become rows (`source.nifti`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    axis: Literal[0, 1, 2] = Field(
        2,
        description="Voxel axis the volume is sliced along, one row per slice (2: axial for a volume stored "
        "in RAS/LPS order). Rows of a slice are the first remaining voxel axis, columns the second.",
    )


@dataclass(frozen=True)
class _Header:
    """What a read needs from a parsed header."""

    header: object  # nibabel Nifti1Header or Nifti2Header
    shape: tuple[int, ...]  # as the header gives it
    volume_shape: tuple[int, int, int]
    dtype: np.dtype  # with the file's byte order
    offset: int


def slice_count(head: bytes, config: NiftiConfig) -> int:
    """The number of slices along `config.axis` of the NIfTI file whose first bytes are `head`
    (at least the header: 348 bytes for NIfTI-1, 540 for NIfTI-2, gzip-compressed or not).

    Raises RowError with a short reason when the file is not a single-file NIfTI, its header is
    truncated or invalid, its data type is unsupported, or it is not a 3D volume (or a 4D one
    holding a single volume)."""
    return _parse_header(_header_bytes(head)).volume_shape[config.axis]


def read_slices(data: bytes, config: NiftiConfig, indices: Sequence[int]) -> list[tuple[np.ndarray, dict] | RowError]:
    """Slices `indices` (0-based, along `config.axis`) of the NIfTI file `data` (`.nii` or
    `.nii.gz` bytes), each as (pixels, record) or a RowError; see the module docstring for the
    orientation and intensity mapping. A problem of the whole file gives the same RowError for every
    index; the messages name no file (the caller adds it) and no header text."""
    try:
        volume, parsed = _volume(data)
        mapping = _mapping(volume, parsed.dtype)
    except RowError as error:
        return [error for _ in indices]
    header = parsed.header
    slope, inter = _scaling(header)
    base = {
        "affine": [float(value) for value in np.asarray(header.get_best_affine(), dtype=np.float64).ravel()],
        "axis": config.axis,
        "shape": list(parsed.shape),
        "data_dtype": "rgb24" if parsed.dtype == RGB24 else parsed.dtype.name,
        "scl_slope": slope,
        "scl_inter": inter,
        "stored_offset": mapping.stored_offset,
        "value_scale": mapping.value_scale,
        "value_offset": mapping.value_offset,
    }
    count = parsed.volume_shape[config.axis]
    results: list[tuple[np.ndarray, dict] | RowError] = []
    for index in indices:
        if not 0 <= index < count:
            results.append(RowError(f"slice {index} is past the volume's {count} slices along axis {config.axis}"))
            continue
        pixels = mapping.apply(np.take(volume, index, axis=config.axis))
        results.append((np.ascontiguousarray(pixels), {**base, "slice_index": int(index)}))
    return results


def _header_bytes(head: bytes) -> bytes:
    """The uncompressed first bytes of a file, enough for either header when `head` holds them."""
    if head[:2] != GZIP_MAGIC:
        return head
    try:
        raw = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(head, NIFTI2_SIZE)
    except zlib.error:
        raise RowError("corrupt gzip stream") from None
    if len(raw) < 4:
        raise RowError(f"truncated NIfTI header: {len(raw)} bytes after decompression")
    return raw


def _file_bytes(data: bytes) -> bytes:
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except EOFError:
        raise RowError("truncated gzip stream") from None
    except (OSError, zlib.error):
        raise RowError("corrupt gzip stream") from None


def _parse_header(raw: bytes) -> _Header:
    """Parse and check a NIfTI header from the file's first (uncompressed) bytes."""
    import nibabel

    size = _header_size(raw)
    if size is None:
        raise RowError("not a NIfTI-1 or NIfTI-2 file")
    if len(raw) < size:
        raise RowError(f"truncated NIfTI header: {len(raw)} of {size} bytes")
    magic = raw[344:348] if size == NIFTI1_SIZE else raw[4:12]
    if magic in PAIR_MAGICS:
        raise RowError("a NIfTI .hdr/.img pair header: only single-file .nii or .nii.gz volumes are read")
    if magic != (NIFTI1_MAGIC if size == NIFTI1_SIZE else NIFTI2_MAGIC):
        raise RowError("not a NIfTI-1 or NIfTI-2 file")
    kind = nibabel.Nifti1Header if size == NIFTI1_SIZE else nibabel.Nifti2Header
    try:
        header = kind(binaryblock=bytes(raw[:size]), check=False)
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = header.get_data_offset()
    except Exception:  # nibabel's messages may quote header values; the reason is enough
        raise RowError("invalid NIfTI header (dimensions, data type or voxel offset)") from None
    if len(shape) < 3:
        raise RowError(f"a {len(shape)}D image of shape {shape}, not a volume: only 3D volumes are sliced")
    if any(n < 1 for n in shape):
        raise RowError(f"invalid NIfTI dimensions {shape}")
    if any(n != 1 for n in shape[3:]):
        raise RowError(
            f"a {len(shape)}D image of shape {shape}: only 3D volumes (or 4D with a single volume) are read; "
            "split it into 3D files"
        )
    if dtype not in EXACT and dtype != RGB24 and dtype.kind not in "iuf":
        raise RowError(f"unsupported NIfTI data type {dtype.name}: integer, float or RGB24 data is read")
    if offset < size:
        raise RowError(f"invalid NIfTI voxel offset {offset}: below the {size}-byte header")
    return _Header(header, shape, shape[:3], dtype, int(offset))


def _header_size(raw: bytes) -> int | None:
    """348 or 540 from `sizeof_hdr` in either byte order, or None for anything else."""
    if len(raw) < 4:
        return None
    for order in "<>":
        (size,) = struct.unpack(order + "i", raw[:4])
        if size in (NIFTI1_SIZE, NIFTI2_SIZE):
            return size
    return None


def _volume(data: bytes) -> tuple[np.ndarray, _Header]:
    """The stored voxels as a read-only view on the file's bytes (no copy, no scaling) and the header."""
    raw = _file_bytes(data)
    parsed = _parse_header(raw)
    needed = int(np.prod(parsed.volume_shape)) * parsed.dtype.itemsize
    if len(raw) < parsed.offset + needed:
        raise RowError(
            f"truncated NIfTI data: {needed} bytes of voxels from offset {parsed.offset}, the file has {len(raw)} bytes"
        )
    # NIfTI stores voxels with the first axis fastest: Fortran order.
    volume = np.ndarray(parsed.volume_shape, dtype=parsed.dtype, buffer=raw, offset=parsed.offset, order="F")
    return volume, parsed


def _scaling(header) -> tuple[float | None, float | None]:
    """The header's scl_slope/scl_inter as NIfTI defines them: no scaling (None, None) when the slope
    is 0 or not finite; a non-finite intercept counts as 0."""
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if slope == 0 or not np.isfinite(slope):
        return None, None
    return slope, inter if np.isfinite(inter) else 0.0


@dataclass(frozen=True)
class _Mapping:
    """Stored values -> pixels for one volume."""

    dtype: type | None  # output dtype of an exact (shifted) copy; None for the linear map or RGB
    stored_offset: int
    value_scale: float
    value_offset: float
    low: float = 0.0  # the linear map's range start

    def apply(self, values: np.ndarray) -> np.ndarray:
        if values.dtype == RGB24:
            return values.view(np.uint8).reshape(*values.shape, 3)
        if self.dtype is not None:
            return (values.astype(np.int64) + self.stored_offset).astype(self.dtype)
        scaled = (values.astype(np.float64) - self.low) / self.value_scale
        return np.rint(np.nan_to_num(np.clip(scaled, 0, LEVELS), nan=0.0)).astype(np.uint16)


def _mapping(volume: np.ndarray, dtype: np.dtype) -> _Mapping:
    if dtype == RGB24:
        return _Mapping(None, 0, 1.0, 0.0)
    exact = EXACT.get(np.dtype(dtype.newbyteorder("=")))
    if exact is None and dtype.kind in "iu" and volume.size:
        low, high = int(volume.min()), int(volume.max())
        if 0 <= low and high <= LEVELS:
            exact = (np.uint16, 0)
        elif -32768 <= low and high <= 32767:
            exact = (np.uint16, 32768)
    if exact is not None:
        out, shift = exact
        return _Mapping(out, shift, 1.0, float(-shift))
    low, high = _finite_range(volume)
    scale = (high - low) / LEVELS if high > low else 1.0
    return _Mapping(None, 0, scale, low, low)


def _finite_range(volume: np.ndarray) -> tuple[float, float]:
    low, high = float(volume.min()), float(volume.max())
    if np.isfinite(low) and np.isfinite(high):
        return low, high
    finite = volume[np.isfinite(volume)]
    if not finite.size:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())
