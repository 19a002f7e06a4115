"""Derived DICOM instances for the sink: one Secondary Capture Image per output, built from nothing.

The instance is written from scratch, never as an edited copy of the source header, so nothing of
the source travels except what is named here: the Study Instance UID, the source image reference
(SOP Class and Instance UIDs, frame number), the kept attributes the source config allowed, the
burned-in annotation flag and the intensity facts of the row's `dicom` record. Every type-2
attribute of the Patient and General Study modules is present and empty, `PatientIdentityRemoved`
is YES and the de-identification method names the PS3.15 Annex E basic profile with its Retain UIDs
option (the source's study and instance UIDs are kept as references).

UIDs are deterministic: the series UID from the run's config hash and the source series, the SOP
Instance UID from the config hash, the source instance, its frame and the variant, so a re-run of
the same config gives byte-identical files (no dates or times are written).

Pixels are written at the depth produced, with a Modality LUT that maps them back to modality
units (Hounsfield units for CT):

- `stored` intensity: the source's stored values are restored (the reader's `stored_offset`
  subtracted, signed again, `BitsStored` as the source's) with the source's rescale, so an unchanged
  image gives the source's pixel bytes. If an operator changed the bit depth (16 to 8 bits is
  value/257, full range to full range) or pushed values past the source's `BitsStored`, the offset
  and the depth change are folded into the rescale instead.
- `window` intensity: slope (width - 1) / (2**bits - 1) and intercept center - 0.5 - (width - 1)/2
  invert the DICOM LINEAR window (PS3.3 C.11.2.1.2.1) the reader applied; the window is written as
  `WindowCenter`/`WindowWidth`. An output the reader inverted from MONOCHROME1 is written as
  MONOCHROME1 with a negative slope, so both the modality values and the displayed image match.
- colour: RGB from a colour source; an RGB output of a monochrome source is written as its
  luminance (ITU-R BT.601 weights) in MONOCHROME2, which `DerivationDescription` says.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
import pydicom.config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
# pydicom's implementation UID prefix: a registered root under which generated UIDs are unique.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."
IMPLEMENTATION_VERSION_NAME = "RESTYLE"

# Type-2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1): present and
# empty in every output, never copied from the source.
EMPTY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

# Attributes this module writes itself: a kept attribute of the same name (Rows, Columns, ...) is
# the source's and would contradict the output, so it is not copied.
OWN_ATTRIBUTES = frozenset(
    {
        *EMPTY_TYPE2,
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SpecificCharacterSet",
        "ImageType",
        "DerivationDescription",
        "SourceImageSequence",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "ConversionType",
        "Modality",
        "InstanceNumber",
        "PatientOrientation",
        "BurnedInAnnotation",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "PixelSpacing",
    }
)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def derived_uids(config_hash: str, record: dict, variant_index: int) -> tuple[str, str]:
    """(series_instance_uid, sop_instance_uid) of the derived instance, the same on every re-run of
    the same config: the series from the config hash and the source series (all outputs of one
    source series in one run share a series), the instance from the config hash, the source
    instance, its frame and the variant."""
    series = generate_uid(
        prefix=UID_PREFIX,
        entropy_srcs=["restyle series", config_hash, record.get("series_instance_uid") or ""],
    )
    frame = record.get("frame")
    sop = generate_uid(
        prefix=UID_PREFIX,
        entropy_srcs=[
            "restyle instance",
            config_hash,
            record.get("sop_instance_uid") or "",
            "" if frame is None else str(frame),
            str(variant_index),
        ],
    )
    return str(series), str(sop)


@dataclass
class _Pixels:
    """The Image Pixel, Modality LUT and VOI LUT facts of one output."""

    array: np.ndarray  # as written: uint8/int8/uint16/int16, H x W or H x W x 3
    photometric: str
    bits_stored: int
    rescale: tuple[float, float] | None = None  # (slope, intercept) to modality units
    window: tuple[float, float] | None = None  # (center, width) in modality units
    note: str | None = None  # appended to DerivationDescription


def _channels(array: np.ndarray) -> np.ndarray:
    """H x W or H x W x 3 of the array's dtype: a single channel squeezed, alpha dropped."""
    if array.dtype not in (np.uint8, np.uint16) or array.ndim not in (2, 3):
        raise ValueError(f"DICOM output must be uint8 or uint16, H x W or H x W x C, got {array.dtype} {array.shape}")
    if array.ndim == 2:
        return array
    channels = array.shape[2]
    if channels in (1, 2):  # gray, gray + alpha
        return array[:, :, 0]
    if channels in (3, 4):  # RGB, RGBA
        return array[:, :, :3]
    raise ValueError(f"DICOM output must have 1 to 4 channels, got {channels}")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an RGB array, rounded, in the array's dtype."""
    weights = np.array([0.299, 0.587, 0.114])
    return np.rint(rgb.astype(np.float64) @ weights).astype(rgb.dtype)


def _bits(dtype: np.dtype) -> int:
    return np.dtype(dtype).itemsize * 8


