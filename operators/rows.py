"""The row contract every part of restyle shares: the columns a job owns, the Hugging Face image
struct, row status values, the per-row error type, seeds, and how pixels travel between steps.

`jobs/` and `operators/` both import these names from here; this module imports neither.

Pixels travel between the prepare, model and finish steps (and between chained stages) as one Arrow
struct per row, `{data, shape, dtype}`: the C-order HWC bytes of a uint8 or uint16 array (a grayscale
image is H x W x 1), its shape and its dtype name. Written by hand rather than with Ray Data's tensor
extension types because those fix one dtype per column and switch between a fixed-shape and a
variable-shape type by batch content, and Arrow cannot concatenate the two (a batch of same-size
images after a batch of mixed sizes fails); they hold no null either. A plain struct holds any mix of
sizes, bit depths and channel counts, nulls for error rows, and reads back without a copy.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

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
    "source_fragment",
    "source_row",
)

# Row status values: an `error` row carries its reason in `error` and no image; a `rejected` row
# (a fidelity threshold missed) keeps its image and says why in `error`.
OK, ERROR, REJECTED = "ok", "error", "rejected"
STATUSES = (OK, ERROR, REJECTED)

# The `image` column as written: the Hugging Face `datasets` Image struct.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def cell_bytes(value) -> bytes | None:
    """The encoded bytes of an image cell a column holds: plain bytes, or the `IMAGE_TYPE` struct."""
    return value.get("bytes") if isinstance(value, dict) else value


# Pixels between steps (see module docstring); large_binary so a batch of big images never meets
# Arrow's 2 GiB limit of a binary array.
PIXELS_TYPE = pa.struct([("data", pa.large_binary()), ("shape", pa.list_(pa.int32())), ("dtype", pa.string())])
PIXEL_DTYPES = ("uint8", "uint16")
_PIXEL_DTYPE_NAMES = {np.dtype(name): name for name in PIXEL_DTYPES}

# Columns that live only between the steps of one stage; never written.
PREPARED_PREFIX = "_prepared_"
PREPARE_SECONDS = "_prepare_seconds"
PARAMETERS = "_parameters"


class RowError(ValueError):
    """A problem with one row's data; its message becomes that row's `error`."""


def derive_seed(run_seed: int, row_id: str, variant_index: int) -> int:
    """The seed of one output, a function of (run seed, row id, variant index) only, so it does not
    depend on batch size, block count, actor count or row order. Fits a signed 63-bit integer."""
    key = f"{run_seed}\x1f{row_id}\x1f{variant_index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & (2**63 - 1)


def dtype_name(array: np.ndarray) -> str:
    """An array's dtype name ('uint8'), looked up for the pixel dtypes: numpy's `str(dtype)` costs
    microseconds, which a per-row record would pay twice."""
    return _PIXEL_DTYPE_NAMES.get(array.dtype) or str(array.dtype)


def to_pixels(arrays: list[np.ndarray | None]) -> pa.StructArray:
    """Arrays (uint8 or uint16, H x W or H x W x C; None for no image) as a `PIXELS_TYPE` array. The
    pixel bytes are copied once, into one buffer."""
    shapes, dtypes, sizes, parts = [], [], [], []
    for array in arrays:
        if array is None:
            shapes.append(None), dtypes.append(None), sizes.append(0)
            continue
        name = _PIXEL_DTYPE_NAMES.get(array.dtype)  # a lookup: numpy's `dtype.name` costs microseconds
        if name is None or array.ndim not in (2, 3):
            raise ValueError(f"pixels must be uint8 or uint16, H x W or H x W x C, got {array.dtype} {array.shape}")
        shapes.append(list(array.shape if array.ndim == 3 else (*array.shape, 1)))
        dtypes.append(name)
        sizes.append(array.nbytes)
        parts.append(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    missing = [array is None for array in arrays]
    validity = pa.array([not gone for gone in missing], pa.bool_()).buffers()[1] if any(missing) else None
    data = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(arrays), [validity, pa.py_buffer(offsets), pa.py_buffer(values)]
    )
    return pa.StructArray.from_arrays(
        [data, pa.array(shapes, pa.list_(pa.int32())), pa.array(dtypes, pa.string())],
        fields=list(PIXELS_TYPE),
        mask=pa.array(missing, pa.bool_()),
    )


def pixel_arrays(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """Every row of a `PIXELS_TYPE` column as a read-only array viewing Arrow's buffer (no copy); a
    one-channel image comes back H x W, as the decoders return grayscale."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    arrays: list[np.ndarray | None] = []
    for chunk in chunks:
        data, shapes, dtypes = chunk.flatten()
        offsets = np.frombuffer(data.buffers()[1], np.int64)[data.offset : data.offset + len(data) + 1]
        values = data.buffers()[2]
        for index, (valid, shape, dtype) in enumerate(
            zip(chunk.is_valid().to_pylist(), shapes.to_pylist(), dtypes.to_pylist(), strict=True)
        ):
            if not valid:
                arrays.append(None)
                continue
            start, end = int(offsets[index]), int(offsets[index + 1])
            array = np.frombuffer(values, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize, offset=start)
            array = array.reshape(shape)
            array.flags.writeable = False  # as it is when the buffer is in Ray's object store
            arrays.append(array[..., 0] if shape[2] == 1 else array)
    return arrays


def is_pixels(column_type: pa.DataType) -> bool:
    """Whether a column holds pixels (a stage after the first) rather than encoded bytes."""
    return column_type == PIXELS_TYPE
