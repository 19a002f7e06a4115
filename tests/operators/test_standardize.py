"""The standardize operator called directly on a few rows, without Ray, and its array decoding."""

from __future__ import annotations

import io
import json
import struct
import zlib

import cv2
import numpy as np
import pyarrow as pa
import pytest
import skimage.data
import tifffile
from PIL import Image
from pydantic import ValidationError
from skimage.exposure import match_histograms
from skimage.metrics import structural_similarity

from operators.images import ImageError, decode_array, encode_array
from operators.standardize import (
    Standardize,
    StandardizeConfig,
    histogram_distance,
    intensity_histogram,
    load_reference,
    match_histogram,
    percentiles,
    reference_from_arrays,
    to_grayscale,
)
from tests.conftest import make_batch

KEEP = {"op": "percentile_clip", "low": 0, "high": 100}  # the identity step


def make_config(*steps: dict, **overrides) -> StandardizeConfig:
    return StandardizeConfig(kind="standardize", steps=list(steps), **overrides)


def run(config: StandardizeConfig, images: list[bytes | None], **kwargs) -> pa.Table:
    return Standardize(config, **kwargs)(make_batch(images))


def saved(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB(A) PNG written by OpenCV, independently of `encode_array`."""
    channels = array.shape[2]
    order = [2, 1, 0, 3][:channels]
    return cv2.imencode(".png", np.ascontiguousarray(array[..., order]))[1].tobytes()


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png16_gray_alpha(gray: np.ndarray) -> bytes:
    """A 16-bit gray+alpha PNG (colour type 4), written chunk by chunk."""
    height, width = gray.shape
    samples = np.dstack([gray, np.full_like(gray, 65535)]).astype(">u2")
    raw = b"".join(b"\x00" + samples[y].tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def decoded(table: pa.Table, index: int = 0) -> Image.Image:
    image = Image.open(io.BytesIO(table.column("image")[index].as_py()))
    image.load()
    return image


def stage(table: pa.Table, index: int = 0) -> dict:
    return table.column("standardize")[index].as_py()


@pytest.fixture(scope="module")
def camera() -> np.ndarray:
    """A real 8-bit photograph, shrunk to 128x128 so each test stays fast."""
    return cv2.resize(skimage.data.camera(), (128, 128), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def ct_slice() -> np.ndarray:
    """pydicom's bundled CT slice (128x128, 16 bits stored, values 128..2191) as uint16."""
    import pydicom
    import pydicom.data

    pixels = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm")).pixel_array
    assert pixels.min() >= 0
    return pixels.astype(np.uint16)


@pytest.fixture(scope="module")
def moon_file(tmp_path_factory) -> str:
    """A reference image file: skimage's moon, dark and narrow-ranged, unlike the camera."""
    path = tmp_path_factory.mktemp("reference") / "moon.png"
    Image.fromarray(cv2.resize(skimage.data.moon(), (128, 128), interpolation=cv2.INTER_AREA)).save(path)
    return str(path)


# --- the 16-bit path, end to end ---


def test_sixteen_bit_gray_stays_sixteen_bit_through_the_chain(ct_slice):
    config = make_config(
        {"op": "percentile_clip"},
        {"op": "normalize"},
        {"op": "clahe"},
        {"op": "resize", "width": 96, "height": 64, "mode": "fit"},
    )
    out = run(config, [saved(Image.fromarray(ct_slice))])
    assert out.column("status").to_pylist() == ["ok"]
    image = decoded(out)
    assert (image.mode, image.size) == ("I;16", (96, 64))
    values = np.asarray(image)
    assert (values[:, :16] == 0).all() and (values[:, 80:] == 0).all()  # padding of the 64x64 image
    assert len(np.unique(values[:, 16:80])) > 2000  # 3884 of 4096 pixels differ; 8 bits would give <= 256
    assert values.max() > 60000
    record = stage(out)
    assert (record["input_dtype"], record["output_dtype"]) == ("uint16", "uint16")
    assert (record["input_channels"], record["output_channels"]) == (1, 1)
    assert [step["op"] for step in json.loads(record["steps"])] == ["percentile_clip", "normalize", "clahe", "resize"]
    assert record["histogram_distance"] is None and record["reference"] is None


def test_ct_slice_keeps_its_levels_and_structure_through_clip_and_normalize(ct_slice):
    out = run(make_config({"op": "percentile_clip"}, {"op": "normalize"}), [saved(Image.fromarray(ct_slice))])
    values = np.asarray(decoded(out))
    assert values.dtype == np.uint16 and (values.min(), values.max()) == (0, 65535)
    assert len(np.unique(values)) > 1000  # the slice has 1453 levels; clipping 1% merges some
    assert np.corrcoef(values.ravel(), ct_slice.ravel())[0, 1] > 0.99


# --- each step's exact behaviour ---


def test_percentile_clip_on_a_ramp():
    ramp = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    out = run(make_config({"op": "percentile_clip"}), [saved(Image.fromarray(ramp))])
    # numpy's linear percentiles of 0..999 are 4.995 and 994.005, rounded to 5 and 994.
    assert np.array_equal(np.asarray(decoded(out)), np.clip(ramp, 5, 994))
    ramp8 = np.arange(201, dtype=np.uint8).reshape(1, 201)
    out = run(make_config({"op": "percentile_clip", "low": 10, "high": 90}), [saved(Image.fromarray(ramp8))])
    assert np.array_equal(np.asarray(decoded(out)), np.clip(ramp8, 20, 180))


def test_percentiles_equal_numpy():
    rng = np.random.default_rng(3)
    quantiles = [0, 0.5, 3.3, 50, 99.5, 100]
    for array in (rng.integers(0, 65536, (37, 41), dtype=np.uint16), rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)):
        assert percentiles(array, quantiles) == pytest.approx(np.percentile(array, quantiles), abs=1e-9)


