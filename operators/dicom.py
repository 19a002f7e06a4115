"""Reading DICOM: which files are inputs, and the pixels of each frame as radiology displays them.

`header_facts` opens only a file's header (planning, on the driver); `decode_frames` parses a file
once and decodes the asked frames one at a time (a read task). Grayscale frames go through the
Modality LUT (RescaleSlope/Intercept, or a Modality LUT Sequence) and then the VOI LUT (a window, as
the DICOM LINEAR function of PS3.3 C.11.2.1.2.1, or the file's VOI LUT Sequence), MONOCHROME1 is
inverted, and the result fills 0..2**bit_depth-1; or, in "stored" mode, the stored values travel
unchanged (signed data shifted into unsigned). Colour frames become RGB and are never windowed.
Everything applied is kept in the row's `dicom` record, so an output maps back to modality units.

Privacy: a file's header may name a patient. Nothing here puts a header value into a message, and
pydicom is read with its warnings and its logger silenced (its messages quote values); `scrub` removes
identifying values from any library text that must be shown. Only the attributes a config names
travel as columns, and validation refuses every attribute PS3.15 Annex E lists (`operators.deid`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from operators.deid import IDENTIFYING
from operators.rows import RowError

RECORD_COLUMN = "dicom"

# Every field nullable: an error row has no record, a colour frame no window, a file no rescale.
RECORD_TYPE = pa.struct(
    [
        ("sop_class_uid", pa.string()),
        ("sop_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()),
        ("frame", pa.int32()),
        ("number_of_frames", pa.int32()),
        ("transfer_syntax_uid", pa.string()),
        ("photometric_interpretation", pa.string()),
        ("samples_per_pixel", pa.int32()),
        ("bits_allocated", pa.int32()),
        ("bits_stored", pa.int32()),
        ("pixel_representation", pa.int32()),
        ("rescale_slope", pa.float64()),
        ("rescale_intercept", pa.float64()),
        ("rescale_type", pa.string()),
        ("intensity", pa.string()),
        ("window_center", pa.float64()),
        ("window_width", pa.float64()),
        ("window_source", pa.string()),
        ("window_function", pa.string()),
        ("inverted", pa.bool_()),
        ("stored_offset", pa.int64()),
        ("output_bits", pa.int32()),
        ("burned_in_annotation", pa.string()),
    ]
)

DEFAULT_ATTRIBUTES = (
    "Modality",
    "BodyPartExamined",
    "SliceThickness",
    "PixelSpacing",
    "Rows",
    "Columns",
    "SeriesNumber",
)

# Window presets in Hounsfield units (center, width), as radiology workstations ship them.
PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "abdomen": (50.0, 400.0),
    "mediastinum": (50.0, 350.0),
}

_FLOAT_VRS = {"DS", "FL", "FD"}
_INT_VRS = {"IS", "US", "SS", "UL", "SL", "UV", "SV", "US or SS"}
# Binary and nested values have no column form.
_NO_COLUMN_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW", "US or SS or OW"}
_PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)  # Pixel Data, Double Float, Float
_TAG_TEXT = re.compile(r"^\(?(?:0x)?([0-9a-fA-F]{4}),?\s*([0-9a-fA-F]{4})\)?$")
# pydicom needs one of these to decode a compressed syntax; named in the error when none is installed.
_PLUGIN_HINT = {
    "High-Throughput JPEG 2000": "pylibjpeg-openjpeg",
    "JPEG 2000": "pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg-libjpeg",
    "JPEG": "pylibjpeg-libjpeg",
    "RLE": "pylibjpeg-rle",
}


class Window(BaseModel):
    """An explicit window in modality units (Hounsfield units for CT)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    center: float = Field(description="Window center, in modality units.")
    width: float = Field(ge=1, description="Window width, in modality units; at least 1 (PS3.3 C.11.2.1.2.1).")


