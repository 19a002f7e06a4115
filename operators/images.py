"""Decoding and encoding images for operators, with every refusal a clear message."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Literal

import numpy as np
import PIL
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.rows import RowError

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

# The zlib level of every PNG the sink writes unless its config names one; Pillow's default is 6.
# Chosen by `.venv/bin/python bench/encoding.py` (7 scikit-image photographs, Pillow 13.0.0, one
# thread, 2-core machine): the fastest level whose mean size is within 3% of level 6's. Level 4
# encodes 512x512 RGB in 38 ms against 79 ms at level 6 (+0.6% size) and 1024x1024 in 130 ms against
# 499 ms (+1.3%); levels 1 to 3 are 2x to 3.7x faster than 6 but 8% to 13% larger.
DEFAULT_PNG_COMPRESS_LEVEL = 4
DEFAULT_JPEG_QUALITY = 95
# Where AUTOMATIC1111 writes the parameters text in a JPEG or WebP: the Exif IFD's UserComment, as
# piexif's `UserComment.dump(text, encoding="unicode")` encodes it.
EXIF_IFD_POINTER = 0x8769
EXIF_USER_COMMENT = 0x9286
USER_COMMENT_PREFIXES = {b"UNICODE\0": "utf-16-be", b"ASCII\0\0\0": "ascii"}
JPEG_MAX_EXIF_BYTES = 65533  # one APP1 segment


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
    return decoded_eight_bit_rgb(decode_image(data, max_pixels), data)


def decoded_eight_bit_rgb(image: Image.Image, data: bytes) -> Image.Image:
    """`decode_eight_bit_rgb` of an image `decode_image` already made from `data` (a caller that also
    needs the image in its own mode, e.g. its alpha, decodes once)."""
    if image.mode in ("RGB", "RGBA", "LA") and _holds_sixteen_bit_color(data):
        raise ImageError(
            f"image holds 16-bit colour samples (Pillow reads them as 8-bit {image.mode}); converting it to 8-bit "
            "RGB would crush it (add a standardization stage that maps it to 8 bits first)"
        )
    return to_rgb(image)


def eight_bit_rgb(image, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """An input for an 8-bit RGB model: encoded bytes as `decode_eight_bit_rgb` decodes them, or the
    pixels of the stage before (uint8 gray or RGB; uint16 refused as a 16-bit file is)."""
    if not isinstance(image, np.ndarray):
        return decode_eight_bit_rgb(image, max_pixels)
    if image.dtype != np.uint8:
        raise ImageError(
            f"image holds {image.dtype} samples from the stage before; converting it to 8-bit RGB would crush it "
            "(add a standardization stage that maps it to 8 bits first)"
        )
    return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")


def input_array(image, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An input at its own bit depth: encoded bytes as `decode_array` decodes them, or the pixels of
    the stage before as they are."""
    return image if isinstance(image, np.ndarray) else decode_array(image, max_pixels)


def fit_size(width: int, height: int, max_side: int | None, multiple_of: int) -> tuple[int, int]:
    """Scale (width, height) so the longest side is at most max_side, keeping the aspect,
    then round each side to the nearest multiple of `multiple_of` (at least one multiple)."""
    scale = 1.0
    if max_side is not None and max(width, height) > max_side:
        scale = max_side / max(width, height)
    new_width = max(multiple_of, round(width * scale / multiple_of) * multiple_of)
    new_height = max(multiple_of, round(height * scale / multiple_of) * multiple_of)
    return new_width, new_height


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