def _fits(values: np.ndarray, bits: int, signed: bool) -> bool:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return values.size == 0 or (int(values.min()) >= low and int(values.max()) <= high)


def _stored_pixels(array: np.ndarray, record: dict, photometric: str) -> _Pixels:
    """Restore the source's stored values (see module docstring)."""
    depth = _bits(array.dtype)
    slope = record.get("rescale_slope")
    intercept = record.get("rescale_intercept")
    rescale = None if slope is None else (float(slope), float(intercept or 0.0))
    offset = int(record.get("stored_offset") or 0)
    source_bits = int(record.get("bits_stored") or depth)
    produced = record.get("output_bits")
    if produced is not None and int(produced) != depth:
        # An operator converted full range to full range (value x 257 or / 257): written unsigned
        # at the new depth, the conversion and the offset folded into the rescale.
        factor = (2 ** int(produced) - 1) / (2**depth - 1)
        if rescale is not None:
            rescale = (rescale[0] * factor, rescale[1] - rescale[0] * offset)
        return _Pixels(array, photometric, depth, rescale)
    values = array.astype(np.int64) - offset
    signed = offset > 0
    if _fits(values, source_bits, signed):
        dtype = {(8, True): np.int8, (16, True): np.int16, (8, False): np.uint8, (16, False): np.uint16}
        return _Pixels(values.astype(dtype[depth, signed]), photometric, source_bits, rescale)
    # Values past the source's range: unsigned at the full depth, the offset folded into the rescale.
    if rescale is not None:
        rescale = (rescale[0], rescale[1] - rescale[0] * offset)
    return _Pixels(array, photometric, depth, rescale)


def _window_rescale(record: dict, bits: int) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """((slope, intercept), (center, width)) inverting the LINEAR window onto 0..2**bits-1."""
    center, width = record.get("window_center"), record.get("window_width")
    if center is None or width is None:
        return None
    center, width = float(center), float(width)
    slope = max(width - 1.0, 0.0) / (2**bits - 1)
    intercept = center - 0.5 - max(width - 1.0, 0.0) / 2
    return (slope, intercept), (center, width)


def _pixels(array: np.ndarray, record: dict) -> _Pixels:
    array = _channels(array)
    source_photometric = str(record.get("photometric_interpretation") or "MONOCHROME2")
    monochrome_source = source_photometric.startswith("MONOCHROME")
    note = None
    if array.ndim == 3:
        if not monochrome_source:
            return _Pixels(array, "RGB", _bits(array.dtype))
        array = _luminance(array)
        note = "RGB output written as its luminance (MONOCHROME2)"
    intensity = record.get("intensity")
    if intensity == "stored" and note is None:
        window = record.get("window_center"), record.get("window_width")
        pixels = _stored_pixels(array, record, source_photometric)
        if pixels.rescale is not None and None not in window:
            pixels.window = (float(window[0]), float(window[1]))
        return pixels
    depth = _bits(array.dtype)
    pixels = _Pixels(array, "MONOCHROME2", depth, note=note)
    if intensity in ("window", "stored"):
        found = _window_rescale(record, depth) if intensity == "window" else None
        # The luminance of an inverted output must stay MONOCHROME2, which no positive window fits.
        if found is not None and not (record.get("inverted") and note is not None):
            (slope, intercept), pixels.window = found
            if record.get("inverted"):
                # The reader inverted a MONOCHROME1 source: value = (max - pixel) x slope + intercept.
                # MONOCHROME1 displays the windowed modality values inverted again, as the array looks.
                slope, intercept = -slope, intercept + slope * (2**depth - 1)
                pixels.photometric = "MONOCHROME1"
            pixels.rescale = (slope, intercept)
    return pixels


def _ds(value: float) -> DSfloat:
    return DSfloat(value, auto_format=True)


def _kept_value(keyword: str, value):
    """A kept attribute's column value as pydicom takes it (DS values formatted to 16 characters)."""
    if dictionary_VR(keyword) == "DS":
        return [_ds(v) for v in value] if isinstance(value, list | tuple) else _ds(value)
    return list(value) if isinstance(value, tuple) else value


def _check_kept(keyword: str) -> None:
    """A kept attribute must be a standard, non-identifying keyword: the source config refuses the
    others; this is the last line of that guarantee."""
    from operators.deid import IDENTIFYING

    tag = tag_for_keyword(keyword)
    if tag is None or keyword in IDENTIFYING or (tag >> 16) & 1 or tag >> 16 == 0x0010:
        raise ValueError(f"attribute {keyword!r} may not be copied to a derived DICOM instance")


