"""Decoding and encoding images for operators, with every refusal a clear message."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from operators.base import RowError

# Pillow's own decompression-bomb limit; a config may lower or raise it per job.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Modes converted to RGB for 8-bit RGB models; the alpha of RGBA, LA and PA is discarded.
EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "LAB", "HSV")
# Modes whose values do not fit in 8 bits; converting them would crush the data.
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# Modes `decode_array` reads as 8-bit grayscale (alpha dropped); other 8-bit modes become RGB.
GRAYSCALE_MODES = ("1", "L", "LA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*")
# PNG colour types that Pillow reads as 8 bits when their samples have 16: RGB, gray+alpha, RGBA.
PNG_CRUSHED_COLOR_TYPES = (2, 4, 6)


class ImageError(RowError):
    """An image that cannot be used; its message becomes the row's `error`."""


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded bytes into a fully loaded, EXIF-oriented image in its own mode.

    Raises ImageError for missing, undecodable, truncated or oversized data.
    """
    if data is None or len(data) == 0:
        raise ImageError("image is empty (no bytes)")
    try:
        # Pillow's own check (process-wide, with its own limit and message) is off while the header is
        # read; the configured limit is checked here instead, before any pixel is decoded.
        previous_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the limit of "
                    f"{max_pixels} (source.max_image_pixels)"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
        finally:
            Image.MAX_IMAGE_PIXELS = previous_limit
    except ImageError:
        raise
    except Image.UnidentifiedImageError:  # its own message names the buffer by memory address
        raise ImageError("cannot decode image: UnidentifiedImageError: cannot identify image format") from None
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


def decode_eight_bit_rgb(data: bytes | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode for an 8-bit RGB model: `decode_image`, then `to_rgb`. A 16-bit colour PNG or TIFF, which
    Pillow reads as 8-bit RGB(A) or LA, is refused like the other high-bit-depth images."""
    image = decode_image(data, max_pixels)
    if image.mode in ("RGB", "RGBA", "LA") and _holds_sixteen_bit_color(data):
        raise ImageError(
            f"image holds 16-bit colour samples (Pillow reads them as 8-bit {image.mode}); converting it to 8-bit "
            "RGB would crush it (add a standardization stage that maps it to 8 bits first)"
        )
    return to_rgb(image)


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


