"""Decoding rules: orientation applied, modes converted or refused, bombs refused, sizes kept."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from operators.images import ImageError, decode_image, fit_size, to_rgb


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


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [((64, 48), None, (64, 48)), ((203, 101), 64, (64, 32)), ((100, 3), None, (96, 8)), ((1024, 768), 512, (512, 384))],
)
def test_fit_size(size, max_side, expected):
    assert fit_size(*size, max_side, 8) == expected
