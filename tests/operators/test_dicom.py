"""operators/dicom.py on pydicom's bundled real files and on generated edge cases: intensities as
radiology applies them, compressed and multi-frame decoding, every bad input as a RowError naming the
problem, config validation, and no identifying header value in any message, warning or log record."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import pyarrow as pa
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from operators.deid import IDENTIFYING
from operators.dicom import (
    RECORD_TYPE,
    Decoded,
    DicomConfig,
    Window,
    decode_frames,
    header_facts,
    is_dicom,
    scrub,
)
from operators.rows import RowError


def _bytes(name: str) -> bytes:
    with open(get_testdata_file(name), "rb") as handle:
        return handle.read()


def _dataset(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _one(data: bytes, **config) -> Decoded:
    (result,) = decode_frames(data, DicomConfig(**config), None)
    assert isinstance(result, Decoded), result
    return result


def _error(data: bytes, frames=None, **config) -> str:
    results = decode_frames(data, DicomConfig(**config), frames)
    assert all(isinstance(result, RowError) for result in results), results
    return str(results[0])


def _generated(photometric="MONOCHROME2", frames=None, frames_present=None, bits_stored=8, **extra) -> bytes:
    """A small native 8-bit image (4 x 4 per frame, values 0..15 + 16 * frame index)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "OT"
    dataset.Rows = dataset.Columns = 4
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, bits_stored, 7
    dataset.PixelRepresentation = 0
    if frames is not None:
        dataset.NumberOfFrames = frames
    present = frames_present if frames_present is not None else frames or 1
    dataset.PixelData = np.arange(16 * present, dtype=np.uint8).tobytes()
    for keyword, value in extra.items():
        setattr(dataset, keyword, value)
    return _encode(dataset)


