"""Derived DICOM instances: pixels at the produced depth mapped back to modality units, deterministic
UIDs, the source referenced, nothing identifying copied, and dciodvfy finds no error."""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut
from pydicom.uid import UID

from operators.dicom_out import SECONDARY_CAPTURE_IMAGE_STORAGE, derived_instance, derived_uids

CONFIG_HASH = "0123456789abcdef"
DERIVATION = "restyle 0.1.0: standardize (clahe)"
NAME, PATIENT_ID, BIRTH_DATE = "SENTINEL^PATIENT", "SENTINEL-ID-4711", "19010203"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # a multi-frame SOP class
KEPT = ("Modality", "BodyPartExamined", "SliceThickness", "PixelSpacing", "Rows", "Columns", "SeriesNumber")


def ct_source() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def record_of(ds: pydicom.Dataset, **fields) -> dict:
    """The `dicom` record a read of `ds` gives, with `fields` overriding."""
    record = {
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "study_instance_uid": str(ds.StudyInstanceUID),
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "frame": None,
        "number_of_frames": 1,
        "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
        "photometric_interpretation": str(ds.PhotometricInterpretation),
        "samples_per_pixel": int(ds.SamplesPerPixel),
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.BitsStored),
        "pixel_representation": int(ds.PixelRepresentation),
        "rescale_slope": float(ds.get("RescaleSlope", 1.0)),
        "rescale_intercept": float(ds.get("RescaleIntercept", 0.0)),
        "rescale_type": None,
        "intensity": "window",
        "window_center": None,
        "window_width": None,
        "window_source": None,
        "inverted": False,
        "stored_offset": 0,
        "output_bits": 16,
        "burned_in_annotation": None,
    }
    return record | fields


def attributes_of(ds: pydicom.Dataset) -> dict:
    """The kept attribute columns of a read of `ds` (the default allow-list)."""
    values = {}
    for keyword in KEPT:
        value = ds.get(keyword)
        values[keyword] = [float(v) for v in value] if keyword == "PixelSpacing" else value
    values["SliceThickness"] = float(ds.SliceThickness)
    values["Rows"], values["Columns"], values["SeriesNumber"] = int(ds.Rows), int(ds.Columns), int(ds.SeriesNumber)
    return values


def stored_ct() -> tuple[pydicom.Dataset, np.ndarray, dict, dict]:
    """CT_small (signed, BitsStored 16, slope 1, intercept -1024) as a `stored` read gives it."""
    source = ct_source()
    array = (source.pixel_array.astype(np.int32) + 32768).astype(np.uint16)
    record = record_of(source, intensity="stored", stored_offset=32768)
    return source, array, record, attributes_of(source)


def read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def linear_window(values: np.ndarray, center: float, width: float, bits: int) -> np.ndarray:
    """The DICOM LINEAR window (PS3.3 C.11.2.1.2.1) onto 0..2**bits-1, as the reader applies it."""
    top = 2**bits - 1
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * top
    return np.clip(np.rint(scaled), 0, top).astype(np.uint8 if bits == 8 else np.uint16)


def hu_ramp() -> np.ndarray:
    return np.linspace(-1100, 1300, 24 * 20).reshape(24, 20)


def window_output(bits: int, inverted: bool = False) -> tuple[np.ndarray, bytes]:
    source = ct_source()
    hu = hu_ramp()
    array = linear_window(hu, 40.0, 400.0, bits)
    if inverted:
        array = (2**bits - 1) - array
    record = record_of(
        source,
        intensity="window",
        window_center=40.0,
        window_width=400.0,
        window_source="preset: abdomen",
        output_bits=bits,
        inverted=inverted,
        photometric_interpretation="MONOCHROME1" if inverted else "MONOCHROME2",
    )
    return hu, derived_instance(array, record, {"Modality": "CT"}, CONFIG_HASH, 0, DERIVATION)


def test_stored_ct_slice_gives_the_source_pixel_bytes():
    source, array, record, attributes = stored_ct()
    out = read(derived_instance(array, record, attributes, CONFIG_HASH, 0, DERIVATION))
    assert out.PixelData == source.PixelData
    np.testing.assert_array_equal(out.pixel_array, source.pixel_array)
    assert (out.PixelRepresentation, out.BitsStored, out.BitsAllocated) == (1, 16, 16)
    assert (out.PixelRepresentation, out.BitsStored) == (source.PixelRepresentation, source.BitsStored)
    assert (float(out.RescaleSlope), float(out.RescaleIntercept)) == (1.0, -1024.0)
    assert out.RescaleType == "HU"
    np.testing.assert_array_equal(
        apply_modality_lut(out.pixel_array, out), apply_modality_lut(source.pixel_array, source)
    )


