"""Demo data: real photographs that ship inside scikit-image, written as a Parquet dataset, and
real CT/MR files that ship inside pydicom, copied as they are into a DICOM folder (their headers
still name the sample patients: the DICOM source keeps none of it) and a reference series."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# (file in skimage/data, caption used as the row's prompt)
DEMO_IMAGES = (
    ("astronaut.png", "an astronaut portrait, oil painting"),
    ("chelsea.png", "a tabby cat, watercolor"),
    ("coffee.png", "a cup of coffee, pencil sketch"),
    ("rocket.jpg", "a rocket on the launch pad, ukiyo-e print"),
    ("camera.png", "a man with a camera, charcoal drawing"),
    ("motorcycle_left.png", "a motorcycle, comic book style"),
    ("retina.jpg", "a retina fundus photograph, standardized"),
    ("brick.png", "a brick wall, mosaic"),
)


def skimage_data_dir() -> Path:
    """The folder of sample images bundled with scikit-image."""
    import skimage.data

    return Path(skimage.data.__file__).parent


def make_demo_data(directory: str | Path, max_side: int = 128) -> Path:
    """Write demo.parquet (id, image as HF {bytes, path}, caption, source_file) and return its path;
    beside it inpaint.parquet, the same rows with a `mask` column (PNG, white = repaint), and
    style.png, a colour style reference.

    Images are shrunk to `max_side` so the demo runs in seconds on a CPU.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = {"id": [], "image": [], "caption": [], "source_file": []}
    for file_name, caption in DEMO_IMAGES:
        image = Image.open(skimage_data_dir() / file_name)
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows["id"].append(Path(file_name).stem)
        rows["image"].append({"bytes": buffer.getvalue(), "path": file_name})
        rows["caption"].append(caption)
        rows["source_file"].append(f"skimage/data/{file_name}")
    table = pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "image": pa.array(rows["image"], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "caption": pa.array(rows["caption"], pa.string()),
            "source_file": pa.array(rows["source_file"], pa.string()),
        }
    )
    path = directory / "demo.parquet"
    pq.write_table(table, path)
    # A colour style reference for the IP-Adapter example (configs/ip_adapter_style.yaml).
    Image.open(skimage_data_dir() / "coffee.png").convert("RGB").resize((64, 64)).save(directory / "style.png")
    pq.write_table(
        table.append_column("mask", pa.array([_center_mask(row["bytes"]) for row in rows["image"]])),
        directory / "inpaint.parquet",
    )
    return path


def _center_mask(data: bytes) -> bytes:
    """A PNG mask for one demo image: a white ellipse over the middle third (white = repaint)."""
    from PIL import ImageDraw

    width, height = Image.open(io.BytesIO(data)).size
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width // 3, height // 3, 2 * width // 3, 2 * height // 3), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


# pydicom's bundled real files: a CT slice (uncompressed, signed, rescaled to HU) and an MR slice
# (RLE lossless); and a reference series of one CT slice (JPEG 2000) for histogram matching.
MEDICAL_FILES = ("CT_small.dcm", "MR_small_RLE.dcm")
MEDICAL_REFERENCE_FILES = ("693_J2KI.dcm",)


def make_medical_demo_data(directory: str | Path) -> Path:
    """Copy pydicom's bundled DICOM files into medical/ (the source) and medical_reference/ (a
    reference series); return the source folder. The files are copied byte for byte, headers and
    all, so the demo reads them through the same DICOM source a hospital's files take."""
    import shutil

    from pydicom.data import get_testdata_file

    folder = Path(directory) / "medical"
    for name, files in (("medical", MEDICAL_FILES), ("medical_reference", MEDICAL_REFERENCE_FILES)):
        target = Path(directory) / name
        target.mkdir(parents=True, exist_ok=True)
        for file_name in files:
            shutil.copyfile(get_testdata_file(file_name), target / file_name)
    return folder