class DicomConfig(BaseModel):
    """How a DICOM source turns each frame into pixels and which header attributes travel (`source.dicom`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    intensity: Literal["window", "stored"] = Field(
        "window",
        description="'window': Modality LUT, then the window (VOI), MONOCHROME1 inverted, scaled to "
        "0..2**bit_depth-1. 'stored': the stored values unchanged, signed data shifted by "
        "+2**(BitsStored-1) into unsigned (recorded as stored_offset); nothing else applied.",
    )
    window: Literal["file", "brain", "lung", "bone", "abdomen", "mediastinum"] | Window = Field(
        "file",
        description="'file': the file's WindowCenter/Width (the first, or the one named by "
        "window_explanation), else its VOI LUT Sequence, else the frame's own value range; a preset "
        "(brain 40/80, lung -600/1500, bone 400/1800, abdomen 50/400, mediastinum 50/350 HU); or "
        "{center, width} in modality units.",
    )
    window_explanation: str | None = Field(
        None, description="With window 'file': use the window whose WindowCenterWidthExplanation is this."
    )
    bit_depth: Literal[8, 16] = Field(
        16, description="Depth of the pixels produced in window mode (8 for the diffusion operators)."
    )
    attributes: list[str] = Field(
        list(DEFAULT_ATTRIBUTES),
        description="DICOM keywords copied as columns. Identifying attributes (PS3.15 Annex E basic "
        "profile) and private tags are refused.",
    )
    allow_burned_in: bool = Field(
        False, description="Accept frames whose BurnedInAnnotation is YES (text burned into the pixels)."
    )
    id: Literal["sop_instance_uid", "path"] = Field(
        "sop_instance_uid", description="Row id: the SOP Instance UID, or the file's path."
    )

    @field_validator("attributes")
    @classmethod
    def _attributes_allowed(cls, attributes: list[str]) -> list[str]:
        from pydicom.datadict import dictionary_has_tag, dictionary_VR, tag_for_keyword

        seen = set()
        for keyword in attributes:
            match = _TAG_TEXT.match(keyword.strip())
            if match:
                if int(match.group(1), 16) % 2:
                    raise ValueError(f"attribute {keyword!r} is a private tag; private tags are never copied")
                raise ValueError(f"attribute {keyword!r}: give the DICOM keyword (e.g. 'SliceThickness'), not a tag")
            tag = tag_for_keyword(keyword)
            if tag is None or not dictionary_has_tag(tag):
                raise ValueError(f"attribute {keyword!r} is not a DICOM keyword (keywords look like 'SliceThickness')")
            if keyword in IDENTIFYING:
                raise ValueError(
                    f"attribute {keyword!r} may identify a patient (PS3.15 Annex E basic profile) and is never copied"
                )
            if dictionary_VR(tag) in _NO_COLUMN_VRS:
                raise ValueError(
                    f"attribute {keyword!r} holds binary or nested data ({dictionary_VR(tag)}), not a value"
                )
            if keyword in seen:
                raise ValueError(f"attribute {keyword!r} is listed twice")
            seen.add(keyword)
        return attributes

    def column_types(self) -> dict[str, pa.DataType]:
        """Attribute keyword -> Arrow type of its column, from the DICOM data dictionary: DS/FL/FD are
        float64, integer VRs int64, anything else string; a multi-valued attribute is a list of that."""
        from pydicom.datadict import dictionary_VM, dictionary_VR

        types = {}
        for keyword in self.attributes:
            value_type = _arrow_type(dictionary_VR(keyword))
            types[keyword] = value_type if dictionary_VM(keyword) == "1" else pa.list_(value_type)
        return types


def _arrow_type(vr: str) -> pa.DataType:
    if vr in _FLOAT_VRS:
        return pa.float64()
    if vr in _INT_VRS:
        return pa.int64()
    return pa.string()


# ---- reading quietly --------------------------------------------------------------------------------

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[Any, int] | None = None
_IGNORE_ALL = ("ignore", None, Warning, None, 0)  # the filter `warnings.simplefilter("ignore")` adds


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom with value validation off, warnings ignored and its logger silent, for the block
    only: its messages quote element values, which may identify a patient. Nested and concurrent uses
    (planning reads headers on threads) share one saved state, set by the first to enter and restored
    when the last one leaves: `warnings.catch_warnings` is not thread-safe (one thread leaving would
    restore the filters while another still reads)."""
    global _quiet_depth, _quiet_saved
    import pydicom.config

    pydicom_logger = logging.getLogger("pydicom")
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = (pydicom.config.settings.reading_validation_mode, pydicom_logger.level)
            pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
            pydicom_logger.setLevel(logging.CRITICAL + 1)
            warnings.simplefilter("ignore")
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                pydicom.config.settings.reading_validation_mode, level = _quiet_saved
                pydicom_logger.setLevel(level)
                # The filter `simplefilter` put first; an ignored warning leaves no registry entry behind.
                with contextlib.suppress(ValueError):
                    warnings.filters.remove(_IGNORE_ALL)
                _quiet_saved = None