def _linear(values: np.ndarray, center: float, width: float, top: int) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, written out case by case."""
    out = np.empty(values.shape, dtype=np.float64)
    low = values <= center - 0.5 - (width - 1) / 2
    high = values > center - 0.5 + (width - 1) / 2
    middle = ~low & ~high
    out[low], out[high] = 0, top
    out[middle] = ((values[middle] - (center - 0.5)) / (width - 1) + 0.5) * top
    return np.rint(out)


# ---- intensities ----------------------------------------------------------------------------------


def test_ct_preset_window_is_the_linear_function_of_hounsfield_units():
    dataset = _dataset("CT_small.dcm")
    decoded = _one(_bytes("CT_small.dcm"), window="lung")
    hounsfield = apply_modality_lut(dataset.pixel_array, dataset)
    assert decoded.array.dtype == np.uint16 and decoded.array.shape == (128, 128)
    assert np.array_equal(decoded.array, _linear(hounsfield, -600, 1500, 65535))
    # A few pixels by hand: HU = stored * 1 - 1024, then LINEAR with c=-600, w=1500.
    for row, column in ((0, 0), (64, 64), (100, 30)):
        hu = int(dataset.pixel_array[row, column]) - 1024
        expected = min(max(((hu + 600.5) / 1499 + 0.5) * 65535, 0), 65535)
        assert decoded.array[row, column] == round(expected)
    record = decoded.record
    assert (record["rescale_slope"], record["rescale_intercept"]) == (1.0, -1024.0)
    assert (record["window_center"], record["window_width"], record["window_source"]) == (-600, 1500, "preset: lung")
    assert (record["intensity"], record["output_bits"], record["inverted"]) == ("window", 16, False)
    assert pa.array([record], RECORD_TYPE)[0]["window_source"].as_py() == "preset: lung"


def test_ct_explicit_window_at_8_bits():
    dataset = _dataset("CT_small.dcm")
    decoded = _one(_bytes("CT_small.dcm"), window={"center": 40, "width": 400}, bit_depth=8)
    hounsfield = apply_modality_lut(dataset.pixel_array, dataset)
    assert decoded.array.dtype == np.uint8
    assert np.array_equal(decoded.array, _linear(hounsfield, 40, 400, 255))
    assert decoded.record["window_source"] == "explicit" and decoded.record["output_bits"] == 8


def test_ct_stored_mode_shifts_signed_values_and_records_the_offset():
    dataset = _dataset("CT_small.dcm")
    decoded = _one(_bytes("CT_small.dcm"), intensity="stored")
    assert decoded.array.dtype == np.uint16
    assert np.array_equal(decoded.array.astype(np.int64), dataset.pixel_array.astype(np.int64) + 2**15)
    assert decoded.record["stored_offset"] == 2**15 and decoded.record["intensity"] == "stored"
    assert (decoded.record["rescale_slope"], decoded.record["rescale_intercept"]) == (1.0, -1024.0)
    assert decoded.record["window_source"] is None


def test_mr_file_window():
    dataset = _dataset("MR_small.dcm")
    decoded = _one(_bytes("MR_small.dcm"))
    assert decoded.record["window_source"] == "file"
    assert (decoded.record["window_center"], decoded.record["window_width"]) == (600, 1600)
    assert np.array_equal(decoded.array, _linear(dataset.pixel_array.astype(np.float64), 600, 1600, 65535))
    assert decoded.attributes == {
        "Modality": "MR",
        "BodyPartExamined": None,
        "SliceThickness": 0.8,
        "PixelSpacing": [0.3125, 0.3125],
        "Rows": 64,
        "Columns": 64,
        "SeriesNumber": 1,
    }


def test_window_explanation_not_in_the_file_is_an_error():
    assert "no window explained as 'SOFT'" in _error(_bytes("MR_small.dcm"), window_explanation="SOFT")


def test_monochrome1_is_inverted_in_window_mode_and_kept_in_stored_mode():
    window = {"WindowCenter": 8, "WindowWidth": 16}
    plain = _one(_generated("MONOCHROME2", **window))
    inverted = _one(_generated("MONOCHROME1", **window))
    assert inverted.record["inverted"] is True and plain.record["inverted"] is False
    assert np.array_equal(inverted.array.astype(np.int64), 65535 - plain.array.astype(np.int64))
    stored = _one(_generated("MONOCHROME1"), intensity="stored", bit_depth=8)
    assert np.array_equal(stored.array.ravel(), np.arange(16)) and stored.record["inverted"] is False


def test_image_range_window_when_the_file_has_none():
    decoded = _one(_generated())
    assert decoded.record["window_source"] == "image range"
    assert decoded.array.min() == 0 and decoded.array.max() == 65535


# ---- compressed, colour, multi-frame --------------------------------------------------------------


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(name):
    reference = _one(_bytes("MR_small.dcm"), intensity="stored")
    decoded = _one(_bytes(name), intensity="stored")
    assert np.array_equal(decoded.array, reference.array)
    assert decoded.record["transfer_syntax_uid"] == str(_dataset(name).file_meta.TransferSyntaxUID)


def test_jpeg_lossless_and_baseline_colour():
    reference = _one(_bytes("SC_rgb_rle.dcm")).array
    lossless = _one(_bytes("SC_rgb_jpeg_gdcm.dcm"))
    assert lossless.array.dtype == np.uint8 and lossless.array.shape == (100, 100, 3)
    assert np.array_equal(lossless.array, reference)
    assert lossless.record["intensity"] == "color" and lossless.record["window_source"] is None
    baseline = _one(_bytes("SC_rgb_jpeg_dcmtk.dcm"))
    assert baseline.array.shape == (100, 100, 3)  # YBR_FULL in the file, RGB out
    assert np.abs(baseline.array.astype(int) - reference.astype(int)).mean() < 3


def test_multi_frame_files_decode_each_frame():
    dataset = _dataset("SC_rgb_rle_2frame.dcm")
    results = decode_frames(_bytes("SC_rgb_rle_2frame.dcm"), DicomConfig(), None)
    assert [result.record["frame"] for result in results] == [1, 2]
    for result, expected in zip(results, dataset.pixel_array, strict=True):
        assert np.array_equal(result.array, expected)
    (third,) = decode_frames(_bytes("examples_ybr_color.dcm"), DicomConfig(), [3])
    assert np.array_equal(third.array, _dataset("examples_ybr_color.dcm").pixel_array[2])
    assert (third.record["frame"], third.record["number_of_frames"]) == (3, 30)


def test_palette_becomes_rgb():
    dataset = _dataset("examples_palette.dcm")
    decoded = _one(_bytes("examples_palette.dcm"))
    assert decoded.array.shape == (350, 800, 3)
    assert np.array_equal(decoded.array, apply_color_lut(dataset.pixel_array, dataset))
    assert decoded.record["photometric_interpretation"] == "PALETTE COLOR"


# ---- bad input ------------------------------------------------------------------------------------


def test_no_pixel_data():
    assert _error(_bytes("rtplan.dcm")) == "no pixel data"


def test_truncated_file():
    assert _error(_bytes("MR_truncated.dcm")) == "pixel data truncated: 8130 bytes, Rows x Columns x frames needs 8192"
    assert _error(_bytes("CT_small.dcm")[:1000]) == "truncated DICOM header"


def test_wrong_bits_stored():
    dataset = _dataset("MR_small.dcm")
    dataset.BitsStored = 20
    assert "wrong BitsStored 20: must be in 1..16 for BitsAllocated 16" in _error(_encode(dataset))


def test_multi_frame_file_one_frame_short():
    results = decode_frames(_generated(frames=3, frames_present=2), DicomConfig(), None)
    assert [type(result) for result in results] == [Decoded, Decoded, RowError]
    assert str(results[2]) == "frame 3 missing from the pixel data: it holds 2 of 3 frames"
    assert np.array_equal(
        decode_frames(_generated(frames=3, frames_present=2), DicomConfig(intensity="stored", bit_depth=8), [2])[
            0
        ].array.ravel(),
        np.arange(16, 32),
    )
    assert str(decode_frames(_generated(frames=3), DicomConfig(), [4])[0]) == "frame 4 is past the file's 3 frame(s)"


def test_compressed_multi_frame_file_one_frame_short():
    dataset = _dataset("SC_rgb_rle_2frame.dcm")
    dataset.NumberOfFrames = 3
    results = decode_frames(_encode(dataset), DicomConfig(), None)
    assert [type(result) for result in results] == [Decoded, Decoded, RowError]
    assert str(results[2]) == "frame 3 missing from the pixel data (3 frames declared)"


def test_not_dicom_and_unsupported_syntax():
    png = b"\x89PNG\r\n\x1a\n" + bytes(400)
    assert not is_dicom(png)
    assert _error(png) == "not a DICOM file (no 'DICM' marker at byte 128)"
    dataset = _dataset("MR_small.dcm")
    dataset.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
    assert _error(_encode(dataset)) == (
        "unsupported transfer syntax 1.2.826.0.1.3680043.9.9999.1 (unknown syntax): pydicom has no decoder for it"
    )


def test_burned_in_annotation_refused_unless_allowed():
    data = _generated(BurnedInAnnotation="YES")
    assert _error(data).startswith("BurnedInAnnotation is YES")
    assert "allow_burned_in" in _error(data)
    assert _one(data, allow_burned_in=True).record["burned_in_annotation"] == "YES"


def test_stored_mode_refuses_data_deeper_than_8_bits_at_bit_depth_8():
    assert "use bit_depth: 16" in _error(_bytes("CT_small.dcm"), intensity="stored", bit_depth=8)


# ---- header facts ---------------------------------------------------------------------------------


def test_header_facts():
    with open(get_testdata_file("CT_small.dcm"), "rb") as handle:
        facts = header_facts(handle)
    assert (facts.sop_instance_uid, facts.frames, facts.problem) == (
        "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322",
        1,
        None,
    )
    assert header_facts(io.BytesIO(_bytes("examples_ybr_color.dcm"))).frames == 30
    assert header_facts(io.BytesIO(b"\x89PNG" + bytes(300))).problem == "not a DICOM file"
    assert header_facts(io.BytesIO(_bytes("CT_small.dcm")[:1000])).problem == "truncated DICOM header"
    assert header_facts(io.BytesIO(_bytes("rtplan.dcm"))).problem == "no pixel data"
    assert header_facts(io.BytesIO(_bytes("MR_truncated.dcm"))).problem == "truncated DICOM file"
    deflated = header_facts(io.BytesIO(_bytes("image_dfl.dcm")))  # one deflate stream: read whole
    assert (deflated.frames, deflated.problem) == (1, None)


# ---- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "fragment"),
    [
        ("PatientName", "attribute 'PatientName' may identify a patient (PS3.15 Annex E basic profile)"),
        ("StudyDate", "attribute 'StudyDate' may identify a patient"),
        ("Slicethickness", "attribute 'Slicethickness' is not a DICOM keyword"),
        ("(0009,1001)", "attribute '(0009,1001)' is a private tag"),
        ("PixelData", "attribute 'PixelData' holds binary or nested data"),
    ],
)
def test_config_refuses_identifying_unknown_private_and_binary_attributes(attribute, fragment):
    with pytest.raises(ValidationError) as caught:
        DicomConfig(attributes=["Modality", attribute])
    assert fragment in str(caught.value)


def test_config_column_types_and_window():
    config = DicomConfig(attributes=["SliceThickness", "Rows", "PixelSpacing", "Modality", "ImageType"])
    assert config.column_types() == {
        "SliceThickness": pa.float64(),
        "Rows": pa.int64(),
        "PixelSpacing": pa.list_(pa.float64()),
        "Modality": pa.string(),
        "ImageType": pa.list_(pa.string()),
    }
    assert DicomConfig(window={"center": 1, "width": 2}).window == Window(center=1, width=2)
    with pytest.raises(ValidationError):
        DicomConfig(window={"center": 1, "width": 0})


def test_deid_table_holds_the_basic_profile_keywords():
    from pydicom.datadict import repeater_has_keyword, tag_for_keyword

    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "OtherPatientIDs",
        "PatientAddress",
        "InstitutionName",
        "ReferringPhysicianName",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "SeriesTime",
        "AcquisitionDateTime",
        "ContentDate",
        "DeviceSerialNumber",
        "OperatorsName",
    ):
        assert keyword in IDENTIFYING
    assert all(tag_for_keyword(keyword) is not None or repeater_has_keyword(keyword) for keyword in IDENTIFYING)
    assert not IDENTIFYING & {"Modality", "BodyPartExamined", "SliceThickness", "PixelSpacing", "Rows", "Columns"}


# ---- privacy --------------------------------------------------------------------------------------

SENTINELS = ("Zyxwv^Sentinelname", "Zyxwv", "Sentinelname", "PID-SENTINEL-4417", "19230917", "ISSENTINEL")


def _planted(dataset: Dataset) -> Dataset:
    dataset.PatientName = SENTINELS[0]
    dataset.PatientID = SENTINELS[3]
    dataset.PatientBirthDate = SENTINELS[4]
    # An invalid IS value, which pydicom warns about quoting it: in InstanceNumber and in SeriesNumber,
    # a configured attribute. Planted as raw bytes, since pydicom refuses to set it.
    for tag in (0x00200013, 0x00200011):
        value = SENTINELS[5].encode()
        dataset[tag] = RawDataElement(Tag(tag), "IS", len(value), value, 0, False, True)
    return dataset


def _encode_invalid(dataset: Dataset) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = pydicom.config.settings.writing_validation_mode
        pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
        try:
            return _encode(dataset)
        finally:
            pydicom.config.settings.writing_validation_mode = original


def test_no_identifying_value_in_any_message_warning_log_or_field(caplog, recwarn, capsys):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    pydicom.config.debug(True)  # pydicom then logs every element's value as it reads
    validation_mode = pydicom.config.settings.reading_validation_mode
    try:
        good = _encode_invalid(_planted(_dataset("CT_small.dcm")))
        bits = _planted(_dataset("CT_small.dcm"))
        bits.BitsStored = 20
        syntax = _planted(_dataset("CT_small.dcm"))
        syntax.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
        no_pixels = _planted(_dataset("CT_small.dcm"))
        del no_pixels.PixelData
        burned = _planted(_dataset("CT_small.dcm"))
        burned.BurnedInAnnotation = "YES"
        variants = [good, _encode_invalid(bits), _encode_invalid(syntax), _encode_invalid(no_pixels)]
        variants += [_encode_invalid(burned), good[:-100], good[:600], good[:1500]]
        caplog.clear()
        recwarn.clear()
        texts = []
        for data in variants:
            for config in (DicomConfig(), DicomConfig(intensity="stored", bit_depth=8)):
                for result in decode_frames(data, config, None) + decode_frames(data, config, [2]):
                    texts.append(
                        repr(result.record) + repr(result.attributes) if isinstance(result, Decoded) else str(result)
                    )
            facts = header_facts(io.BytesIO(data))
            texts.append(repr(facts))
        # Reading quietly changed pydicom's settings for the reads only.
        assert pydicom.config.settings.reading_validation_mode == validation_mode
        assert logging.getLogger("pydicom").level == logging.DEBUG
    finally:
        pydicom.config.debug(False)
    decoded = decode_frames(good, DicomConfig(), None)[0]
    assert decoded.attributes["SeriesNumber"] is None
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(warning.message) for warning in recwarn.list]
    texts += capsys.readouterr()
    blob = "\n".join(texts)
    assert "truncated DICOM header" in blob and "no pixel data" in blob and "wrong BitsStored 20" in blob
    for sentinel in SENTINELS:
        assert sentinel not in blob


def test_scrub_removes_identifying_values_and_private_strings():
    dataset = _planted(_dataset("CT_small.dcm"))
    dataset.add_new(0x00090010, "LO", "ACME")
    dataset.add_new(0x00091001, "LO", "PRIVATE-SENTINEL")
    message = f"bad value {SENTINELS[3]} for Zyxwv born {SENTINELS[4]} note PRIVATE-SENTINEL, CT ok"
    assert scrub(message, dataset) == "bad value <removed> for <removed> born <removed> note <removed>, CT ok"


def test_quiet_reading_holds_while_any_thread_is_still_reading():
    """Planning reads headers on threads: one thread leaving must not bring warnings back for another."""
    import threading

    from operators.dicom import quiet_pydicom

    inside, leave = threading.Event(), threading.Event()

    def first_reader():
        with quiet_pydicom():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=first_reader)
    thread.start()
    assert inside.wait(10)
    with quiet_pydicom():
        leave.set()
        thread.join(10)  # the first reader has left; this one still reads
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("Invalid value for VR PN: 'SENTINEL^NAME'", stacklevel=1)
    assert not caught
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("after the readers", stacklevel=1)
    assert len(caught) == 1