def derived_instance(
    array: np.ndarray,
    record: dict,
    attributes: dict,
    config_hash: str,
    variant_index: int,
    derivation: str,
) -> bytes:
    """The bytes of one derived Secondary Capture Image (explicit VR little endian, Part 10 file) for
    an output `array` of the row whose `dicom` record and kept `attributes` are given (see the
    module docstring). `derivation` (e.g. "restyle 0.1.0: standardize (clahe)") becomes
    `DerivationDescription`."""
    # pydicom warns and logs with the offending value (e.g. "Invalid value for VR IS: ..."): never
    # let a header value reach a log. Values are not validated; dciodvfy checks what is written.
    from operators.dicom import quiet_pydicom

    with quiet_pydicom(), pydicom.config.disable_value_validation():
        return _derived_instance(array, record, attributes, config_hash, variant_index, derivation)


def _derived_instance(
    array: np.ndarray, record: dict, attributes: dict, config_hash: str, variant_index: int, derivation: str
) -> bytes:
    pixels = _pixels(array, record)
    series_uid, sop_uid = derived_uids(config_hash, record, variant_index)
    frame = record.get("frame")

    ds = Dataset()
    # SOP Common
    ds.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    # Patient, with identity removed (PS3.15 E basic profile, Retain UIDs option)
    for keyword in EMPTY_TYPE2:
        setattr(ds, keyword, "")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "restyle: PS3.15 E basic profile, retain UIDs"
    ds.DeidentificationMethodCodeSequence = Sequence(
        [_code("113100", "Basic Application Confidentiality Profile"), _code("113110", "Retain UIDs Option")]
    )
    # General Study
    study_uid = record.get("study_instance_uid")
    ds.StudyInstanceUID = study_uid or generate_uid(prefix=UID_PREFIX, entropy_srcs=["restyle study", series_uid])
    # General Series and SC Equipment
    modality = attributes.get("Modality") or record.get("modality") or "OT"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = ""
    ds.Laterality = ""  # type 2C: unknown here, empty (a kept Laterality replaces it)
    ds.ConversionType = "WSD"
    # General Image and General Reference
    ds.InstanceNumber = int(frame) if frame is not None else 1
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    description = derivation if pixels.note is None else f"{derivation}; {pixels.note}"
    ds.DerivationDescription = description[:1024]
    source = Dataset()
    source.ReferencedSOPClassUID = record.get("sop_class_uid") or ""
    source.ReferencedSOPInstanceUID = record.get("sop_instance_uid") or ""
    if frame is not None:
        source.ReferencedFrameNumber = int(frame)
    source.PurposeOfReferenceCodeSequence = Sequence([_code("121322", "Source image for image processing operation")])
    if source.ReferencedSOPClassUID and source.ReferencedSOPInstanceUID:
        ds.SourceImageSequence = Sequence([source])
    if record.get("burned_in_annotation") in ("YES", "NO"):
        ds.BurnedInAnnotation = record["burned_in_annotation"]

    # Kept attributes; Rows/Columns/PixelSpacing are the output's.
    for keyword, value in sorted(attributes.items()):
        _check_kept(keyword)
        if value is None or keyword in OWN_ATTRIBUTES:
            continue
        setattr(ds, keyword, _kept_value(keyword, value))
    _set_pixel_spacing(ds, attributes, pixels.array.shape)

    _set_pixel_data(ds, pixels, modality, record)
    if any(not str(ds[tag].value).isascii() for tag in ds.keys() if ds[tag].VR in ("LO", "ST", "SH", "CS")):
        ds.SpecificCharacterSet = "ISO_IR 192"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _set_pixel_spacing(ds: Dataset, attributes: dict, shape: tuple[int, ...]) -> None:
    """The kept PixelSpacing, scaled by the resize between the source (its kept Rows/Columns) and
    the output; dropped when resized and the source size is unknown."""
    spacing = attributes.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        return
    rows, columns = attributes.get("Rows"), attributes.get("Columns")
    if (rows, columns) == shape[:2]:
        ds.PixelSpacing = [_ds(float(spacing[0])), _ds(float(spacing[1]))]
    elif rows and columns:
        ds.PixelSpacing = [_ds(float(spacing[0]) * rows / shape[0]), _ds(float(spacing[1]) * columns / shape[1])]


def _set_pixel_data(ds: Dataset, pixels: _Pixels, modality: str, record: dict) -> None:
    array = pixels.array
    allocated = _bits(array.dtype)
    ds.SamplesPerPixel = 3 if array.ndim == 3 else 1
    ds.PhotometricInterpretation = pixels.photometric
    if array.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = array.shape[:2]
    ds.BitsAllocated = allocated
    ds.BitsStored = pixels.bits_stored
    ds.HighBit = pixels.bits_stored - 1
    ds.PixelRepresentation = 1 if array.dtype.kind == "i" else 0
    if pixels.rescale is not None:
        ds.RescaleIntercept = _ds(pixels.rescale[1])
        ds.RescaleSlope = _ds(pixels.rescale[0])
        ds.RescaleType = record.get("rescale_type") or ("HU" if modality == "CT" else "US")
    if pixels.window is not None:
        ds.WindowCenter = _ds(pixels.window[0])
        ds.WindowWidth = _ds(pixels.window[1])
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\0"
    ds.add_new(0x7FE00010, "OW" if allocated > 8 else "OB", data)