# ---- header -----------------------------------------------------------------------------------------


def is_dicom(data: bytes) -> bool:
    """Whether bytes are a DICOM file (Part 10): the 128-byte preamble, then b'DICM'."""
    return len(data) >= 132 and data[128:132] == b"DICM"


@dataclass
class HeaderFacts:
    """What planning needs from one file's header: its id, its frames, or why it is no input."""

    sop_instance_uid: str | None
    frames: int
    problem: str | None


def _parse(handle, *, stop_before_pixels: bool):
    """A dataset read from a binary file object at its start, or RowError naming the problem."""
    import pydicom
    from pydicom.dataelem import RawDataElement

    head = handle.read(132)
    if not is_dicom(head):
        raise RowError("not a DICOM file (no 'DICM' marker at byte 128)")
    handle.seek(0, io.SEEK_END)
    size = handle.tell()
    handle.seek(0)
    try:
        dataset = pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels, defer_size=None)
    except Exception:  # noqa: BLE001 -- pydicom raises many types; their text may quote values
        raise RowError("truncated or corrupt DICOM header") from None
    transfer_syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None) if dataset.file_meta else None
    if not transfer_syntax or len(dataset) == 0:
        raise RowError("truncated DICOM header")
    # pydicom reads a value cut short by the end of the file without complaint: check the last one
    # (pixel data, checked against Rows x Columns x frames later, excepted).
    last_tag = max(dataset.keys())
    last = dataset.get_item(last_tag)
    if isinstance(last, RawDataElement) and last_tag not in _PIXEL_DATA_TAGS and last.length != 0xFFFFFFFF:
        if last.value is not None and len(last.value) < last.length:
            raise RowError("truncated DICOM header")
    if handle.tell() > size:
        raise RowError("truncated DICOM header")
    return dataset


