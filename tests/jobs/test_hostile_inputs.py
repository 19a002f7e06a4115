"""Hostile inputs through img2img and standardize, called directly and in one whole job.

The corpus is built here, small and in memory: decompression bombs (over the configured limit, and a
PNG whose header claims 100000x100000), truncated, empty and random data, content that disagrees
with its name, every EXIF orientation, the odd 8-bit modes, 16- and 32-bit integer and float data,
an animated GIF, a multi-page TIFF, extreme aspect ratios and a single pixel. Each item must get the
behaviour the README documents: an ok row of the documented size, or an error row with a clear reason.
"""

from __future__ import annotations

import glob
import io
import json
import random
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.config import validate_config
from jobs.pipeline import run_job
from operators.images import ImageError, decode_image
from operators.img2img import Img2Img, Img2ImgConfig
from operators.standardize import Standardize, StandardizeConfig
from tests.conftest import write_image_parquet

# The pixel limit every operator and the job run under: the 300x300 bomb is over it, every other
# decodable item (the 5x3001 and 4000x8 strips included) is under it.
MAX_PIXELS = 50_000

# A 16-bit ramp with 2048 distinct levels in 1000..33752, so a stretch to the full 16-bit range is
# visible and an 8-bit round trip (at most 256 levels) cannot hide.
RAMP = (1000 + 16 * np.arange(64 * 32, dtype=np.int64)).reshape(32, 64)
RGB16 = np.dstack([RAMP, RAMP[::-1], RAMP[:, ::-1]]).astype(np.uint16)

# Where the stored image's top-left pixel appears once the EXIF orientation is applied (EXIF 2.3,
# tag 0x0112: 1 top-left, 2 top-right, 3 bottom-right, 4 bottom-left, 5 left-top, 6 right-top,
# 7 right-bottom, 8 left-bottom; for 5..8 the stored first row becomes a column).
ORIENTED_CORNER = {1: "tl", 2: "tr", 3: "br", 4: "bl", 5: "tl", 6: "tr", 7: "br", 8: "bl"}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def header_bomb(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG header claiming width x height, followed by one tiny IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def oriented_jpeg(orientation: int) -> bytes:
    """A 32x16 gray JPEG with a red 8x8 block at its stored top-left, tagged with an EXIF orientation."""
    pixels = np.full((16, 32, 3), 128, np.uint8)
    pixels[:8, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95, subsampling=0)


def hostile_corpus() -> dict[str, bytes]:
    """Every hostile input by id; all small and built in milliseconds."""
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png, jpeg = encode(Image.fromarray(noise)), encode(Image.fromarray(noise), "JPEG")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # the first frame or page is red
    frames = [Image.new("RGB", (16, 16), color).convert("P") for color in colors]
    pages = [Image.new("RGB", (16, 16), color) for color in colors]
    corpus = {
        "bomb_over_limit.png": encode(Image.new("1", (300, 300))),  # 90000 pixels in 91 bytes
        "bomb_header.png": header_bomb(100_000, 100_000),
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "zero_bytes.png": b"",
        "random_bytes.png": random.Random(0).randbytes(512),
        "jpeg_content.png": encode(Image.new("RGB", (24, 16), (10, 200, 30)), "JPEG"),
        **{f"orientation_{n}.jpg": oriented_jpeg(n) for n in range(1, 9)},
        "cmyk.jpg": encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "palette_transparency.png": encode(palette, transparency=0),
        "la.png": encode(Image.new("LA", (16, 16), (100, 50))),
        "rgba.png": encode(Image.new("RGBA", (16, 16), (10, 20, 30, 40))),
        "gray16.png": encode(Image.fromarray(RAMP.astype(np.uint16))),
        "int32_within_16_bits.tif": encode(Image.fromarray(RAMP.astype(np.int32)), "TIFF"),
        "int32_beyond_16_bits.tif": encode(Image.fromarray(RAMP.astype(np.int32) * 4), "TIFF"),
        "float32.tif": encode(Image.fromarray(RAMP.astype(np.float32) / 65535), "TIFF"),
        # A 16-bit colour PNG, which Pillow alone would read as 8 bits; OpenCV takes BGR.
        "rgb16.png": cv2.imencode(".png", RGB16[..., ::-1].copy())[1].tobytes(),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0),
        "multipage.tif": encode(pages[0], "TIFF", save_all=True, append_images=pages[1:]),
        "tall_5x3001.png": encode(Image.new("L", (5, 3001), 77)),
        "wide_4000x8.png": encode(Image.new("L", (4000, 8), 77)),
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (5, 6, 7))),
    }
    return corpus