def test_minmax_maps_min_to_0_and_max_to_full_range():
    values = np.array([[1000, 2000, 3000, 1001]], np.uint16)
    out = np.asarray(decoded(run(make_config({"op": "normalize"}), [saved(Image.fromarray(values))])))
    assert out.tolist() == [[0, 32768, 65535, 33]]  # 2000 -> 32767.5 -> 32768; 1001 -> 32.77 -> 33
    values8 = np.array([[10, 60, 110]], np.uint8)
    out = np.asarray(decoded(run(make_config({"op": "normalize"}), [saved(Image.fromarray(values8))])))
    assert out.tolist() == [[0, 128, 255]]


def test_zscore_maps_mean_plus_minus_range_and_clips_beyond():
    values = np.array([[90, 110] * 4], np.uint16)  # mean 100, std 10
    for zscore_range, expected in ((1, [0, 65535]), (2, [16384, 49151])):
        config = make_config({"op": "normalize", "method": "zscore", "zscore_range": zscore_range})
        out = np.asarray(decoded(run(config, [saved(Image.fromarray(values))])))
        assert out[0, :2].tolist() == expected
    constant = np.full((4, 4), 7, np.uint8)
    out = run(make_config({"op": "normalize", "method": "zscore"}), [saved(Image.fromarray(constant))])
    assert np.array_equal(np.asarray(decoded(out)), constant)  # no spread to stretch: left as is


def test_resize_modes_give_exact_sizes_and_fit_pads_with_pad_value():
    columns = np.tile(np.arange(80, dtype=np.uint16) * 700, (40, 1))  # 80x40, value = 700 x column
    data = saved(Image.fromarray(columns))
    fit = make_config({"op": "resize", "width": 40, "height": 40, "interpolation": "nearest", "pad_value": 0.25})
    out = np.asarray(decoded(run(fit, [data])))
    assert out.shape == (40, 40)
    assert (out[:10] == 16384).all() and (out[30:] == 16384).all()  # round(0.25 x 65535)
    assert np.array_equal(out[10:30], columns[::2, ::2])
    fill = make_config({"op": "resize", "width": 40, "height": 40, "mode": "fill", "interpolation": "nearest"})
    assert np.array_equal(np.asarray(decoded(run(fill, [data]))), columns[:, 20:60])  # centered crop
    for mode, interpolation in (("stretch", "lanczos"), ("fit", "area"), ("fill", "bicubic")):
        config = make_config({"op": "resize", "width": 33, "height": 21, "mode": mode, "interpolation": interpolation})
        out = run(config, [data, saved(Image.new("RGB", (17, 50), (5, 6, 7)))])
        assert (out.column("width").to_pylist(), out.column("height").to_pylist()) == ([33, 33], [21, 21])
        assert [decoded(out, index).size for index in (0, 1)] == [(33, 21), (33, 21)]