def _pixel_data_problem(handle, dataset, size: int) -> str | None:
    """After a read that stopped before the pixels: 'no pixel data' when no pixel data element waits,
    'truncated DICOM file' when the file ends before its (native) pixel data does, else None."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    if dataset.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        # The body is one deflate stream: the handle's position says nothing; read it all.
        handle.seek(0)
        full = _parse(handle, stop_before_pixels=False)
        return None if any(tag in full for tag in _PIXEL_DATA_TAGS) else "no pixel data"
    implicit, little = dataset.original_encoding
    start = handle.tell()
    raw = handle.read(8 if implicit else 12)
    if len(raw) < 4:
        return "no pixel data"
    order = "little" if little in (True, None) else "big"
    tag = (int.from_bytes(raw[:2], order) << 16) | int.from_bytes(raw[2:4], order)
    if tag not in _PIXEL_DATA_TAGS:
        return "no pixel data"
    if len(raw) < (8 if implicit else 12):
        return "truncated DICOM file"
    length = int.from_bytes(raw[4:8] if implicit else raw[8:12], order)
    native = get_decoder(dataset.file_meta.TransferSyntaxUID).is_native if _has_decoder(dataset) else False
    if native and length != 0xFFFFFFFF and start + len(raw) + length > size:
        return "truncated DICOM file"
    return None


def _has_decoder(dataset) -> bool:
    from pydicom.pixels import get_decoder

    try:
        get_decoder(dataset.file_meta.TransferSyntaxUID)
    except NotImplementedError:
        return False
    return True


def header_facts(handle) -> HeaderFacts:
    """The SOP Instance UID and frame count of a DICOM file, reading only its header from `handle`
    (a seekable binary file object), or the problem that makes it no input. The problem is a short
    text such as 'not a DICOM file', 'truncated DICOM header' or 'no pixel data', never a header value."""
    with quiet_pydicom():
        try:
            dataset = _parse(handle, stop_before_pixels=True)
            stop = handle.tell()
            handle.seek(0, io.SEEK_END)
            handle_size = handle.tell()
            handle.seek(stop)
            uid = _text(dataset, "SOPInstanceUID")
            frames, problem = _number_of_frames(dataset)
            problem = problem or _pixel_data_problem(handle, dataset, handle_size)
        except RowError as error:
            return HeaderFacts(None, 1, str(error).split(" (")[0])
        except Exception:  # noqa: BLE001 -- a value pydicom cannot convert; its text may quote it
            return HeaderFacts(None, 1, "unreadable DICOM header value")
        return HeaderFacts(uid, frames, problem)


def _number_of_frames(dataset) -> tuple[int, str | None]:
    value = dataset.get("NumberOfFrames")
    if value in (None, ""):
        return 1, None
    try:
        frames = int(value)
    except (TypeError, ValueError):
        return 1, "invalid NumberOfFrames"
    if frames < 1:
        return 1, f"invalid NumberOfFrames {frames}"
    return frames, None


def _text(dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    return None if value in (None, "") else str(value)


# ---- pixels -----------------------------------------------------------------------------------------


@dataclass
class Decoded:
    """One decoded frame: its pixels, the `dicom` record of what was applied, and the configured
    attribute values (keyword -> value, None when the file lacks it)."""

    array: np.ndarray
    record: dict
    attributes: dict


def decode_frames(data: bytes, config: DicomConfig, frames: Sequence[int] | None) -> list[Decoded | RowError]:
    """Decode the 1-based `frames` of a DICOM file (None: all of them), one result per frame asked
    (a file that cannot be read gives one error per frame asked, or one error when all were asked).
    Errors are RowError with a short message that names the problem and no header value; the caller
    adds the file name."""
    wanted = list(frames) if frames is not None else None
    with quiet_pydicom():
        try:
            dataset = _parse(io.BytesIO(data), stop_before_pixels=False)
            count = _file_checks(dataset, config)
        except RowError as error:
            return [error] * (len(wanted) if wanted is not None else 1)
        except Exception as error:  # noqa: BLE001 -- a value pydicom cannot convert; its text may quote it
            return [_unreadable(error)] * (len(wanted) if wanted is not None else 1)
        results: list[Decoded | RowError] = []
        for frame in wanted if wanted is not None else range(1, count + 1):
            try:
                results.append(_decode_frame(dataset, config, frame, count))
            except RowError as error:
                results.append(error)
            except Exception as error:  # noqa: BLE001
                results.append(_unreadable(error))
        return results


def _unreadable(error: Exception) -> RowError:
    """A row error for an unexpected library failure, naming only its type (its text may quote values)."""
    return RowError(f"unreadable DICOM header value ({type(error).__name__})")


def _file_checks(dataset, config: DicomConfig) -> int:
    """Problems that spoil every frame of a file; returns its number of frames."""
    from pydicom.pixels import get_decoder

    if not any(tag in dataset for tag in _PIXEL_DATA_TAGS):
        raise RowError("no pixel data")
    syntax = dataset.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise RowError(
            f"unsupported transfer syntax {syntax} ({_syntax_name(syntax)}): pydicom has no decoder for it"
        ) from None
    if not decoder.is_available:
        hint = next((plugin for prefix, plugin in _PLUGIN_HINT.items() if syntax.name.startswith(prefix)), None)
        raise RowError(
            f"unsupported transfer syntax {syntax} ({syntax.name}): no decoder installed"
            + (f"; install {hint} (or python-gdcm)" if hint else "")
        )
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        if not isinstance(dataset.get(keyword), int) or dataset.get(keyword) < 1:
            raise RowError(f"missing or invalid {keyword}")
    if 0x7FE00010 in dataset:
        allocated = dataset.BitsAllocated
        stored = dataset.get("BitsStored")
        if allocated not in (1, 8, 16, 32, 64):
            raise RowError(f"wrong BitsAllocated {allocated} (accepted: 1, 8, 16, 32, 64)")
        if not isinstance(stored, int) or not 1 <= stored <= min(allocated, 32):
            raise RowError(
                f"wrong BitsStored {stored}: must be in 1..{min(allocated, 32)} for BitsAllocated {allocated}"
            )
    if dataset.get("PhotometricInterpretation") in (None, ""):
        raise RowError("missing PhotometricInterpretation")
    if str(dataset.get("BurnedInAnnotation", "")).upper() == "YES" and not config.allow_burned_in:
        raise RowError(
            "BurnedInAnnotation is YES (text burned into the pixels may identify the patient); refused "
            "unless source.dicom.allow_burned_in is true"
        )
    count, problem = _number_of_frames(dataset)
    if problem:
        raise RowError(problem)
    return count


def _syntax_name(syntax) -> str:
    name = syntax.name
    return "unknown syntax" if name == str(syntax) else name


def _frame_bytes(dataset) -> int:
    pixels = dataset.Rows * dataset.Columns * dataset.SamplesPerPixel
    if dataset.BitsAllocated == 1:
        return pixels  # bits; callers compare in bits for 1-bit data
    return pixels * dataset.BitsAllocated // 8


def _check_frame_present(dataset, frame: int, count: int) -> None:
    """Native pixel data must hold the frame's bytes; pydicom refuses any frame of a short file, and
    would otherwise name only the file's total."""
    from pydicom.pixels import get_decoder

    if not get_decoder(dataset.file_meta.TransferSyntaxUID).is_native:
        return
    tag = next(tag for tag in _PIXEL_DATA_TAGS if tag in dataset)
    length = len(dataset[tag].value or b"")
    unit = 8 if dataset.BitsAllocated == 1 else 1  # 1-bit data: count bits
    if dataset.get("PhotometricInterpretation") == "YBR_FULL_422":
        per_frame = dataset.Rows * dataset.Columns * 2 * dataset.BitsAllocated // 8
    else:
        per_frame = _frame_bytes(dataset)
    held = length * unit // per_frame
    if held >= count:
        return
    if count == 1:
        raise RowError(f"pixel data truncated: {length} bytes, Rows x Columns x frames needs {per_frame // unit}")
    if frame > held:
        raise RowError(f"frame {frame} missing from the pixel data: it holds {held} of {count} frames")