@dataclass(frozen=True)
class Expected:
    """What an operator must make of one item: an ok row of `size` (width, height), or an error
    row whose message contains `error`."""

    size: tuple[int, int] | None = None
    error: str | None = None


def ok(width: int, height: int) -> Expected:
    return Expected(size=(width, height))


def fails(fragment: str) -> Expected:
    return Expected(error=fragment)


def crushed(mode: str) -> str:
    return f"image mode {mode} holds more than 8 bits per sample; converting it to 8-bit RGB would crush it"


# Unusable data: the same reason in every operator.
UNUSABLE = {
    "bomb_over_limit.png": fails(
        f"image is 300x300 = 90000 pixels, over the limit of {MAX_PIXELS} (source.max_image_pixels)"
    ),
    "bomb_header.png": fails(
        f"image is 100000x100000 = 10000000000 pixels, over the limit of {MAX_PIXELS} (source.max_image_pixels)"
    ),
    "truncated.png": fails("cannot decode image: OSError: image file is truncated"),
    "truncated.jpg": fails("cannot decode image: OSError: image file is truncated"),
    "zero_bytes.png": fails("image is empty (no bytes)"),
    "random_bytes.png": fails("cannot decode image: UnidentifiedImageError: cannot identify image"),
}
EIGHT_BIT = {
    "jpeg_content.png": ok(24, 16),  # the content decides, not the name
    **{f"orientation_{n}.jpg": ok(32, 16) if n < 5 else ok(16, 32) for n in range(1, 9)},
    "cmyk.jpg": ok(16, 16),
    "palette_transparency.png": ok(16, 16),
    "la.png": ok(16, 16),
    "rgba.png": ok(16, 16),
    "animated.gif": ok(16, 16),
    "multipage.tif": ok(16, 16),
    "wide_4000x8.png": ok(4000, 8),
}
# Sizes after img2img's size policy: aspect kept, each side rounded to a multiple of 8 (at least 8).
IMG2IMG = {
    **UNUSABLE,
    **EIGHT_BIT,
    "gray16.png": fails(crushed("I;16")),
    "int32_within_16_bits.tif": fails(crushed("I")),
    "int32_beyond_16_bits.tif": fails(crushed("I")),
    "float32.tif": fails(crushed("F")),
    "rgb16.png": fails("converting it to 8-bit RGB would crush it"),
    "tall_5x3001.png": ok(8, 3000),
    "one_pixel.png": ok(8, 8),
}
STANDARDIZE = {
    **UNUSABLE,
    **EIGHT_BIT,
    "gray16.png": ok(64, 32),
    "int32_within_16_bits.tif": ok(64, 32),
    "int32_beyond_16_bits.tif": fails(
        "image mode I holds 32-bit integers in [4000, 135008]; only values in 0..65535 are accepted"
    ),
    "float32.tif": fails("image mode F: 32-bit float images are not supported"),
    "rgb16.png": ok(64, 32),
    "tall_5x3001.png": ok(5, 3001),
    "one_pixel.png": ok(1, 1),
}
SIXTEEN_BIT = ("gray16.png", "int32_within_16_bits.tif", "rgb16.png")


def cases(operator: str, expected: dict[str, Expected]) -> list:
    return [pytest.param(name, outcome, id=name) for name, outcome in expected.items()]


def corner_of_red_block(array: np.ndarray) -> list[str]:
    """The corners whose 4x4 patch is red."""
    patches = {"tl": array[:4, :4], "tr": array[:4, -4:], "bl": array[-4:, :4], "br": array[-4:, -4:]}
    return [name for name, patch in patches.items() if patch[..., 0].mean() > 200 and patch[..., 1].mean() < 60]


def decoded_png(data: bytes) -> np.ndarray:
    """An output PNG at its stored depth, RGB order for colour."""
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return array if array.ndim == 2 else np.ascontiguousarray(array[..., ::-1])