def decode_array(data: bytes | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode encoded bytes into an EXIF-oriented array without losing bit depth.

    Returns uint8 or uint16, shaped (H, W) for grayscale or (H, W, 3) for RGB; alpha is dropped.
    1, L and LA become uint8 (H, W); P, PA, RGB, RGBA, CMYK, YCbCr and the other 8-bit modes become
    uint8 RGB. 16-bit grayscale (I;16*) becomes uint16 (H, W); 16-bit RGB(A) PNG and TIFF, which
    Pillow would silently read as 8 bits, are decoded with OpenCV (or tifffile for planar TIFF) into
    uint16 (H, W, 3), and 16-bit gray+alpha PNG into uint16 (H, W). 32-bit integer images (mode I)
    become uint16 when every value is in 0..65535. Raises ImageError for everything else (32-bit
    float, out-of-range integers, unknown modes) and for what `decode_image` refuses.
    """
    image = decode_image(data, max_pixels)  # empty, undecodable, truncated and oversized data end here
    if image.mode in ("RGB", "RGBA", "LA") and _holds_sixteen_bit_color(data):
        return _decode_sixteen_bit_color(data, image)
    if image.mode in GRAYSCALE_MODES:
        return np.asarray(image.convert("L"))
    if image.mode in SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.uint16)  # also turns big-endian samples native
    if image.mode == "I":
        values = np.asarray(image)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageError(
                f"image mode I holds 32-bit integers in [{low}, {high}]; only values in 0..65535 are "
                "accepted, as 16-bit samples"
            )
        return values.astype(np.uint16)
    if image.mode == "F":
        raise ImageError("image mode F: 32-bit float images are not supported; accepted: 8-bit and 16-bit integers")
    if image.mode not in EIGHT_BIT_MODES:
        raise ImageError(
            f"unsupported image mode {image.mode}; accepted: {', '.join(EIGHT_BIT_MODES + SIXTEEN_BIT_MODES)}, I"
        )
    try:
        return np.asarray(image.convert("RGB"))
    except ValueError as error:
        raise ImageError(f"cannot convert image mode {image.mode} to RGB: {error}") from None


def encode_array(array: np.ndarray, pnginfo_text: str | None = None) -> bytes:
    """Encode a uint8 or uint16 array, (H, W) or (H, W, 3) RGB, as PNG with every bit kept; the PNG
    carries `pnginfo_text` in a `parameters` text chunk, as `encode_image` writes it.

    8-bit arrays and 16-bit grayscale go through Pillow (modes L, RGB, I;16); 16-bit RGB, which
    Pillow cannot write, through OpenCV.
    """
    if array.dtype not in (np.uint8, np.uint16) or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"encode_array takes uint8 or uint16 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    if array.dtype == np.uint16 and array.ndim == 3:
        import cv2

        written, buffer = cv2.imencode(".png", np.ascontiguousarray(array[..., ::-1]))
        if not written:
            raise ValueError(f"OpenCV could not encode a {array.shape} uint16 array as PNG")
        encoded = buffer.tobytes()
        return encoded if pnginfo_text is None else add_png_text(encoded, "parameters", pnginfo_text)
    buffer = io.BytesIO()
    info = None
    if pnginfo_text is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", pnginfo_text)
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def add_png_text(png: bytes, key: str, text: str) -> bytes:
    """Insert a text chunk right after a PNG's IHDR chunk, as Pillow's `PngInfo.add_text` writes it:
    tEXt when the text is Latin-1, uncompressed iTXt (UTF-8) otherwise."""
    if not png.startswith(PNG_SIGNATURE) or png[12:16] != b"IHDR":
        raise ValueError("add_png_text takes PNG bytes that start with an IHDR chunk")
    try:
        kind, body = b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        kind, body = b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8")
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def _holds_sixteen_bit_color(data: bytes) -> bool:
    """Whether the bytes are a PNG or TIFF with 16-bit colour (or gray+alpha) samples."""
    if data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR":
        return data[24] == 16 and data[25] in PNG_CRUSHED_COLOR_TYPES
    if data[:4] in TIFF_SIGNATURES:
        with Image.open(io.BytesIO(data)) as image:
            bits = image.tag_v2.get(258, (8,))  # BitsPerSample
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return False


def _decode_sixteen_bit_color(data: bytes, pillow_image: Image.Image) -> np.ndarray:
    """Decode a 16-bit colour PNG or TIFF as uint16 RGB (or gray for gray+alpha), EXIF-oriented.

    OpenCV's decode is checked against Pillow's 8-bit reading of the same file (`pillow_image`,
    oriented), which keeps the high byte of each sample: a decode that disagrees is refused, never
    passed on. Planar TIFFs are read with tifffile; Pillow misreads some of them, so only their
    size is compared.
    """
    with Image.open(io.BytesIO(data)) as image:
        is_tiff = image.format == "TIFF"
        planar_separate = is_tiff and image.tag_v2.get(284, 1) == 2  # PlanarConfiguration
        # A PNG's eXIf chunk comes before IDAT, where Pillow reads it without decoding the image.
        exif = image.getexif() if is_tiff or "exif" in image.info else {}
        orientation = exif.get(0x0112, 1)
    gray_alpha = data.startswith(PNG_SIGNATURE) and data[25] == 4
    if planar_separate:
        array = _orient(_decode_planar_tiff(data), orientation)
    else:
        import cv2

        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if array is None or array.dtype != np.uint16 or array.ndim != 3 or array.shape[2] not in (3, 4):
            shape = None if array is None else f"{array.dtype} {array.shape}"
            raise ImageError(f"cannot decode 16-bit colour image: OpenCV returned {shape}")
        # OpenCV expands gray+alpha to BGRA with B = G = R; keep one plane. Otherwise BGR(A) to RGB.
        array = array[..., 0] if gray_alpha else array[..., 2::-1]
        if not is_tiff:  # OpenCV applies a TIFF's orientation itself, but not a PNG's eXIf
            array = _orient(array, orientation)
    array = np.ascontiguousarray(array)
    expected = np.asarray(pillow_image.convert("L" if gray_alpha else "RGB"))
    high_bytes = (array >> 8).astype(np.int16)
    if high_bytes.shape != expected.shape or (not planar_separate and np.abs(high_bytes - expected).max() > 1):
        raise ImageError(
            f"16-bit colour decode ({array.shape[1]}x{array.shape[0]}) disagrees with the file's 8-bit "
            f"reading ({pillow_image.size[0]}x{pillow_image.size[1]}); refusing it rather than guessing"
        )
    return array


def _decode_planar_tiff(data: bytes) -> np.ndarray:
    """Decode a planar (one plane per sample) 16-bit RGB TIFF, which OpenCV misreads, with tifffile."""
    try:
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages[0]
            array = page.asarray()
            axes = page.axes
    except Exception as error:  # tifffile raises many types, e.g. for codecs it lacks
        raise ImageError(f"cannot decode planar 16-bit TIFF: {type(error).__name__}: {error}") from None
    if axes != "SYX" or array.dtype != np.uint16 or array.shape[0] < 3:
        raise ImageError(f"unsupported planar TIFF layout: axes {axes}, {array.dtype} {array.shape}")
    return np.moveaxis(array[:3], 0, -1)


def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an (H, W[, C]) array, as `ImageOps.exif_transpose` does to an image."""
    transforms = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return transforms[orientation](array) if orientation in transforms else array