def _decode_frame(dataset, config: DicomConfig, frame: int, count: int) -> Decoded:
    from pydicom.pixels import get_decoder

    if not 1 <= frame <= count:
        raise RowError(f"frame {frame} is past the file's {count} frame(s)")
    _check_frame_present(dataset, frame, count)
    decoder = get_decoder(dataset.file_meta.TransferSyntaxUID)
    try:
        array, meta = decoder.as_array(dataset, index=frame - 1, validate=decoder.is_encapsulated, as_rgb=True)
    except Exception as error:  # noqa: BLE001 -- plugins raise anything; their text may quote values
        if decoder.is_encapsulated and "frame" in str(error).lower():
            raise RowError(f"frame {frame} missing from the pixel data ({count} frames declared)") from None
        raise RowError(f"pixel data could not be decoded ({type(error).__name__})") from None

    photometric = str(dataset.PhotometricInterpretation)
    record = _base_record(dataset, frame, count)
    samples = int(dataset.SamplesPerPixel)
    if samples > 1 or photometric == "PALETTE COLOR":
        pixels = _colour(array, dataset, config, record)
    elif config.intensity == "stored":
        _record_rescale(dataset, record, frame - 1)
        pixels = _stored(array, dataset, config, record)
    else:
        pixels = _windowed(array, dataset, config, record, frame - 1)
    return Decoded(np.ascontiguousarray(pixels), record, _attributes(dataset, config, frame - 1))