class EncodingConfig(BaseModel):
    """How the sink encodes output images: the format and its one setting."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["png", "webp", "jpeg"] = Field(
        "png", description="png keeps every bit (8 and 16 bits); webp and jpeg take 8-bit images only"
    )
    png_compress_level: int | None = Field(
        None,
        ge=0,
        le=9,
        strict=True,
        description=f"zlib level of a PNG, 0 (none) to 9 (smallest); null: {DEFAULT_PNG_COMPRESS_LEVEL}, chosen by "
        "bench/encoding.py. png only",
    )
    quality: int | None = Field(
        None,
        ge=1,
        le=100,
        strict=True,
        description=f"1..100; jpeg and webp only. null: {DEFAULT_JPEG_QUALITY} for jpeg, lossless for webp",
    )

    @model_validator(mode="after")
    def _settings_match_the_format(self) -> EncodingConfig:
        if self.png_compress_level is not None and self.format != "png":
            raise ValueError(
                f"png_compress_level applies to format png only, got png_compress_level={self.png_compress_level} "
                f"with format {self.format}"
            )
        if self.quality is not None and self.format == "png":
            raise ValueError(
                f"quality applies to formats jpeg and webp only, got quality={self.quality} with format png "
                "(use png_compress_level)"
            )
        return self

    def resolved_png_level(self) -> int:
        """The zlib level a PNG is written at."""
        return DEFAULT_PNG_COMPRESS_LEVEL if self.png_compress_level is None else self.png_compress_level

    def resolved_quality(self) -> int | None:
        """The JPEG or WebP quality; None for PNG and for lossless WebP."""
        if self.format == "jpeg" and self.quality is None:
            return DEFAULT_JPEG_QUALITY
        return self.quality

    def extension(self) -> str:
        """The file extension of an image in this format."""
        return {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}[self.format]

    def describe(self, array: np.ndarray | None = None) -> str:
        """The settings and the library that writes them, e.g. 'png level 1 (pillow 13.0.0)'; given the
        array to encode, the library that writes that array (OpenCV for 16-bit RGB PNG)."""
        if self.format == "png":
            settings = f"png level {self.resolved_png_level()}"
        elif self.resolved_quality() is None:
            settings = "webp lossless"
        else:
            settings = f"{self.format} quality {self.resolved_quality()}"
        if self.format == "png" and array is not None and _needs_opencv(array):
            import cv2

            return f"{settings} (opencv {cv2.__version__})"
        return f"{settings} (pillow {PIL.__version__})"


def encode_output(array: np.ndarray, encoding: EncodingConfig, parameters: str | None = None) -> bytes:
    """Encode a uint8 or uint16 array, (H, W), (H, W, 1) or (H, W, 3) RGB, as `encoding` says.

    PNG keeps every bit: 8-bit arrays and 16-bit grayscale go through Pillow (modes L, RGB, I;16),
    16-bit RGB, which Pillow cannot write, through OpenCV; `parameters` goes in a `parameters` text
    chunk. JPEG and WebP take 8-bit arrays only (ImageError otherwise) and carry `parameters` in the
    EXIF UserComment, where AUTOMATIC1111 writes it for those formats.
    """
    if array.dtype not in (np.uint8, np.uint16) or not (
        array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))
    ):
        raise ValueError(
            f"encode_output takes uint8 or uint16 (H, W), (H, W, 1) or (H, W, 3), got {array.dtype} {array.shape}"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if encoding.format == "png":
        return _encode_png(array, encoding.resolved_png_level(), parameters)
    if array.dtype == np.uint16:
        raise ImageError(
            f"format {encoding.format} holds 8 bits per sample and this image has 16 (uint16); "
            "set the sink's format: png to keep every bit"
        )
    options: dict = {"format": encoding.format.upper()}
    if encoding.format == "jpeg":
        options["quality"] = encoding.resolved_quality()
    elif encoding.quality is None:
        options["lossless"] = True
    else:
        options["quality"] = encoding.quality
    if parameters is not None:
        options["exif"] = _exif_user_comment(parameters)
        if encoding.format == "jpeg" and len(options["exif"]) > JPEG_MAX_EXIF_BYTES:
            raise ImageError(
                f"parameters text takes {len(options['exif'])} bytes as EXIF, over JPEG's limit of "
                f"{JPEG_MAX_EXIF_BYTES}; use format: png or webp"
            )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, **options)
    return buffer.getvalue()


def read_parameters(data: bytes) -> str | None:
    """The parameters text an encoded image carries, as `encode_output` writes it: a PNG's
    `parameters` chunk, or a JPEG's or WebP's EXIF UserComment; None when it has none."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return image.text.get("parameters")
        comment = image.getexif().get_ifd(EXIF_IFD_POINTER).get(EXIF_USER_COMMENT)
    if not isinstance(comment, bytes):
        return comment
    for prefix, codec in USER_COMMENT_PREFIXES.items():
        if comment.startswith(prefix):
            return comment[len(prefix) :].decode(codec, errors="replace")
    return comment.decode("utf-8", errors="ignore")  # as AUTOMATIC1111 reads an undeclared encoding


def encode_image(image: Image.Image, image_format: str, pnginfo_text: str | None = None) -> bytes:
    """Encode an image (L, RGB and I;16 as they are, other modes as RGB) with `encode_output` at the
    format's default settings, carrying `pnginfo_text` as `encode_output` writes it."""
    if image.mode not in ("L", "RGB", "I;16"):
        image = image.convert("RGB")
    return encode_output(np.asarray(image), EncodingConfig(format=image_format), pnginfo_text)


def encode_array(array: np.ndarray, pnginfo_text: str | None = None) -> bytes:
    """Encode a uint8 or uint16 array, (H, W) or (H, W, 3) RGB, as PNG with every bit kept, at the
    default level; the PNG carries `pnginfo_text` in a `parameters` text chunk (see `encode_output`)."""
    return encode_output(array, EncodingConfig(), pnginfo_text)


def _needs_opencv(array: np.ndarray) -> bool:
    """Whether a PNG of this array is written by OpenCV: 16-bit RGB, which Pillow cannot write."""
    return array.dtype == np.uint16 and array.ndim == 3 and array.shape[2] == 3


def _encode_png(array: np.ndarray, level: int, parameters: str | None) -> bytes:
    if _needs_opencv(array):
        import cv2

        written, buffer = cv2.imencode(
            ".png", np.ascontiguousarray(array[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, level]
        )
        if not written:
            raise ValueError(f"OpenCV could not encode a {array.shape} uint16 array as PNG")
        encoded = buffer.tobytes()
        return encoded if parameters is None else add_png_text(encoded, "parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=level)
    # The same bytes as Pillow's `pnginfo=PngInfo().add_text(...)` (a test holds them equal), for a
    # fifth of its cost: Pillow builds and writes the chunk in Python, which a 16x16 output feels.
    return buffer.getvalue() if parameters is None else add_png_text(buffer.getvalue(), "parameters", parameters)


def _exif_user_comment(text: str) -> bytes:
    """EXIF bytes holding `text` as the Exif IFD's UserComment, laid out as piexif.dump writes it:
    a big-endian TIFF header, IFD0 with the Exif IFD pointer, the Exif IFD with one UNDEFINED entry.
    Pillow's `Image.Exif` would type a bytes value as BYTE, which piexif (AUTOMATIC1111's reader)
    loads as a tuple of ints rather than the comment."""
    comment = b"UNICODE\0" + text.encode("utf-16-be")
    ifd0 = struct.pack(">HHHII", 1, EXIF_IFD_POINTER, 4, 1, 26) + struct.pack(">I", 0)  # LONG, at 8
    exif_ifd = struct.pack(">HHHII", 1, EXIF_USER_COMMENT, 7, len(comment), 44) + struct.pack(">I", 0)  # at 26
    return b"Exif\0\0" + b"MM\0*" + struct.pack(">I", 8) + ifd0 + exif_ifd + comment


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
