"""NIfTI volumes read slice by slice, without Ray: generated with nibabel, checked against its own reading."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from operators.nifti import RECORD_TYPE, NiftiConfig, read_slices, slice_count
from operators.rows import RowError

SHAPE = (4, 5, 6)
# An oblique-free reordering with voxel sizes float32 holds exactly, so the recorded affine equals it.
AFFINE = np.array([[0.0, 0.0, -2.5, 90.0], [0.75, 0.0, 0.0, -126.0], [0.0, 0.875, 0.0, -72.0], [0, 0, 0, 1]])
SENTINEL = "DOE^JANE 19700101"


def volume_bytes(data: np.ndarray, version: int = 1, gz: bool = False, endianness: str = "<", **scaling) -> bytes:
    kind = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    header = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)(endianness=endianness)
    image = kind(data, AFFINE, header=header)
    image.header.set_data_dtype(data.dtype)
    image.header["descrip"] = SENTINEL.encode()
    if scaling:
        image.header.set_slope_inter(scaling["slope"], scaling["inter"])
    raw = image.to_bytes()
    return gzip.compress(raw) if gz else raw


def stored(raw: bytes) -> np.ndarray:
    """The stored voxel values as nibabel reads them, unscaled."""
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    kind = nib.Nifti1Image if struct.unpack("<i", raw[:4])[0] in (348, 1543569408) else nib.Nifti2Image
    return np.asarray(kind.from_bytes(raw).dataobj.get_unscaled())


def int16_volume() -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) * 97 - 1024).astype(np.int16)


def check_record(record: dict, index: int, axis: int, shape=SHAPE) -> None:
    assert set(record) == set(RECORD_TYPE.names)
    pa.array([record], type=RECORD_TYPE)  # the record fits its Arrow type
    assert record["affine"] == AFFINE.ravel().tolist()
    assert (record["slice_index"], record["axis"], record["shape"]) == (index, axis, list(shape))


@pytest.mark.parametrize("gz", [False, True], ids=["nii", "nii.gz"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_int16_slices_are_the_stored_values_shifted(axis, gz):
    data = int16_volume()
    raw = volume_bytes(data, gz=gz)
    count = SHAPE[axis]
    results = read_slices(raw, NiftiConfig(axis=axis), range(count))
    for index, (pixels, record) in enumerate(results):
        expected = np.take(stored(raw), index, axis=axis)
        assert pixels.dtype == np.uint16 and pixels.flags.c_contiguous
        assert pixels.shape == expected.shape == tuple(n for i, n in enumerate(SHAPE) if i != axis)
        assert np.array_equal(pixels.astype(np.int64) - 32768, expected)
        check_record(record, index, axis)
        assert (record["data_dtype"], record["stored_offset"]) == ("int16", 32768)
        assert np.array_equal(pixels * record["value_scale"] + record["value_offset"], expected)


def test_rows_and_columns_follow_the_remaining_voxel_axes():
    data = int16_volume()
    raw = volume_bytes(data)
    (pixels0, _), (pixels1, _), (pixels2, _) = (read_slices(raw, NiftiConfig(axis=axis), [3])[0] for axis in (0, 1, 2))
    assert pixels0[1, 2] == int(data[3, 1, 2]) + 32768
    assert pixels1[1, 2] == int(data[1, 3, 2]) + 32768
    assert pixels2[1, 2] == int(data[1, 2, 3]) + 32768


@pytest.mark.parametrize(
    ("dtype", "out", "offset"),
    [(np.uint8, np.uint8, 0), (np.int8, np.uint8, 128), (np.uint16, np.uint16, 0)],
)
def test_small_integer_types_are_exact(dtype, out, offset):
    info = np.iinfo(dtype)
    data = np.linspace(info.min, info.max, np.prod(SHAPE)).astype(dtype).reshape(SHAPE)
    raw = volume_bytes(data, gz=True)
    pixels, record = read_slices(raw, NiftiConfig(), [5])[0]
    assert pixels.dtype == out
    assert np.array_equal(pixels.astype(np.int64) - offset, data[:, :, 5])
    assert (record["data_dtype"], record["stored_offset"]) == (np.dtype(dtype).name, offset)
    assert (record["value_scale"], record["value_offset"]) == (1.0, float(-offset))


def test_scaled_int16_records_the_scaling_and_keeps_stored_values():
    data = int16_volume()
    raw = volume_bytes(data, slope=2, inter=-1024)
    assert struct.unpack("<2f", raw[112:120]) == (2.0, -1024.0)  # written into the file as asked
    pixels, record = read_slices(raw, NiftiConfig(axis=1), [2])[0]
    assert np.array_equal(pixels.astype(np.int64) - 32768, data[:, 2, :])  # not scaled
    assert (record["scl_slope"], record["scl_inter"]) == (2.0, -1024.0)
    real = nib.Nifti1Image.from_bytes(raw).get_fdata()[:, 2, :]
    value = pixels * record["value_scale"] + record["value_offset"]
    assert np.array_equal(value * record["scl_slope"] + record["scl_inter"], real)


def test_unscaled_header_records_null_scaling():
    raw = bytearray(volume_bytes(int16_volume()))
    raw[112:120] = struct.pack("<2f", 0.0, 5.0)  # slope 0: no scaling, whatever the intercept
    _, record = read_slices(bytes(raw), NiftiConfig(), [0])[0]
    assert (record["scl_slope"], record["scl_inter"]) == (None, None)


@pytest.mark.parametrize("gz", [False, True], ids=["nii", "nii.gz"])
def test_float_volume_maps_linearly_within_half_a_step(gz):
    rng = np.random.default_rng(0)
    data = rng.normal(0, 300, SHAPE).astype(np.float32)
    raw = volume_bytes(data, gz=gz)
    low, high = float(data.min()), float(data.max())
    pixels = []
    for index, (slice_pixels, record) in enumerate(read_slices(raw, NiftiConfig(), range(SHAPE[2]))):
        check_record(record, index, 2)
        assert slice_pixels.dtype == np.uint16
        assert (record["data_dtype"], record["stored_offset"]) == ("float32", 0)
        assert record["value_offset"] == low and record["value_scale"] == pytest.approx((high - low) / 65535)
        value = slice_pixels * record["value_scale"] + record["value_offset"]
        assert np.abs(value - data[:, :, index]).max() <= record["value_scale"] / 2 * (1 + 1e-9)
        pixels.append(slice_pixels)
    assert (min(p.min() for p in pixels), max(p.max() for p in pixels)) == (0, 65535)  # the volume's range


def test_float_volume_non_finite_values():
    data = np.linspace(-1, 1, np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    data[0, 0, 0], data[1, 0, 0], data[2, 0, 0] = np.nan, np.inf, -np.inf
    pixels, record = read_slices(volume_bytes(data), NiftiConfig(), [0])[0]
    assert pixels[:3, 0].tolist() == [0, 65535, 0]
    assert record["value_offset"] == float(data[np.isfinite(data)].min())


def test_constant_float_volume():
    pixels, record = read_slices(volume_bytes(np.full(SHAPE, 7.5, np.float32)), NiftiConfig(), [1])[0]
    assert not pixels.any() and (record["value_scale"], record["value_offset"]) == (1.0, 7.5)


def test_wider_integers_exact_when_they_fit_else_linear():
    narrow = int16_volume().astype(np.int32)
    pixels, record = read_slices(volume_bytes(narrow), NiftiConfig(), [2])[0]
    assert np.array_equal(pixels.astype(np.int64) - 32768, narrow[:, :, 2]) and record["stored_offset"] == 32768
    wide = narrow * 1000
    pixels, record = read_slices(volume_bytes(wide), NiftiConfig(), [2])[0]
    assert record["stored_offset"] == 0 and record["value_offset"] == float(wide.min())
    value = pixels * record["value_scale"] + record["value_offset"]
    assert np.abs(value - wide[:, :, 2]).max() <= record["value_scale"] / 2 * (1 + 1e-9)


def test_nifti2_big_endian_and_rgb():
    data = int16_volume()
    for raw in (volume_bytes(data, version=2), volume_bytes(data, endianness=">")):
        pixels, record = read_slices(raw, NiftiConfig(), [4])[0]
        assert np.array_equal(pixels.astype(np.int64) - 32768, data[:, :, 4]) and record["data_dtype"] == "int16"
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = 10, 20, 30
    pixels, record = read_slices(volume_bytes(rgb), NiftiConfig(axis=0), [0])[0]
    assert pixels.shape == (5, 6, 3) and pixels.dtype == np.uint8 and pixels[2, 3].tolist() == [10, 20, 30]
    assert record["data_dtype"] == "rgb24"


def test_single_volume_4d_is_read_and_multi_volume_refused():
    data = int16_volume()
    pixels, record = read_slices(volume_bytes(data[..., None]), NiftiConfig(), [1])[0]
    assert np.array_equal(pixels.astype(np.int64) - 32768, data[:, :, 1]) and record["shape"] == [4, 5, 6, 1]
    raw = volume_bytes(np.stack([data, data], axis=3))
    message = "a 4D image of shape (4, 5, 6, 2): only 3D volumes (or 4D with a single volume) are read; split it"
    assert [str(error)[: len(message)] for error in read_slices(raw, NiftiConfig(), [0, 1])] == [message, message]
    with pytest.raises(RowError, match=r"shape \(4, 5, 6, 2\)"):
        slice_count(raw[:348], NiftiConfig())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_count_from_the_header_bytes_alone(axis):
    config = NiftiConfig(axis=axis)
    data = np.random.default_rng(1).integers(-2000, 2000, (40, 50, 60), dtype=np.int16)
    assert slice_count(volume_bytes(data)[:348], config) == data.shape[axis]
    assert slice_count(volume_bytes(data, version=2)[:540], config) == data.shape[axis]
    assert slice_count(volume_bytes(data, endianness=">")[:348], config) == data.shape[axis]
    gz = volume_bytes(data, gz=True)
    assert len(gz) > 100_000
    assert slice_count(gz[:1024], config) == data.shape[axis]


def test_slice_count_refusals():
    config = NiftiConfig()
    with pytest.raises(RowError, match="^truncated NIfTI header: 200 of 348 bytes$"):
        slice_count(volume_bytes(int16_volume())[:200], config)
    with pytest.raises(RowError, match="^not a NIfTI-1 or NIfTI-2 file$"):
        slice_count(b"\x89PNG\r\n\x1a\n" + bytes(400), config)
    with pytest.raises(RowError, match="^truncated NIfTI header: 0 bytes after decompression$"):
        slice_count(volume_bytes(int16_volume(), gz=True)[:10], config)
    with pytest.raises(RowError, match="^truncated NIfTI header: 100 of 348 bytes$"):
        slice_count(gzip.compress(volume_bytes(int16_volume())[:100]), config)
    with pytest.raises(RowError, match="^corrupt gzip stream$"):
        slice_count(b"\x1f\x8b" + bytes(400), config)
    with pytest.raises(RowError, match=r"^a 2D image of shape \(4, 5\), not a volume"):
        slice_count(volume_bytes(int16_volume()[:, :, 0])[:348], config)


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    raw = volume_bytes(int16_volume())
    pair = bytearray(raw)
    pair[344:348] = b"ni1\x00"
    analyze = bytearray(raw)
    analyze[344:348] = bytes(4)
    complex_volume = volume_bytes(np.zeros(SHAPE, np.complex64))
    return {
        "truncated header": (raw[:300], "truncated NIfTI header: 300 of 348 bytes"),
        "png": (b"\x89PNG\r\n\x1a\n" + bytes(500), "not a NIfTI-1 or NIfTI-2 file"),
        "empty": (b"", "not a NIfTI-1 or NIfTI-2 file"),
        "analyze": (bytes(analyze), "not a NIfTI-1 or NIfTI-2 file"),
        "pair": (bytes(pair), "a NIfTI .hdr/.img pair header: only single-file .nii or .nii.gz volumes are read"),
        "truncated data": (
            raw[:500],
            "truncated NIfTI data: 240 bytes of voxels from offset 352, the file has 500 bytes",
        ),
        "truncated gzip": (gzip.compress(raw)[:-20], "truncated gzip stream"),
        "corrupt gzip": (b"\x1f\x8b" + bytes(300), "corrupt gzip stream"),
        "2D": (volume_bytes(int16_volume()[:, :, 0]), "a 2D image of shape (4, 5), not a volume: only 3D volumes"),
        "complex": (complex_volume, "unsupported NIfTI data type complex64: integer, float or RGB24 data is read"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_gives_one_error_per_asked_slice(case):
    data, message = bad_inputs()[case]
    results = read_slices(data, NiftiConfig(), [0, 1])
    assert len(results) == 2
    for error in results:
        assert isinstance(error, RowError) and str(error).startswith(message)


def test_index_past_the_slice_count():
    results = read_slices(volume_bytes(int16_volume()), NiftiConfig(axis=1), [4, 5, -1])
    assert isinstance(results[0], tuple)
    assert [str(error) for error in results[1:]] == [
        "slice 5 is past the volume's 5 slices along axis 1",
        "slice -1 is past the volume's 5 slices along axis 1",
    ]


def test_header_text_never_travels():
    results = read_slices(volume_bytes(int16_volume(), gz=True), NiftiConfig(), [0, 9])
    assert "DOE" not in repr(results)


def test_config_refuses_other_axes():
    with pytest.raises(ValidationError, match="axis"):
        NiftiConfig(axis=3)
    with pytest.raises(ValidationError, match="extra"):
        NiftiConfig(volume=0)