def _base_record(dataset, frame: int, count: int) -> dict:
    return {
        "sop_class_uid": _text(dataset, "SOPClassUID"),
        "sop_instance_uid": _text(dataset, "SOPInstanceUID"),
        "study_instance_uid": _text(dataset, "StudyInstanceUID"),
        "series_instance_uid": _text(dataset, "SeriesInstanceUID"),
        "frame": frame if "NumberOfFrames" in dataset else None,
        "number_of_frames": count,
        "transfer_syntax_uid": str(dataset.file_meta.TransferSyntaxUID),
        "photometric_interpretation": str(dataset.PhotometricInterpretation),
        "samples_per_pixel": int(dataset.SamplesPerPixel),
        "bits_allocated": int(dataset.BitsAllocated),
        "bits_stored": _int_or_none(dataset.get("BitsStored")),
        "pixel_representation": _int_or_none(dataset.get("PixelRepresentation")),
        "rescale_slope": None,
        "rescale_intercept": None,
        "rescale_type": None,
        "intensity": None,
        "window_center": None,
        "window_width": None,
        "window_source": None,
        "window_function": None,
        "inverted": False,
        "stored_offset": 0,
        "output_bits": None,
        "burned_in_annotation": _text(dataset, "BurnedInAnnotation"),
    }


def _int_or_none(value) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _colour(array: np.ndarray, dataset, config: DicomConfig, record: dict) -> np.ndarray:
    """RGB as pydicom gives it (YBR converted, palette looked up); 8-bit data stays 8-bit, deeper data
    is scaled to bit_depth (16-bit kept as is with bit_depth 16)."""
    from pydicom.pixels import apply_color_lut

    bits = int(dataset.get("BitsStored") or dataset.BitsAllocated)
    if str(dataset.PhotometricInterpretation) == "PALETTE COLOR":
        try:
            array = apply_color_lut(array, dataset)
        except Exception:  # noqa: BLE001 -- a malformed palette; pydicom's text is not needed
            raise RowError("invalid palette color lookup table") from None
        bits = 8 if array.dtype == np.uint8 else 16
    record["intensity"] = "color"
    if array.dtype == np.uint8 or (bits <= 8 and array.max(initial=0) <= 255):
        record["output_bits"] = 8
        return array.astype(np.uint8, copy=False)
    if config.bit_depth == 16 and array.dtype.itemsize == 2 and array.dtype.kind == "u":
        record["output_bits"] = 16
        return array
    top = float(2 ** min(bits, array.dtype.itemsize * 8) - 1)
    target = 2**config.bit_depth - 1
    scaled = np.rint(np.clip(array.astype(np.float64), 0, top) * (target / top))
    record["output_bits"] = config.bit_depth
    return scaled.astype(np.uint8 if config.bit_depth == 8 else np.uint16)


def _stored(array: np.ndarray, dataset, config: DicomConfig, record: dict) -> np.ndarray:
    record["intensity"] = "stored"
    bits = int(dataset.BitsStored) if 0x7FE00010 in dataset else 32
    if array.dtype.kind == "f" or bits > 16:
        raise RowError(
            f"intensity 'stored' keeps stored values in 16 bits; this file stores {bits}-bit"
            f"{' float' if array.dtype.kind == 'f' else ''} values (use intensity: window)"
        )
    if config.bit_depth == 8 and bits > 8:
        raise RowError(
            f"intensity 'stored' with bit_depth 8 needs BitsStored <= 8, this file has {bits} (use bit_depth: 16)"
        )
    offset = 2 ** (bits - 1) if int(dataset.get("PixelRepresentation") or 0) == 1 else 0
    record["stored_offset"] = offset
    record["output_bits"] = config.bit_depth
    values = array.astype(np.int64) + offset
    return np.clip(values, 0, 2**bits - 1).astype(np.uint8 if config.bit_depth == 8 else np.uint16)


