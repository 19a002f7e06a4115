"""DICOM and NIfTI sources and the DICOM sink, end to end: real files from pydicom's test data read
through the folder source (one row per frame), 16-bit stored pixels that come back unchanged from a
no-op standardize through the DICOM sink, and a privacy run that plants sentinel patient values and
greps every file the run leaves for them."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.config import validate_config
from jobs.pipeline import run_job
from jobs.sources import inspect_source
from tests.jobs.ray_heads import private_temp_dir

SENTINELS = ("SENTINELNAME7Q", "SENTINELID9931", "19010203", "SENTINELHOSPITAL", "SENTINELPRIVATE")


def sample(name: str) -> str:
    from pydicom.data import get_testdata_file

    return get_testdata_file(name)


def read_dicom(path):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def planted(source: str, target: Path, **changes) -> Path:
    """A copy of a pydicom test file with the sentinel patient values (and `changes`) planted."""
    dataset = read_dicom(sample(source))
    dataset.PatientName = "SENTINELNAME7Q^DOE"
    dataset.PatientID = "SENTINELID9931"
    dataset.PatientBirthDate = "19010203"
    dataset.InstitutionName = "SENTINELHOSPITAL"
    dataset.add_new(0x00111010, "LO", "SENTINELPRIVATE")  # a private tag
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    dataset.save_as(target, enforce_file_format=True)
    return target


def job(source: Path, sink: Path, steps=None, **source_settings) -> dict:
    return {
        "source": {"uri": str(source), "format": "dicom", **source_settings},
        "operators": [{"kind": "standardize", "steps": steps or [{"op": "percentile_clip", "low": 0, "high": 100}]}],
        "sink": {"uri": str(sink), "mode": "overwrite"},
    }


def output_rows(sink: Path) -> dict[str, dict]:
    table = pq.read_table(sink / "data")
    return {row["id"]: row for row in table.to_pylist()}


def test_a_folder_of_dicom_files_is_one_row_per_frame_named_by_sop_instance_uid(ray_session, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    shutil.copyfile(sample("CT_small.dcm"), source / "ct")  # no extension: recognised by content
    shutil.copyfile(sample("SC_rgb_rle_2frame.dcm"), source / "two_frames.dcm")
    (source / "notes.dcm").write_bytes(b"not a DICOM file at all")
    config = validate_config(job(source, tmp_path / "out"))
    info = inspect_source(config.source)
    assert info.row_count == 4
    run_job(config)
    rows = output_rows(tmp_path / "out")
    ct = read_dicom(sample("CT_small.dcm")).SOPInstanceUID
    multi = read_dicom(sample("SC_rgb_rle_2frame.dcm")).SOPInstanceUID
    assert set(rows) == {ct, f"{multi}#1", f"{multi}#2", "notes.dcm"}
    assert rows[ct]["status"] == "ok" and rows[ct]["Modality"] == "CT"
    assert rows[f"{multi}#2"]["dicom"]["frame"] == 2
    assert rows["notes.dcm"]["status"] == "error"
    assert rows["notes.dcm"]["error"].endswith(": notes.dcm")


def test_a_16_bit_ct_slice_through_a_no_op_standardize_and_the_dicom_sink_keeps_its_stored_pixels(
    ray_session, tmp_path
):
    source = tmp_path / "in"
    source.mkdir()
    shutil.copyfile(sample("CT_small.dcm"), source / "CT_small.dcm")
    data = job(source, tmp_path / "out", dicom={"intensity": "stored"})
    data["sink"]["dicom"] = True
    run_job(validate_config(data))
    (written,) = (tmp_path / "out" / "dicom").iterdir()
    derived, original = read_dicom(written), read_dicom(sample("CT_small.dcm"))
    assert derived.PixelData == original.PixelData
    assert np.array_equal(derived.pixel_array, original.pixel_array)
    assert (derived.BitsStored, derived.PixelRepresentation) == (original.BitsStored, original.PixelRepresentation)
    assert (float(derived.RescaleSlope), float(derived.RescaleIntercept)) == (
        float(original.RescaleSlope),
        float(original.RescaleIntercept),
    )
    assert list(derived.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert derived.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert str(derived.PatientName) == "" and derived.PatientID == ""
    row = next(iter(output_rows(tmp_path / "out").values()))
    assert row["dicom"]["stored_offset"] == 32768
    # The PNG holds the stored values shifted into unsigned 16 bits: mapping back gives HU.
    from PIL import Image

    png = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
    hu = (png.astype(np.int64) - 32768) * float(original.RescaleSlope) + float(original.RescaleIntercept)
    expected = original.pixel_array.astype(np.int64) * float(original.RescaleSlope) + float(original.RescaleIntercept)
    assert np.array_equal(hu, expected)


def test_a_rerun_writes_the_same_dicom_uids(ray_session, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    shutil.copyfile(sample("MR_small.dcm"), source / "mr.dcm")
    data = job(source, tmp_path / "out")
    data["sink"]["dicom"] = True
    uids = []
    for _ in range(2):
        run_job(validate_config(data))
        (written,) = (tmp_path / "out" / "dicom").iterdir()
        dataset = read_dicom(written)
        uids.append((dataset.SeriesInstanceUID, dataset.SOPInstanceUID))
    assert uids[0] == uids[1]
    assert uids[0][1] != read_dicom(sample("MR_small.dcm")).SOPInstanceUID


def test_dicom_bytes_in_a_parquet_column_are_read_with_a_dicom_section(ray_session, tmp_path):
    import pyarrow as pa

    cells = [Path(sample(name)).read_bytes() for name in ("CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm")]
    pq.write_table(pa.table({"id": ["ct", "mr", "multi"], "image": cells}), tmp_path / "in.parquet")
    data = job(tmp_path / "in.parquet", tmp_path / "out", dicom={"window": "brain", "bit_depth": 8})
    data["source"]["format"] = "parquet"
    run_job(validate_config(data))
    rows = output_rows(tmp_path / "out")
    assert rows["ct"]["status"] == "ok" and rows["ct"]["dicom"]["window_source"] == "preset: brain"
    assert rows["mr"]["status"] == "ok"
    assert rows["multi"]["status"] == "error" and "multi-frame" in rows["multi"]["error"]
    # Without a source.dicom section the same cells are error rows that say what to add.
    data = job(tmp_path / "in.parquet", tmp_path / "out2")
    data["source"]["format"] = "parquet"
    run_job(validate_config(data))
    assert {row["error"] for row in output_rows(tmp_path / "out2").values()} == {
        "image holds a DICOM file in this row; add a source.dicom section to read it"
    }


def test_a_nifti_volume_is_one_row_per_slice_with_its_affine(ray_session, tmp_path):
    import nibabel

    source = tmp_path / "in"
    source.mkdir()
    volume = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3) - 30
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(volume, affine), source / "head.nii.gz")
    data = job(source, tmp_path / "out")
    data["source"]["format"] = "nifti"
    run_job(validate_config(data))
    rows = output_rows(tmp_path / "out")
    assert sorted(rows) == ["head.nii.gz#0", "head.nii.gz#1", "head.nii.gz#2"]
    record = rows["head.nii.gz#2"]["nifti"]
    assert record["slice_index"] == 2 and record["axis"] == 2
    assert np.allclose(np.array(record["affine"]).reshape(4, 4), affine)
    from PIL import Image

    png = np.asarray(Image.open(io.BytesIO(rows["head.nii.gz#2"]["image"]["bytes"])))
    assert np.array_equal(png.astype(np.int64) - record["stored_offset"], volume[:, :, 2])


def test_a_file_that_cannot_be_read_is_an_error_row_naming_it(ray_session, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    shutil.copyfile(sample("rtplan.dcm"), source / "plan.dcm")
    shutil.copyfile(sample("MR_truncated.dcm"), source / "truncated.dcm")
    planted("MR_small.dcm", source / "bits.dcm", BitsStored=20)
    unsupported = read_dicom(sample("MR_small.dcm"))
    unsupported.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"
    unsupported.save_as(source / "syntax.dcm", enforce_file_format=True)
    frames = read_dicom(sample("SC_rgb_rle_2frame.dcm"))
    frames.NumberOfFrames = 3  # one frame more than the pixel data holds
    frames.save_as(source / "frames.dcm", enforce_file_format=True)
    (source / "photo.dcm").write_bytes(Path(sample("CT_small.dcm")).read_bytes()[:128] + b"\x89PNG" + bytes(64))
    config = validate_config(job(source, tmp_path / "out", dicom={"id": "path"}))
    run_job(config)
    rows = output_rows(tmp_path / "out")
    errors = {row_id: row["error"] for row_id, row in rows.items() if row["status"] == "error"}
    assert errors == {
        "plan.dcm": "no pixel data: plan.dcm",
        "truncated.dcm": "truncated DICOM file: truncated.dcm",
        "bits.dcm": "wrong BitsStored 20: must be in 1..16 for BitsAllocated 16: bits.dcm",
        "syntax.dcm": "unsupported transfer syntax 1.2.826.0.1.3680043.9.9999.1 (unknown syntax): pydicom has no "
        "decoder for it: syntax.dcm",
        "frames.dcm#3": "frame 3 missing from the pixel data (3 frames declared): frames.dcm frame 3",
        "photo.dcm": "not a DICOM file: photo.dcm",
    }
    assert rows["frames.dcm#1"]["status"] == rows["frames.dcm#2"]["status"] == "ok"
    assert not any(sentinel in " ".join(errors.values()) for sentinel in SENTINELS)


def test_the_same_dicom_file_twice_is_refused_by_its_uid(tmp_path):
    from jobs.sources import SourceError, check_ids

    source = tmp_path / "in"
    source.mkdir()
    shutil.copyfile(sample("MR_small.dcm"), source / "a.dcm")
    shutil.copyfile(sample("MR_small_RLE.dcm"), source / "b.dcm")  # the same instance, compressed
    config = validate_config(job(source, tmp_path / "out"))
    with pytest.raises(SourceError, match=r"SOP Instance UIDs \(source.dicom.id\) has 1 repeated ids"):
        check_ids(config.source, inspect_source(config.source))


def test_a_dicom_sink_needs_a_dicom_source(tmp_path):
    from jobs.config import ConfigError

    data = job(tmp_path, tmp_path / "out")
    data["source"]["format"] = "images"
    data["sink"]["dicom"] = True
    with pytest.raises(ConfigError, match="sink.dicom writes DICOM derived from DICOM inputs"):
        validate_config(data)


def test_no_identifying_value_leaves_a_run(tmp_path, request):
    """Sentinel patient values planted in the inputs appear in no file the run writes: Parquet data and
    metadata, PNG chunks, derived DICOM files, the report, the summary, the CLI's output and Ray's
    session logs. The run goes through the CLI in a fresh process with its own Ray directory."""
    source = tmp_path / "in"
    source.mkdir()
    planted("CT_small.dcm", source / "ct.dcm")
    planted("MR_small.dcm", source / "burned.dcm", BurnedInAnnotation="YES")
    truncated = planted("MR_small.dcm", tmp_path / "whole.dcm").read_bytes()
    (source / "truncated.dcm").write_bytes(truncated[:-100])
    (source / "header_only.dcm").write_bytes(truncated[:400])
    sink = tmp_path / "out"
    data = job(source, sink, dicom={"id": "path"})  # the burned-in and truncated copies share a UID
    data["sink"].update({"dicom": True, "write_images": True})
    data["run"] = {"resources": {"num_cpus": 2}}
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(data))
    ray_dir = Path(private_temp_dir())  # short: Ray's socket paths must stay under 108 bytes
    request.addfinalizer(lambda: shutil.rmtree(ray_dir, ignore_errors=True))
    environment = {**os.environ, "RAY_TMPDIR": str(ray_dir), "RESTYLE_LOG_DIR": str(tmp_path / "logs")}
    environment.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(config_path)],
        capture_output=True,
        env=environment,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    rows = output_rows(sink)
    assert len(rows) == 4
    assert sum(row["status"] == "ok" for row in rows.values()) == 1
    assert rows["ct.dcm"]["status"] == "ok"
    assert "BurnedInAnnotation" in rows["burned.dcm"]["error"]
    assert any((sink / "dicom").iterdir()) and any((sink / "images").iterdir())

    def found(root: Path) -> list[str]:
        hits = []
        for path in root.rglob("*") if root.exists() else []:
            if path.is_file() and not path.is_symlink():
                content = path.read_bytes()
                hits += [f"{path}: {sentinel}" for sentinel in SENTINELS if sentinel.encode() in content]
        return hits

    assert len(found(source)) >= len(SENTINELS)  # the search finds what is there
    assert any(ray_dir.rglob("session_*/logs/*"))  # Ray's session logs are searched
    leaks = found(sink) + found(ray_dir) + found(tmp_path / "logs")
    for stream in (result.stdout, result.stderr):
        leaks += [f"output: {sentinel}" for sentinel in SENTINELS if sentinel.encode() in stream]
    assert not leaks


def test_a_dicom_prefix_on_s3_is_planned_from_headers_and_read(ray_session, s3_bucket, tmp_path):
    bucket, storage, client = s3_bucket
    client.put_object(Bucket=bucket, Key="scans/a/ct", Body=Path(sample("CT_small.dcm")).read_bytes())
    client.put_object(Bucket=bucket, Key="scans/b/two.dcm", Body=Path(sample("SC_rgb_rle_2frame.dcm")).read_bytes())
    data = job(tmp_path, tmp_path / "out")
    data["source"] = {"uri": f"s3://{bucket}/scans", "format": "dicom", "storage": storage}
    run_job(validate_config(data))
    rows = output_rows(tmp_path / "out")
    multi = read_dicom(sample("SC_rgb_rle_2frame.dcm")).SOPInstanceUID
    assert sorted(rows) == sorted([read_dicom(sample("CT_small.dcm")).SOPInstanceUID, f"{multi}#1", f"{multi}#2"])
    assert {row["status"] for row in rows.values()} == {"ok"}


def test_the_output_of_a_dicom_source_loads_in_datasets(ray_session, tmp_path):
    import datasets

    source = tmp_path / "in"
    source.mkdir()
    shutil.copyfile(sample("CT_small.dcm"), source / "ct.dcm")
    shutil.copyfile(sample("MR_small.dcm"), source / "mr.dcm")
    (source / "DICOMDIR").write_bytes(Path(sample("CT_small.dcm")).read_bytes()[:132])  # an index: not an input
    run_job(validate_config(job(source, tmp_path / "out")))
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data" / "*.parquet"), split="train")
    assert len(loaded) == 2
    row = next(item for item in loaded if item["Modality"] == "CT")
    assert row["dicom"]["window_source"] == "image range" and row["image"].mode == "I;16"
    assert row["PixelSpacing"] == [float(value) for value in read_dicom(sample("CT_small.dcm")).PixelSpacing]
