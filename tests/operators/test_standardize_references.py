"""histogram_match reference folders: images recognised by content, whatever their names."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from operators.standardize import load_reference


def encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (120, 20, 200)).save(buffer, image_format)
    return buffer.getvalue()


def test_reference_folder_pools_every_format_pillow_reads_and_leaves_other_files_out(tmp_path):
    (tmp_path / "a.gif").write_bytes(encoded("GIF"))
    (tmp_path / "b.bmp").write_bytes(encoded("BMP"))
    (tmp_path / "scan").write_bytes(encoded("PNG"))  # no suffix at all
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"broken")
    assert load_reference(str(tmp_path)).images == 3


def test_reference_folder_without_images_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "more.txt").write_text("still not an image")
    with pytest.raises(ValueError, match="at least one image"):
        load_reference(str(tmp_path))