def _frame_item(dataset, index: int, sequence: str):
    """The first item of a functional group macro for one frame of an enhanced multi-frame image (per
    frame first, then shared), or None."""
    for groups_keyword, position in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = dataset.get(groups_keyword)
        if groups and len(groups) > position:
            macro = groups[position].get(sequence)
            if macro:
                return macro[0]
    return None


def _modality(array: np.ndarray, dataset, record: dict, index: int) -> np.ndarray:
    """Stored values -> modality units (HU for CT), as pydicom's `apply_modality_lut`, with the
    rescale of an enhanced multi-frame image's functional groups."""
    from pydicom.pixels import apply_modality_lut

    rescale = _record_rescale(dataset, record, index)
    if rescale is None and "ModalityLUTSequence" in dataset:
        try:
            return apply_modality_lut(array, dataset).astype(np.float64)
        except Exception:  # noqa: BLE001
            raise RowError("invalid Modality LUT Sequence") from None
    if rescale is None:
        return array.astype(np.float64)
    return array.astype(np.float64) * rescale[0] + rescale[1]


def _record_rescale(dataset, record: dict, index: int) -> tuple[float, float] | None:
    """Record the frame's rescale (slope, intercept) and return it; None when the file has none."""
    source = dataset if "RescaleSlope" in dataset or "RescaleIntercept" in dataset else None
    source = source or _frame_item(dataset, index, "PixelValueTransformationSequence")
    if source is None:
        if "ModalityLUTSequence" in dataset:
            record["rescale_type"] = _text(dataset.ModalityLUTSequence[0], "ModalityLUTType")
        return None
    slope = _float_or_none(source.get("RescaleSlope", 1))
    intercept = _float_or_none(source.get("RescaleIntercept", 0))
    if slope is None or intercept is None or not np.isfinite(slope) or not np.isfinite(intercept):
        raise RowError("invalid RescaleSlope or RescaleIntercept (not a number)")
    record["rescale_slope"], record["rescale_intercept"] = slope, intercept
    record["rescale_type"] = _text(source, "RescaleType")
    return slope, intercept


def _file_window(dataset, config: DicomConfig, index: int) -> tuple[float, float, str, str] | None:
    """(center, width, source, function) of the file's window, or None when it has none."""
    source = (
        dataset
        if "WindowCenter" in dataset and "WindowWidth" in dataset
        else _frame_item(dataset, index, "FrameVOILUTSequence")
    )
    if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
        if config.window_explanation is not None:
            raise RowError(f"window_explanation {config.window_explanation!r} given but the file has no window")
        return None
    centers, widths = _as_list(source.WindowCenter), _as_list(source.WindowWidth)
    explanations = [str(value) for value in _as_list(source.get("WindowCenterWidthExplanation", []))]
    position, label = 0, "file"
    if config.window_explanation is not None:
        if config.window_explanation not in explanations:
            raise RowError(
                f"no window explained as {config.window_explanation!r} in the file ({len(centers)} window(s))"
            )
        position = explanations.index(config.window_explanation)
        label = f"file: {config.window_explanation}"
    if position >= min(len(centers), len(widths)):
        raise RowError("WindowCenter and WindowWidth hold different numbers of values")
    center, width = _float_or_none(centers[position]), _float_or_none(widths[position])
    if center is None or width is None or not width > 0:
        raise RowError("invalid WindowCenter or WindowWidth")
    function = str(source.get("VOILUTFunction") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if function == "LINEAR" and width < 1:
        function = "LINEAR_EXACT"
    return center, width, label, function


def _as_list(value) -> list:
    from pydicom.multival import MultiValue

    return list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]


def window_linear(values: np.ndarray, center: float, width: float, top: int) -> np.ndarray:
    """The DICOM LINEAR VOI function (PS3.3 C.11.2.1.2.1) onto 0..top, as floats before rounding."""
    if width <= 1:
        return np.where(values <= center - 0.5, 0.0, float(top))
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * top
    return np.clip(scaled, 0, top)