def batch_of(corpus: dict[str, bytes]) -> pa.Table:
    return pa.table({"id": pa.array(list(corpus), pa.string()), "image": pa.array(list(corpus.values()), pa.binary())})


def rows_by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


def check_row(row: dict, expected: Expected) -> None:
    if expected.error is not None:
        assert (row["status"], row["image"], row["width"]) == ("error", None, None)
        assert expected.error in row["error"]
    else:
        assert (row["status"], row["error"]) == ("ok", None)
        assert (row["width"], row["height"]) == expected.size


@pytest.fixture(scope="module")
def corpus() -> dict[str, bytes]:
    return hostile_corpus()


def test_corpus_has_an_expectation_for_every_item(corpus):
    assert sorted(corpus) == sorted(IMG2IMG) == sorted(STANDARDIZE)
    assert max(len(data) for data in corpus.values()) < 20_000


# -- decompression bombs ------------------------------------------------------------------------

DECODE_IN_FRESH_PROCESS = """
import resource, sys
from operators.images import ImageError, decode_array, decode_image
data = sys.stdin.buffer.read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
messages = []
for decode in (decode_image, decode_array):
    try:
        decode(data)
    except ImageError as error:
        messages.append(str(error))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
print(len(messages))
"""


def test_header_bomb_is_refused_without_allocating(corpus):
    # A fresh process, so that the peak RSS of earlier tests (models, Ray) cannot mask a new peak;
    # decoding the 100000x100000 grayscale image it claims would take 10 GB.
    result = subprocess.run(
        [sys.executable, "-c", DECODE_IN_FRESH_PROCESS],
        input=corpus["bomb_header.png"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        check=True,
    )
    growth_kilobytes, refusals = (int(line) for line in result.stdout.split())
    assert refusals == 2
    assert growth_kilobytes < 200 * 1024


def test_max_image_pixels_can_be_raised_above_pillows_default():
    # 10000x10000 = 1e8 pixels: over Pillow's default limit, within the one given. Its pixel data is
    # missing, so the decode must fail as truncated, not as a bomb.
    with pytest.raises(ImageError) as refused:
        decode_image(header_bomb(10_000, 10_000), max_pixels=200_000_000)
    assert str(refused.value).startswith("cannot decode image: OSError: image file is truncated")


# -- img2img, called directly -------------------------------------------------------------------


@pytest.fixture(scope="module")
def img2img_rows(sd_model, corpus) -> dict[str, dict]:
    config = Img2ImgConfig(
        kind="img2img", model=str(sd_model), prompt="a watercolor", num_inference_steps=2, strength=0.5
    )
    return rows_by_id(Img2Img(config, seed=3, max_image_pixels=MAX_PIXELS)(batch_of(corpus)))


@pytest.mark.parametrize(("name", "expected"), cases("img2img", IMG2IMG))
def test_img2img(img2img_rows, name, expected):
    row = img2img_rows[name]
    check_row(row, expected)
    if expected.size is not None:
        image = Image.open(io.BytesIO(row["image"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", expected.size)


# -- standardize, called directly ---------------------------------------------------------------


@pytest.fixture(scope="module")
def standardize_rows(corpus) -> dict[str, dict]:
    config = StandardizeConfig(
        kind="standardize", steps=[{"op": "percentile_clip", "low": 0.5, "high": 99.5}, {"op": "normalize"}]
    )
    return rows_by_id(Standardize(config, max_image_pixels=MAX_PIXELS)(batch_of(corpus)))


@pytest.mark.parametrize(("name", "expected"), cases("standardize", STANDARDIZE))
def test_standardize(standardize_rows, name, expected):
    row = standardize_rows[name]
    check_row(row, expected)
    if expected.size is not None:
        depth = "uint16" if name in SIXTEEN_BIT else "uint8"
        array = decoded_png(row["image"])
        assert (array.shape[1], array.shape[0]) == expected.size
        assert str(array.dtype) == row["standardize"]["input_dtype"] == row["standardize"]["output_dtype"] == depth


@pytest.mark.parametrize("name", SIXTEEN_BIT)
def test_standardize_stretches_sixteen_bit_data_without_crushing_it(standardize_rows, name):
    array = decoded_png(standardize_rows[name]["image"])
    assert array.dtype == np.uint16 and array.ndim == (3 if name == "rgb16.png" else 2)
    assert (int(array.min()), int(array.max())) == (0, 65535)
    assert len(np.unique(array)) > 1000  # the input holds 2048 levels; 8 bits would leave at most 256


@pytest.mark.parametrize("orientation", range(1, 9))
def test_standardize_applies_exif_orientation(standardize_rows, orientation):
    array = decoded_png(standardize_rows[f"orientation_{orientation}.jpg"]["image"])
    assert corner_of_red_block(array) == [ORIENTED_CORNER[orientation]]


@pytest.mark.parametrize(
    ("name", "colour"),
    [
        ("animated.gif", [255, 0, 0]),  # the first frame (red), not the green or blue ones
        ("multipage.tif", [255, 0, 0]),  # the first page
        ("cmyk.jpg", [255, 0, 0]),  # C=0 M=255 Y=255 K=0, not its inverse
        ("palette_transparency.png", [255, 0, 0]),
        ("rgba.png", [0, 128, 255]),  # alpha dropped, then (10, 20, 30) stretched to the full range
        ("la.png", 100),  # grayscale stays one plane; a constant image is left as it is
    ],
)
def test_standardize_reads_the_documented_pixels(standardize_rows, name, colour):
    array = decoded_png(standardize_rows[name]["image"])
    values = array.reshape(-1, 3) if isinstance(colour, list) else array.reshape(-1, 1)
    assert np.unique(values, axis=0).tolist() == [colour if isinstance(colour, list) else [colour]]


def test_undecodable_data_gets_the_same_message_in_every_run(standardize_rows):
    assert " at 0x" not in standardize_rows["random_bytes.png"]["error"]


@pytest.mark.parametrize("name", SIXTEEN_BIT)
def test_sixteen_bit_values_survive_a_same_size_nearest_resize(corpus, name):
    config = StandardizeConfig(
        kind="standardize",
        steps=[{"op": "resize", "width": 64, "height": 32, "mode": "stretch", "interpolation": "nearest"}],
    )
    row = Standardize(config)(batch_of({name: corpus[name]})).to_pylist()[0]
    assert row["status"] == "ok"
    expected = RGB16 if name == "rgb16.png" else RAMP
    array = decoded_png(row["image"])
    assert array.dtype == np.uint16
    np.testing.assert_array_equal(array, expected)
    if name == "gray16.png":
        assert Image.open(io.BytesIO(row["image"])).mode == "I;16"


# -- one whole job ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_run(ray_session, sd_model, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    rows = [{"id": name, "image": data} for name, data in corpus.items()]
    source = write_image_parquet(root / "source" / "hostile.parquet", rows)
    sink = root / "sink"
    config = validate_config(
        {
            "source": {"uri": str(source), "max_image_pixels": MAX_PIXELS},
            "operators": [
                {
                    "kind": "img2img",
                    "model": str(sd_model),
                    "prompt": "a watercolor",
                    "num_inference_steps": 2,
                    "strength": 0.5,
                    "batch_size": 8,
                }
            ],
            "sink": {"uri": str(sink)},
        }
    )
    result = run_job(config)
    table = pa.concat_tables(pq.read_table(path) for path in sorted(glob.glob(str(sink / "data" / "*.parquet"))))
    return sink, result, table


def test_job_commits_every_input_exactly_once(job_run, corpus):
    sink, result, table = job_run
    assert sorted(table.column("id").to_pylist()) == sorted(corpus)
    assert set(table.column("variant_index").to_pylist()) == {0}
    assert result.summary["missing"] == result.summary["duplicated"] == 0
    summary = json.loads((sink / "summary.json").read_text())
    assert (summary["rows_in"], summary["rows_out"], summary["missing"], summary["duplicated"]) == (
        len(corpus),
        len(corpus),
        0,
        0,
    )
    statuses = table.column("status").to_pylist()
    assert (summary["ok"], summary["error"]) == (statuses.count("ok"), statuses.count("error"))
    manifest = json.loads((sink / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == len(corpus)


@pytest.mark.parametrize(("name", "expected"), cases("img2img", IMG2IMG))
def test_job_row(job_run, name, expected):
    row = rows_by_id(job_run[2])[name]
    check_row(row, expected)
    if expected.size is not None:
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", expected.size)