def test_clahe_keeps_the_structure_of_a_photo(camera):
    for step in ({"op": "clahe"}, {"op": "normalize", "method": "zscore"}):
        out = np.asarray(decoded(run(make_config(step), [saved(Image.fromarray(camera))])))
        assert np.abs(out.astype(int) - camera).mean() > 5  # the step did change the image
        # Measured about 0.84 for clahe and 0.83 for zscore on this 128x128 camera.
        assert structural_similarity(camera, out, data_range=255) > 0.75
    # The same histogram with the structure destroyed scores near zero, so the bound means something.
    shuffled = np.random.default_rng(0).permutation(camera.ravel()).reshape(camera.shape)
    assert structural_similarity(camera, shuffled, data_range=255) < 0.1


def test_clahe_on_colour_keeps_8_and_16_bits(camera):
    rgb8 = np.dstack([camera, camera[::-1], camera.T])
    out = run(make_config({"op": "clahe"}), [saved(Image.fromarray(rgb8)), png16_rgb(rgb8.astype(np.uint16) * 257)])
    assert out.column("status").to_pylist() == ["ok", "ok"]
    assert decoded(out, 0).mode == "RGB"
    sixteen = decode_array(out.column("image")[1].as_py())
    assert sixteen.dtype == np.uint16 and sixteen.shape == (128, 128, 3)


# --- histogram matching ---


def test_histogram_match_to_a_file_reduces_the_distance(camera, moon_file):
    out = run(make_config({"op": "histogram_match", "reference": moon_file}), [saved(Image.fromarray(camera))])
    record = stage(out)
    reference = load_reference(moon_file)
    assert record["reference"] == moon_file
    assert record["input_histogram_distance"] == histogram_distance(camera, reference) > 0.1
    assert record["histogram_distance"] < 0.01
    output = decode_array(out.column("image")[0].as_py())
    assert record["histogram_distance"] == histogram_distance(output, reference)
    # The distance to the moon image itself, through the array form of the reference.
    with open(moon_file, "rb") as handle:
        moon = decode_array(handle.read())
    assert histogram_distance(output, moon) == pytest.approx(record["histogram_distance"], abs=1e-12)