def _windowed(array: np.ndarray, dataset, config: DicomConfig, record: dict, index: int) -> np.ndarray:
    record["intensity"] = "window"
    top = 2**config.bit_depth - 1
    values = _modality(array, dataset, record, index)
    function = "LINEAR"
    if isinstance(config.window, Window):
        center, width, label = config.window.center, config.window.width, "explicit"
    elif config.window in PRESETS:
        (center, width), label = PRESETS[config.window], f"preset: {config.window}"
    else:
        found = _file_window(dataset, config, index)
        if found is not None:
            center, width, label, function = found
        elif "VOILUTSequence" in dataset:
            center = width = None
            label, function = "VOI LUT", None
        else:
            low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
            # The LINEAR window whose ends are exactly the frame's lowest and highest value.
            center, width, label = (low + high) / 2 + 0.5, high - low + 1, "image range"
    if label == "VOI LUT":
        mapped = _voi_lut(values, dataset, top)
    elif function == "LINEAR_EXACT":
        mapped = np.clip(((values - center) / width + 0.5) * top, 0, top)
    elif function == "SIGMOID":
        mapped = top / (1 + np.exp(-4 * (values - center) / width))
    else:
        mapped = window_linear(values, center, width, top)
    inverted = str(dataset.PhotometricInterpretation) == "MONOCHROME1"
    if inverted:
        mapped = top - mapped
    record.update(
        window_center=center,
        window_width=width,
        window_source=label,
        window_function=function,
        inverted=inverted,
        output_bits=config.bit_depth,
    )
    return np.rint(mapped).astype(np.uint8 if config.bit_depth == 8 else np.uint16)


def _voi_lut(values: np.ndarray, dataset, top: int) -> np.ndarray:
    from pydicom.pixels import apply_voi

    try:
        item = dataset.VOILUTSequence[0]
        lut_bits = int(item.LUTDescriptor[2])
        looked_up = apply_voi(np.rint(values).astype(np.int64), dataset, index=0)
    except Exception:  # noqa: BLE001
        raise RowError("invalid VOI LUT Sequence") from None
    return np.clip(looked_up.astype(np.float64) * (top / (2**lut_bits - 1)), 0, top)


def _attributes(dataset, config: DicomConfig, index: int) -> dict:
    """The configured attributes' values, typed as `column_types` says; None when absent or invalid.
    An enhanced multi-frame image keeps PixelSpacing and SliceThickness in its functional groups."""
    from pydicom.datadict import dictionary_VM, dictionary_VR

    values = {}
    measures = None
    for keyword in config.attributes:
        element = dataset.get(keyword)
        if element is None and keyword in ("PixelSpacing", "SliceThickness"):
            measures = measures if measures is not None else _frame_item(dataset, index, "PixelMeasuresSequence")
            element = measures.get(keyword) if measures is not None else None
        vr = dictionary_VR(keyword)
        convert = float if vr in _FLOAT_VRS else int if vr in _INT_VRS else str
        items = [] if element in (None, "") else _as_list(element)
        converted = []
        for item in items:
            try:
                converted.append(convert(item))
            except (TypeError, ValueError):
                converted.append(None)
        if dictionary_VM(keyword) == "1":
            values[keyword] = converted[0] if converted else None
        else:
            values[keyword] = converted or None
    return values


def scrub(message: str, dataset) -> str:
    """`message` with every value of an identifying attribute (PS3.15 Annex E) or a private tag found
    in `dataset`, nested sequences included, replaced by '<removed>'; for library messages that quote
    header values. Person names are also removed by component (family, given, ...)."""
    found: set[str] = set()

    def collect(data) -> None:
        for element in data.iterall() if hasattr(data, "iterall") else ():
            if not (element.keyword in IDENTIFYING or element.tag.is_private):
                continue
            if element.VR == "SQ":
                continue
            for value in _as_list(element.value):
                if isinstance(value, bytes):
                    text = value.decode("latin-1", "replace").strip("\x00 ")
                else:
                    text = str(value).strip()
                found.add(text)
                if element.VR == "PN":
                    found.update(part.strip() for part in re.split(r"[\^=]", text))

    with quiet_pydicom():
        collect(dataset)
    for text in sorted((text for text in found if len(text) >= 2), key=len, reverse=True):
        message = message.replace(text, "<removed>")
    return message
