"""Decoding and encoding images for operators, with every refusal a clear message."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, PngImagePlugin

from operators.base import RowError

# Pillow's own decompression-bomb limit; a config may lower or raise it per job.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Modes converted to RGB for 8-bit RGB models; the alpha of RGBA, LA and PA is discarded.
EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV")
# Modes whose values do not fit in 8 bits; converting them would crush the data.
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


class ImageError(RowError):
    """An image that cannot be used; its message becomes the row's `error`."""


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded bytes into a fully loaded, EXIF-oriented image in its own mode.

    Raises ImageError for missing, undecodable, truncated or oversized data.
    """
    if data is None or len(data) == 0:
        raise ImageError("image is empty (no bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (source.max_image_pixels)"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"image refused as a decompression bomb: {error}") from None
    except Exception as error:  # Pillow raises many types for broken files
        raise ImageError(f"cannot decode image: {type(error).__name__}: {error}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an 8-bit image to RGB; refuse high-bit-depth and unknown modes."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_DEPTH_MODES:
        raise ImageError(
            f"image mode {image.mode} holds more than 8 bits per sample; converting it to 8-bit RGB "
            "would crush it (add a standardization stage that maps it to 8 bits first)"
        )
    if image.mode not in EIGHT_BIT_MODES:
        raise ImageError(f"unsupported image mode {image.mode}; accepted: {', '.join(EIGHT_BIT_MODES)}")
    return image.convert("RGB")


def fit_size(width: int, height: int, max_side: int | None, multiple_of: int) -> tuple[int, int]:
    """Scale (width, height) so the longest side is at most max_side, keeping the aspect,
    then round each side to the nearest multiple of `multiple_of` (at least one multiple)."""
    scale = 1.0
    if max_side is not None and max(width, height) > max_side:
        scale = max_side / max(width, height)
    new_width = max(multiple_of, round(width * scale / multiple_of) * multiple_of)
    new_height = max(multiple_of, round(height * scale / multiple_of) * multiple_of)
    return new_width, new_height


def encode_image(image: Image.Image, image_format: str, pnginfo_text: str | None = None) -> bytes:
    """Encode an image; PNGs carry `pnginfo_text` in a `parameters` text chunk."""
    buffer = io.BytesIO()
    if image_format == "png":
        info = None
        if pnginfo_text is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", pnginfo_text)
        image.save(buffer, format="PNG", pnginfo=info)
    elif image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=95)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", lossless=True)
    else:
        raise ValueError(f"image format must be one of png, jpeg, webp, got {image_format!r}")
    return buffer.getvalue()
