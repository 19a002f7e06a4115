"""Decoding rules: orientation applied, modes converted or refused, bombs refused, sizes kept."""

from __future__ import annotations

import io
import re
import struct
import zlib

import cv2
import numpy as np
import PIL
import pydantic
import pytest
from PIL import Image, PngImagePlugin

from operators.images import (
    DEFAULT_PNG_COMPRESS_LEVEL,
    EncodingConfig,
    ImageError,
    decode_image,
    encode_array,
    encode_image,
    encode_output,
    fit_size,
    read_parameters,
    to_rgb,
)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1"])
def test_eight_bit_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert to_rgb(decode_image(encode(Image.new(mode, (8, 8)), fmt))).mode == "RGB"


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_is_refused_not_crushed(mode):
    image = Image.new(mode, (8, 8))
    data = encode(image, "TIFF")
    with pytest.raises(ImageError, match="holds more than 8 bits per sample"):
        to_rgb(decode_image(data))


def test_decompression_bomb_is_refused_before_decoding():
    data = encode(Image.new("L", (300, 300)))
    with pytest.raises(ImageError, match="300x300 = 90000 pixels, over the limit of 1000"):
        decode_image(data, max_pixels=1000)


def header_claiming(width: int, height: int) -> bytes:
    """A grayscale PNG whose header claims width x height, with one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("width", "height", "max_pixels"),
    [
        (100000, 100000, 1000),  # far over Pillow's own limit as well
        (10000, 10000, 95_000_000),  # a limit raised above Pillow's default, and exceeded
    ],
)
def test_decompression_bomb_message_names_the_configured_limit(width, height, max_pixels):
    with pytest.raises(ImageError) as refused:
        decode_image(header_claiming(width, height), max_pixels=max_pixels)
    assert str(refused.value) == (
        f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (source.max_image_pixels)"
    )


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [((64, 48), None, (64, 48)), ((203, 101), 64, (64, 32)), ((100, 3), None, (96, 8)), ((1024, 768), 512, (512, 384))],
)
def test_fit_size(size, max_side, expected):
    assert fit_size(*size, max_side, 8) == expected


@pytest.mark.parametrize("text", ["Size: 4x2, Bit depth: 16", 'Standardize: "match(reference=/données/☃.png)"'])
@pytest.mark.parametrize("channels", [1, 3])
def test_encoded_arrays_carry_the_parameters_text(text, channels):
    # 16-bit RGB goes through OpenCV, which writes no text chunks: the chunk is added to its PNG.
    array = np.full((2, 4, 3) if channels == 3 else (2, 4), 40000, np.uint16)
    data = encode_array(array, text)
    assert Image.open(io.BytesIO(data)).text["parameters"] == text
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded[..., ::-1] if channels == 3 else decoded, array)


# Encoding: the sink's formats, their settings, and the parameters text each one carries.

RNG = np.random.default_rng(9)
ARRAYS = {
    "uint8 gray": RNG.integers(0, 256, (6, 10), dtype=np.uint8),
    "uint8 gray (H, W, 1)": RNG.integers(0, 256, (6, 10, 1), dtype=np.uint8),
    "uint8 rgb": RNG.integers(0, 256, (6, 10, 3), dtype=np.uint8),
    "uint16 gray": RNG.integers(0, 65536, (6, 10), dtype=np.uint16),
    "uint16 gray (H, W, 1)": RNG.integers(0, 65536, (6, 10, 1), dtype=np.uint16),
    "uint16 rgb": RNG.integers(0, 65536, (6, 10, 3), dtype=np.uint16),
}
PARAMETERS = ["Steps: 30, Sampler: Euler a, Seed: 7", 'a cat, "données" ☃ 日本語 😀\nNegative prompt: dog']


@pytest.mark.parametrize("name", ARRAYS)
@pytest.mark.parametrize("level", [None, 0, 9])
def test_png_keeps_every_bit(name, level):
    array = ARRAYS[name]
    data = encode_output(array, EncodingConfig(png_compress_level=level))
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    expected = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    assert decoded.dtype == array.dtype
    assert np.array_equal(decoded[..., ::-1] if decoded.ndim == 3 else decoded, expected)


def smooth_rgb() -> np.ndarray:
    """A gradient, which lossy formats keep within a few levels (noise they would not)."""
    y, x = np.mgrid[0:32, 0:48]
    return np.stack([x * 5, y * 7, (x + y) * 3], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(
    ("encoding", "tolerance"),
    [
        (EncodingConfig(format="jpeg"), 8),
        (EncodingConfig(format="jpeg", quality=60), 24),
        (EncodingConfig(format="webp"), 0),  # lossless
        (EncodingConfig(format="webp", quality=90), 24),
    ],
)
def test_lossy_formats_round_trip_close(encoding, tolerance):
    array = smooth_rgb()
    with Image.open(io.BytesIO(encode_output(array, encoding))) as image:
        assert image.format == encoding.format.upper()
        decoded = np.asarray(image.convert("RGB")).astype(int)
    assert np.abs(decoded - array).max() <= tolerance


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("text", PARAMETERS)
@pytest.mark.parametrize("name", ["uint8 gray", "uint8 rgb"])
def test_parameters_read_back_in_every_format(image_format, text, name):
    data = encode_output(ARRAYS[name], EncodingConfig(format=image_format), text)
    assert read_parameters(data) == text
    assert read_parameters(encode_output(ARRAYS[name], EncodingConfig(format=image_format))) is None


@pytest.mark.parametrize("text", PARAMETERS)
def test_sixteen_bit_png_carries_parameters(text):
    for name in ("uint16 gray", "uint16 rgb"):
        assert read_parameters(encode_output(ARRAYS[name], EncodingConfig(), text)) == text


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
def test_parameters_are_an_exif_user_comment_as_automatic1111_writes_it(image_format):
    # piexif.helper.UserComment.dump(text, encoding="unicode"): b"UNICODE\0" + UTF-16 big-endian,
    # in the Exif IFD (0x8769) under UserComment (0x9286), typed UNDEFINED so piexif reads bytes.
    text = "Steps: 3, ☃"
    data = encode_output(ARRAYS["uint8 rgb"], EncodingConfig(format=image_format), text)
    with Image.open(io.BytesIO(data)) as image:
        exif = image.getexif()
        comment = exif.get_ifd(0x8769)[0x9286]
        raw = image.info["exif"]
    assert comment == b"UNICODE\0" + text.encode("utf-16-be")
    tiff = raw.removeprefix(b"Exif\0\0")
    assert tiff[:8] == b"MM\0*\0\0\0\x08"
    assert struct.unpack(">HHHI", tiff[26:36]) == (1, 0x9286, 7, len(comment))  # the Exif IFD


@pytest.mark.parametrize("image_format", ["jpeg", "webp"])
@pytest.mark.parametrize("name", ["uint16 gray", "uint16 rgb", "uint16 gray (H, W, 1)"])
def test_sixteen_bit_is_refused_for_eight_bit_formats(image_format, name):
    with pytest.raises(ImageError) as refused:
        encode_output(ARRAYS[name], EncodingConfig(format=image_format), "text")
    assert str(refused.value) == (
        f"format {image_format} holds 8 bits per sample and this image has 16 (uint16); "
        "set the sink's format: png to keep every bit"
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"format": "jpeg", "png_compress_level": 3},
            "png_compress_level applies to format png only, got png_compress_level=3 with format jpeg",
        ),
        (
            {"format": "webp", "png_compress_level": 0},
            "png_compress_level applies to format png only, got png_compress_level=0 with format webp",
        ),
        ({"quality": 80}, "quality applies to formats jpeg and webp only, got quality=80 with format png"),
        ({"format": "png", "quality": 80}, "quality applies to formats jpeg and webp only"),
        ({"png_compress_level": 10}, "less than or equal to 9"),
        ({"png_compress_level": -1}, "greater than or equal to 0"),
        ({"png_compress_level": "3"}, "Input should be a valid integer"),
        ({"png_compress_level": True}, "Input should be a valid integer"),
        ({"format": "jpeg", "quality": 0}, "greater than or equal to 1"),
        ({"format": "webp", "quality": 101}, "less than or equal to 100"),
        ({"format": "jpeg", "quality": 9.5}, "Input should be a valid integer"),
        ({"format": "gif"}, "Input should be 'png', 'webp' or 'jpeg'"),
        ({"compress_level": 1}, "Extra inputs are not permitted"),
    ],
)
def test_encoding_config_refusals(settings, message):
    with pytest.raises(pydantic.ValidationError, match=re.escape(message)):
        EncodingConfig(**settings)


def test_encoding_config_resolves_defaults_and_describes_itself():
    pillow = f"(pillow {PIL.__version__})"
    assert EncodingConfig().resolved_png_level() == DEFAULT_PNG_COMPRESS_LEVEL
    assert EncodingConfig().describe() == f"png level {DEFAULT_PNG_COMPRESS_LEVEL} {pillow}"
    assert EncodingConfig(png_compress_level=9).describe(ARRAYS["uint16 gray"]) == f"png level 9 {pillow}"
    assert (
        EncodingConfig(png_compress_level=9).describe(ARRAYS["uint16 rgb"]) == f"png level 9 (opencv {cv2.__version__})"
    )
    assert EncodingConfig(format="jpeg").describe() == f"jpeg quality 95 {pillow}"
    assert EncodingConfig(format="webp").describe() == f"webp lossless {pillow}"
    assert EncodingConfig(format="webp", quality=90).describe(ARRAYS["uint8 rgb"]) == f"webp quality 90 {pillow}"
    assert [EncodingConfig(format=f).extension() for f in ("png", "webp", "jpeg")] == [".png", ".webp", ".jpg"]


def png_info(text: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def pillow_png(array: np.ndarray, level: int, text: str) -> bytes:
    return encode(Image.fromarray(array), "PNG", pnginfo=png_info(text), compress_level=level)


def test_encode_image_and_encode_array_write_the_default_level():
    # A noisy image, so that the levels give different bytes.
    array = ARRAYS["uint8 rgb"]
    expected = pillow_png(array, DEFAULT_PNG_COMPRESS_LEVEL, "Steps: 3")
    assert encode_image(Image.fromarray(array), "png", "Steps: 3") == expected
    assert encode_array(array, "Steps: 3") == expected
    assert encode_output(array, EncodingConfig(), "Steps: 3") == expected
    # Pillow's own default (level 6, what a plain `save` writes) gives other bytes.
    assert DEFAULT_PNG_COMPRESS_LEVEL != 6
    assert encode(Image.fromarray(array), "PNG", pnginfo=png_info("Steps: 3")) != expected


def test_png_parameters_chunk_is_the_one_pillow_writes():
    # encode_output inserts the chunk itself; the bytes are Pillow's own, for every array Pillow writes
    # and for Latin-1 (tEXt) and other (iTXt) texts alike.
    texts = ["Steps: 3, Size: 16x16", "a caf\u00e9\nSteps: 3", "\u732b, Steps: 3", ""]
    for name in ("uint8 rgb", "uint8 gray", "uint16 gray"):
        for text in texts:
            image = Image.fromarray(ARRAYS[name])
            expected = encode(image, "PNG", pnginfo=png_info(text), compress_level=DEFAULT_PNG_COMPRESS_LEVEL)
            assert encode_output(ARRAYS[name], EncodingConfig(), text) == expected, (name, text)
            assert read_parameters(expected) == text


def test_sixteen_bit_rgb_png_is_written_at_the_configured_level():
    array = np.tile(np.arange(0, 65536, 256, dtype=np.uint16), (64, 2))[..., None].repeat(3, axis=2)
    stored = encode_output(array, EncodingConfig(png_compress_level=0))
    compressed = encode_output(array, EncodingConfig(png_compress_level=9))
    assert len(stored) > array.nbytes > len(compressed)


def test_encode_image_writes_the_parameters_into_jpeg_and_webp():
    image = Image.fromarray(ARRAYS["uint8 rgb"])
    for image_format in ("jpeg", "webp"):
        assert read_parameters(encode_image(image, image_format, "Steps: 3")) == "Steps: 3"


def test_default_level_constant_is_the_config_default():
    assert EncodingConfig().resolved_png_level() == DEFAULT_PNG_COMPRESS_LEVEL
    assert EncodingConfig().png_compress_level is None