def test_stored_values_past_the_source_range_fold_the_offset_into_the_rescale():
    source = ct_source()
    array = np.array([[0, 4095, 65535]], np.uint16)
    record = record_of(source, intensity="stored", stored_offset=2048, bits_stored=12)
    out = read(derived_instance(array, record, {}, CONFIG_HASH, 0, DERIVATION))
    assert (out.PixelRepresentation, out.BitsStored) == (0, 16)
    # value = (pixel - 2048) x 1 - 1024
    np.testing.assert_array_equal(apply_modality_lut(out.pixel_array, out), [[-3072, 1023, 62463]])


def test_stored_output_converted_to_8_bits_maps_back_through_the_rescale():
    source, array, record, _ = stored_ct()
    eight = ((array.astype(np.int64) + 128) // 257).astype(np.uint8)
    out = read(derived_instance(eight, record, {}, CONFIG_HASH, 0, DERIVATION))
    assert (out.BitsAllocated, out.PixelRepresentation) == (8, 0)
    expected = source.pixel_array.astype(np.float64) - 1024
    np.testing.assert_allclose(apply_modality_lut(out.pixel_array, out), expected, atol=257 / 2 + 1e-6)


@pytest.mark.parametrize("bits", [8, 16])
def test_window_output_maps_back_to_hounsfield_units(bits):
    hu, data = window_output(bits)
    out = read(data)
    assert (out.BitsAllocated, out.BitsStored, out.PixelRepresentation) == (bits, bits, 0)
    assert out.PhotometricInterpretation == "MONOCHROME2"
    assert (float(out.WindowCenter), float(out.WindowWidth)) == (40.0, 400.0)
    assert float(out.RescaleSlope) == pytest.approx(399 / (2**bits - 1))
    assert float(out.RescaleIntercept) == pytest.approx(40 - 0.5 - 399 / 2)
    inside = (hu > -160) & (hu < 240)
    mapped = apply_modality_lut(out.pixel_array, out)
    step = 399 / (2**bits - 1)
    assert np.abs(mapped - hu)[inside].max() <= step / 2 + 1e-3
    # One pixel by hand: HU 40 windows to 128 of 255, which maps back to 40.28 HU.
    if bits == 8:
        assert linear_window(np.array([40.0]), 40.0, 400.0, 8)[0] == 128
        assert 128 * float(out.RescaleSlope) + float(out.RescaleIntercept) == pytest.approx(40.28, abs=0.01)


def test_inverted_monochrome1_output_is_written_as_monochrome1_with_a_negative_slope():
    hu, data = window_output(8, inverted=True)
    out = read(data)
    assert out.PhotometricInterpretation == "MONOCHROME1"
    assert float(out.RescaleSlope) < 0
    inside = (hu > -160) & (hu < 240)
    mapped = apply_modality_lut(out.pixel_array, out)
    assert np.abs(mapped - hu)[inside].max() <= 399 / 255 / 2 + 1e-3


def test_rgb_output_of_a_colour_source_is_rgb():
    source = ct_source()
    rgb = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    record = record_of(source, intensity="color", photometric_interpretation="YBR_FULL_422", samples_per_pixel=3)
    out = read(derived_instance(rgb, record, {}, CONFIG_HASH, 0, DERIVATION))
    assert (out.PhotometricInterpretation, out.SamplesPerPixel, out.PlanarConfiguration) == ("RGB", 3, 0)
    assert (out.BitsAllocated, out.Rows, out.Columns) == (8, 5, 7)
    np.testing.assert_array_equal(out.pixel_array, rgb)
    assert "RescaleSlope" not in out and "WindowCenter" not in out
    assert out.DerivationDescription == DERIVATION


def test_rgb_output_of_a_monochrome_source_is_its_luminance():
    source = ct_source()
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    record = record_of(source, intensity="window", window_center=40.0, window_width=400.0, output_bits=8)
    out = read(derived_instance(rgb, record, {}, CONFIG_HASH, 0, DERIVATION))
    assert (out.PhotometricInterpretation, out.SamplesPerPixel, out.BitsAllocated) == ("MONOCHROME2", 1, 8)
    # 0.299 x 200 + 0.587 x 100 + 0.114 x 50 = 124.2
    np.testing.assert_array_equal(out.pixel_array, np.full((4, 6), 124, np.uint8))
    assert out.DerivationDescription == f"{DERIVATION}; RGB output written as its luminance (MONOCHROME2)"


def test_uids_are_valid_deterministic_and_differ_by_variant_frame_and_config():
    source = ct_source()
    record = record_of(source)
    series, sop = derived_uids(CONFIG_HASH, record, 0)
    assert UID(series).is_valid and UID(sop).is_valid
    assert (series, sop) == derived_uids(CONFIG_HASH, dict(record), 0)
    assert series not in (sop, record["series_instance_uid"]) and sop != record["sop_instance_uid"]
    others = [
        derived_uids(CONFIG_HASH, record, 1),
        derived_uids(CONFIG_HASH, record | {"frame": 2}, 0),
        derived_uids("fedcba9876543210", record, 0),
    ]
    assert len({sop, *(other[1] for other in others)}) == 4
    assert others[0][0] == series and others[1][0] == series
    assert others[2][0] != series
    # Another instance of the same source series: the same series, another instance.
    neighbour = record | {"sop_instance_uid": record["sop_instance_uid"] + ".2"}
    assert derived_uids(CONFIG_HASH, neighbour, 0)[0] == series
    assert derived_uids(CONFIG_HASH, neighbour, 0)[1] != sop
    # The written file carries exactly these UIDs, in its file meta too; re-runs give the same bytes.
    _, array, stored, attributes = stored_ct()
    data = derived_instance(array, stored, attributes, CONFIG_HASH, 0, DERIVATION)
    out = read(data)
    assert (out.SeriesInstanceUID, out.SOPInstanceUID) == derived_uids(CONFIG_HASH, stored, 0)
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert data == derived_instance(array, stored, attributes, CONFIG_HASH, 0, DERIVATION)


def test_frame_of_a_multi_frame_source_is_referenced():
    source = ct_source()
    record = record_of(source, frame=3, number_of_frames=5, intensity="stored", stored_offset=32768)
    record["sop_class_uid"] = ENHANCED_CT
    array = np.full((4, 4), 32768, np.uint16)
    out = read(derived_instance(array, record, {}, CONFIG_HASH, 0, DERIVATION))
    (reference,) = out.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedFrameNumber == 3
    assert out.InstanceNumber == 3


def sentinel_source() -> pydicom.Dataset:
    source = ct_source()
    source.PatientName, source.PatientID, source.PatientBirthDate = NAME, PATIENT_ID, BIRTH_DATE
    source.OtherPatientIDs = PATIENT_ID
    source.InstitutionName = "SENTINEL HOSPITAL"
    source.BodyPartExamined = "CHEST"
    source.add_new(0x00091010, "LO", "SENTINEL PRIVATE")
    return source


def test_nothing_identifying_is_copied_and_only_the_kept_attributes_travel():
    source = sentinel_source()
    array = (source.pixel_array.astype(np.int32) + 32768).astype(np.uint16)
    record = record_of(source, intensity="stored", stored_offset=32768, burned_in_annotation="NO")
    data = derived_instance(array, record, attributes_of(source), CONFIG_HASH, 0, DERIVATION)
    for sentinel in (NAME, "SENTINEL", PATIENT_ID, BIRTH_DATE, str(source.PatientName)):
        assert sentinel.encode() not in data
    out = read(data)
    assert list(out.ImageType) == ["DERIVED", "SECONDARY"]
    assert out.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
    assert out.DerivationDescription == DERIVATION
    assert out.PatientIdentityRemoved == "YES"
    assert [item.CodeValue for item in out.DeidentificationMethodCodeSequence] == ["113100", "113110"]
    assert out.ConversionType == "WSD"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # fmt: skip
        assert keyword in out and out[keyword].value in ("", None), keyword
    assert out.StudyInstanceUID == source.StudyInstanceUID
    (reference,) = out.SourceImageSequence
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    assert "ReferencedFrameNumber" not in reference
    assert (out.Modality, out.BodyPartExamined, out.BurnedInAnnotation) == ("CT", "CHEST", "NO")
    assert float(out.SliceThickness) == float(source.SliceThickness)
    assert [float(v) for v in out.PixelSpacing] == [float(v) for v in source.PixelSpacing]
    assert out.SeriesNumber == source.SeriesNumber
    assert not any(element.tag.is_private for element in out)
    assert sorted(element.keyword for element in out) == sorted(
        [
            "ImageType",
            "SOPClassUID",
            "SOPInstanceUID",
            "AccessionNumber",
            "Modality",
            "ConversionType",
            "ReferringPhysicianName",
            "DerivationDescription",
            "SourceImageSequence",
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "PatientIdentityRemoved",
            "DeidentificationMethod",
            "DeidentificationMethodCodeSequence",
            "StudyDate",
            "StudyTime",
            "BodyPartExamined",
            "SliceThickness",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "StudyID",
            "SeriesNumber",
            "Laterality",
            "InstanceNumber",
            "PatientOrientation",
            "BurnedInAnnotation",
            "SamplesPerPixel",
            "PhotometricInterpretation",
            "Rows",
            "Columns",
            "PixelSpacing",
            "BitsAllocated",
            "BitsStored",
            "HighBit",
            "PixelRepresentation",
            "RescaleIntercept",
            "RescaleSlope",
            "RescaleType",
            "PixelData",
        ]
    )


def test_an_identifying_attribute_is_never_copied():
    source, array, record, _ = stored_ct()
    with pytest.raises(ValueError, match="'PatientName' may not be copied") as raised:
        derived_instance(array, record, {"PatientName": NAME}, CONFIG_HASH, 0, DERIVATION)
    assert NAME not in str(raised.value)


def test_resized_output_scales_the_pixel_spacing():
    source, _, record, attributes = stored_ct()
    array = np.full((64, 32), 32768, np.uint16)
    out = read(derived_instance(array, record, attributes, CONFIG_HASH, 0, DERIVATION))
    spacing = [float(v) for v in source.PixelSpacing]
    assert [float(v) for v in out.PixelSpacing] == pytest.approx([spacing[0] * 2, spacing[1] * 4])
    assert (out.Rows, out.Columns) == (64, 32)


def dciodvfy() -> str | None:
    found = shutil.which("dciodvfy")
    beside = Path(sys.executable).parent / "dciodvfy"
    return found or (str(beside) if beside.exists() else None)


def outputs() -> dict[str, bytes]:
    source, array, record, attributes = stored_ct()
    colour = record_of(source, intensity="color", photometric_interpretation="RGB", samples_per_pixel=3)
    rgb = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    frame = record | {"frame": 2, "number_of_frames": 4, "sop_class_uid": ENHANCED_CT}
    return {
        "stored": derived_instance(array, record, attributes, CONFIG_HASH, 0, DERIVATION),
        "window 8": window_output(8)[1],
        "window 16": window_output(16)[1],
        "inverted": window_output(8, inverted=True)[1],
        "rgb": derived_instance(rgb, colour, {"Modality": "OT"}, CONFIG_HASH, 0, DERIVATION),
        "luminance": derived_instance(rgb, record_of(source, output_bits=8), {}, CONFIG_HASH, 0, DERIVATION),
        "frame": derived_instance(array, frame, attributes, CONFIG_HASH, 1, DERIVATION),
    }


@pytest.mark.skipif(dciodvfy() is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("kind", ["stored", "window 8", "window 16", "inverted", "rgb", "luminance", "frame"])
def test_dciodvfy_finds_no_error(kind, tmp_path):
    path = tmp_path / "out.dcm"
    path.write_bytes(outputs()[kind])
    result = subprocess.run([dciodvfy(), str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    assert "SCImage" in lines  # the IOD it checked against
    assert [line for line in lines if line.startswith("Error")] == []


def test_luminance_of_an_inverted_output_has_no_window():
    source = ct_source()
    rgb = np.full((4, 4, 3), 90, np.uint8)
    record = record_of(source, window_center=40.0, window_width=400.0, output_bits=8, inverted=True)
    out = read(derived_instance(rgb, record, {}, CONFIG_HASH, 0, DERIVATION))
    assert out.PhotometricInterpretation == "MONOCHROME2"
    assert "RescaleSlope" not in out and "WindowCenter" not in out


def test_an_invalid_kept_value_raises_no_warning(caplog):
    _, array, record, _ = stored_ct()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = derived_instance(array, record, {"BodyPartExamined": "not a CS value!"}, CONFIG_HASH, 0, DERIVATION)
    assert caught == []
    assert "CS value" not in caplog.text
    assert read(data).BodyPartExamined == "not a CS value!"