def test_histogram_match_to_a_folder_pools_its_images(tmp_path, camera):
    images = {
        "moon.png": cv2.resize(skimage.data.moon(), (64, 64)),
        "deeper/coins.png": cv2.resize(skimage.data.coins(), (48, 40)),
        "astronaut.jpg": skimage.data.astronaut()[::8, ::8],
    }
    for name, array in images.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(array).save(tmp_path / name, quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    reference = load_reference(str(tmp_path))
    arrays = [decode_array((tmp_path / name).read_bytes()) for name in sorted(images)]
    pooled = reference_from_arrays(arrays)
    assert reference.images == 3
    assert np.array_equal(reference.gray, pooled.gray) and np.array_equal(reference.color, pooled.color)
    config = make_config({"op": "histogram_match", "reference": str(tmp_path)})
    photo = np.dstack([camera, camera[::-1], camera.T])
    out = run(config, [saved(Image.fromarray(camera)), saved(Image.fromarray(photo))])
    for index, source in enumerate((camera, photo)):
        record = stage(out, index)
        assert record["histogram_distance"] < 0.01 < record["input_histogram_distance"]
        assert record["input_histogram_distance"] == histogram_distance(source, reference)
        output = decode_array(out.column("image")[index].as_py())
        assert record["histogram_distance"] == histogram_distance(output, reference)


def test_histogram_match_follows_skimage(camera):
    template = to_grayscale(skimage.data.astronaut())
    ours = match_histogram(camera, reference_from_arrays([template]))
    theirs = np.rint(match_histograms(camera, template))
    assert np.array_equal(ours, theirs)


def test_histogram_match_keeps_sixteen_bits_against_an_8_bit_reference(ct_slice, moon_file):
    out = run(make_config({"op": "histogram_match", "reference": moon_file}), [saved(Image.fromarray(ct_slice))])
    values = np.asarray(decoded(out))
    assert values.dtype == np.uint16 and values.max() > 255 * 100  # the reference is scaled, not copied
    assert len(np.unique(values)) > 256
    assert stage(out)["histogram_distance"] < 0.01


def test_histogram_distance_bounds_and_histogram_input():
    black, white = np.zeros((4, 4), np.uint8), np.full((4, 4), 65535, np.uint16)
    assert histogram_distance(black, black) == 0
    assert histogram_distance(black, white) == 255 / 256
    assert histogram_distance(white, intensity_histogram(white)) == 0
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    assert intensity_histogram(ramp).tolist() == [256] * 256
    assert histogram_distance(ramp, (ramp // 257).astype(np.uint8)) < 0.005


def test_histogram_match_reference_on_s3(s3_bucket, camera, moon_file):
    from jobs.config import StorageConfig

    bucket, storage, client = s3_bucket
    with open(moon_file, "rb") as handle:
        client.put_object(Bucket=bucket, Key="refs/a/moon.png", Body=handle.read())
    client.put_object(Bucket=bucket, Key="refs/readme.txt", Body=b"skipped")
    config = make_config({"op": "histogram_match", "reference": f"s3://{bucket}/refs"})
    options = StorageConfig(**storage).storage_options()
    out = run(config, [saved(Image.fromarray(camera))], model_storage_options=options)
    assert out.column("status").to_pylist() == ["ok"]
    output = decode_array(out.column("image")[0].as_py())
    assert stage(out)["histogram_distance"] == histogram_distance(output, load_reference(moon_file))
    assert stage(out)["reference"] == f"s3://{bucket}/refs"


def test_missing_reference_fails_setup_with_its_uri(tmp_path):
    config = make_config({"op": "histogram_match", "reference": str(tmp_path / "none")})
    with pytest.raises(ValueError, match=r"reference .*none is neither an image file nor a folder holding files"):
        Standardize(config)


# --- output conversions, rows and decoding ---


def test_output_dtype_uint8_converts_sixteen_bit_to_8_bit_gray():
    values = np.array([[0, 128, 129, 385, 386, 65535]], np.uint16)
    out = run(make_config(KEEP, output_dtype="uint8"), [saved(Image.fromarray(values))])
    image = decoded(out)
    assert image.mode == "L"
    assert np.asarray(image).tolist() == [[0, 0, 1, 1, 2, 255]]  # value / 257, rounded
    assert (stage(out)["input_dtype"], stage(out)["output_dtype"]) == ("uint16", "uint8")


def test_output_mode_and_uint16_output():
    orange = saved(Image.new("RGB", (3, 2), (200, 100, 50)))
    out = run(make_config(KEEP, output_mode="grayscale", output_dtype="uint16"), [orange])
    assert decoded(out).mode == "I;16"
    assert np.asarray(decoded(out)).tolist() == [[124 * 257] * 3] * 2  # 0.299 x 200 + 0.587 x 100 + 0.114 x 50
    out = run(make_config(KEEP, output_mode="rgb"), [saved(Image.new("L", (3, 2), 9)), orange])
    assert [decoded(out, index).mode for index in (0, 1)] == ["RGB", "RGB"]
    assert stage(out, 0)["output_channels"] == 3


def test_sixteen_bit_rgb_png_round_trip_is_exact():
    rng = np.random.default_rng(5)
    rgb = (rng.integers(0, 32768, (9, 7, 3)) * 2 + 1).astype(np.uint16)  # odd values, most above 255
    assert np.array_equal(decode_array(png16_rgb(rgb)), rgb)
    assert np.array_equal(decode_array(png16_rgb(np.dstack([rgb, rgb[..., :1]]))), rgb)  # alpha dropped
    encoded = encode_array(rgb)
    assert np.array_equal(cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1], rgb)
    assert np.array_equal(decode_array(encoded), rgb)
    out = run(make_config(KEEP), [png16_rgb(rgb)])
    assert np.array_equal(decode_array(out.column("image")[0].as_py()), rgb)
    assert stage(out)["input_dtype"] == "uint16" and stage(out)["input_channels"] == 3
    gray = rgb[..., 0]
    assert np.array_equal(decode_array(encode_array(gray)), gray)
    assert Image.open(io.BytesIO(encode_array(gray))).mode == "I;16"
    assert np.array_equal(decode_array(png16_gray_alpha(gray)), gray)


@pytest.mark.parametrize(
    "options",
    [{"compression": "zlib"}, {"compression": "zlib", "planarconfig": "separate"}, {"extrasamples": ["unassalpha"]}],
)
def test_sixteen_bit_rgb_tiff_is_not_crushed(options):
    rgb = (np.arange(6 * 5 * 3).reshape(6, 5, 3) * 1000 + 7).astype(np.uint16)
    data = np.dstack([rgb, rgb[..., :1]]) if "extrasamples" in options else rgb
    if options.get("planarconfig") == "separate":
        data = np.moveaxis(data, -1, 0)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, data, photometric="rgb", **options)
    assert np.array_equal(decode_array(buffer.getvalue()), rgb)


def test_sixteen_bit_rgb_orientation_is_applied():
    rgb = (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 1000 + 7).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    png = png16_rgb(rgb)
    with_exif = png[:33] + chunk(b"eXIf", exif.tobytes().removeprefix(b"Exif\x00\x00")) + png[33:]  # after IHDR
    assert np.array_equal(decode_array(with_exif), np.rot90(rgb, -1))
    for options in ({}, {"planarconfig": "separate"}):
        buffer = io.BytesIO()
        data = np.moveaxis(rgb, -1, 0) if options else rgb
        tifffile.imwrite(buffer, data, photometric="rgb", extratags=[(274, "H", 1, 6, True)], **options)
        assert np.array_equal(decode_array(buffer.getvalue()), np.rot90(rgb, -1))  # 90 degrees clockwise


@pytest.mark.parametrize(
    ("mode", "shape"),
    [("1", (6, 8)), ("L", (6, 8)), ("LA", (6, 8)), ("P", (6, 8, 3)), ("RGB", (6, 8, 3)), ("RGBA", (6, 8, 3))],
)
def test_eight_bit_modes_become_gray_or_rgb(mode, shape):
    array = decode_array(saved(Image.new(mode, (8, 6))))
    assert (array.dtype, array.shape) == (np.uint8, shape)


def test_cmyk_ycbcr_and_big_endian_sixteen_bit():
    assert decode_array(saved(Image.new("CMYK", (8, 6)), "JPEG")).shape == (6, 8, 3)
    assert decode_array(saved(Image.new("YCbCr", (8, 6)), "JPEG")).shape == (6, 8, 3)
    values = np.array([[1, 300, 65535]], np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, values, byteorder=">")
    array = decode_array(buffer.getvalue())
    assert array.dtype == np.uint16 and array.tolist() == [[1, 300, 65535]]


def test_orientation_is_applied_to_eight_bit():
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("L", (40, 20)).save(buffer, format="PNG", exif=exif.tobytes())
    assert decode_array(buffer.getvalue()).shape == (40, 20)


def test_bad_rows_become_error_rows_and_good_rows_survive():
    in_range = Image.fromarray(np.array([[0, 65535]], np.int32))
    too_wide = Image.fromarray(np.array([[-3, 70000]], np.int32))
    float_image = Image.fromarray(np.ones((4, 4), np.float32))
    images = [
        saved(Image.new("RGB", (8, 6))),
        saved(float_image, "TIFF"),
        saved(too_wide, "TIFF"),
        saved(in_range, "TIFF"),
        b"",
        b"not an image",
    ]
    out = run(make_config({"op": "normalize"}), images)
    assert out.column("status").to_pylist() == ["ok", "error", "error", "ok", "error", "error"]
    errors = out.column("error").to_pylist()
    assert errors[1] == "image mode F: 32-bit float images are not supported; accepted: 8-bit and 16-bit integers"
    assert "mode I holds 32-bit integers in [-3, 70000]; only values in 0..65535" in errors[2]
    assert "image is empty" in errors[4] and "cannot decode image" in errors[5]
    assert np.asarray(decoded(out, 3)).tolist() == [[0, 65535]]
    assert stage(out, 1)["steps"] == stage(out, 0)["steps"] and stage(out, 1)["input_dtype"] is None


def test_step_failure_fails_only_its_row(monkeypatch, camera):
    operator = Standardize(make_config({"op": "clahe"}))

    def fail_on_small(array, clip_limit, tile_grid_size):
        if array.shape[0] < 10:
            raise cv2.error("simulated failure")
        return array

    monkeypatch.setattr("operators.standardize.clahe", fail_on_small)
    out = operator(make_batch([saved(Image.new("L", (4, 4))), saved(Image.fromarray(camera))]))
    assert out.column("status").to_pylist() == ["error", "ok"]
    assert out.column("error")[0].as_py() == "steps[0] (clahe) failed on a uint8 (4, 4) image: simulated failure"


def test_oversized_image_is_refused():
    out = run(
        make_config(KEEP), [saved(Image.new("L", (64, 64))), saved(Image.new("L", (8, 8)))], max_image_pixels=4095
    )
    assert out.column("status").to_pylist() == ["error", "ok"]
    assert "64x64 = 4096 pixels, over the limit of 4095" in out.column("error")[0].as_py()


def test_columns_pass_through():
    out = Standardize(make_config(KEEP))(make_batch([saved(Image.new("L", (8, 6)))], caption=pa.array(["x"])))
    assert out.column_names == [
        "id",
        "image",
        "status",
        "error",
        "caption",
        "variant_index",
        "seed",
        "width",
        "height",
        "standardize",
    ]
    assert out.column("caption").to_pylist() == ["x"]


# --- config ---


@pytest.mark.parametrize(
    ("steps", "overrides", "fragment"),
    [
        ([{"op": "percentile_clip", "low": 99, "high": 10}], {}, "low must be below high, got low=99 >= high=10"),
        ([{"op": "percentile_clip", "low": 5, "high": 5}], {}, "got low=5 >= high=5"),
        ([{"op": "percentile_clip", "high": 101}], {}, "less than or equal to 100"),
        (
            [{"op": "sharpen"}],
            {},
            "does not match any of the expected tags: "
            "'percentile_clip', 'normalize', 'histogram_match', 'clahe', 'resize'",
        ),
        ([], {}, "at least 1 item"),
        ([{"op": "resize", "width": 0, "height": 8}], {}, "greater than or equal to 1"),
        ([{"op": "normalize", "method": "median"}], {}, "'minmax' or 'zscore'"),
        ([{"op": "clahe", "extra": 1}], {}, "Extra inputs are not permitted"),
        (
            [KEEP],
            {"num_gpus": 1},
            "standardize runs on the CPU; num_gpus must be 0 and device auto or cpu, got num_gpus=1",
        ),
        ([KEEP], {"output_dtype": "float32"}, "'keep', 'uint8' or 'uint16'"),
        (
            [{"op": "histogram_match", "reference": "ftp://host/refs"}],
            {},
            "reference must be a local path, file:// or a remote store's URI",
        ),
    ],
)
def test_config_rejects_bad_values(steps, overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        StandardizeConfig(kind="standardize", steps=steps, **overrides)


def test_decode_array_refuses_what_decode_image_refuses():
    with pytest.raises(ImageError, match="300x300 = 90000 pixels, over the limit of 1000"):
        decode_array(saved(Image.new("L", (300, 300))), max_pixels=1000)
    with pytest.raises(ImageError, match="image is empty"):
        decode_array(None)
