"""Decoding rules: orientation applied, modes converted or refused, bombs refused, sizes kept."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from operators.images import ImageError, decode_image, encode_array, fit_size, to_rgb


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
