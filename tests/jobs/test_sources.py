"""Sources: column checks, id rules, Parquet, Arrow IPC (as `datasets.save_to_disk` writes it), and
image folders (images by content, error rows for other files and for links out of the folder,
`include` and hidden files counted as skipped)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.config import SourceConfig, validate_config
from jobs.sources import SourceError, check_ids, inspect_source, read_source
from tests.conftest import png_bytes, source_ids, write_image_parquet


def rows(count: int) -> list[dict]:
    return [{"id": f"r{i}", "image": png_bytes(16, 16, (i, i, i)), "label": i} for i in range(count)]


def test_parquet_is_planned_by_row_group_from_the_footers_and_limit_takes_the_first_rows(tmp_path):
    path = tmp_path / "rows.parquet"
    table = pa.table({"uid": [30, 10, 20, 40, 50], "img": [png_bytes()] * 5, "note": ["c", "a", "b", "d", "e"]})
    pq.write_table(table, path, row_group_size=2)
    config = SourceConfig(uri=str(path), id_column="uid", image_column="img")
    info = inspect_source(config)
    assert [(fragment.key, fragment.rows) for fragment in info.fragments] == [
        ("rows.parquet#0", 2),
        ("rows.parquet#1", 2),
        ("rows.parquet#2", 1),
    ]
    assert source_ids(config, info) == ["30", "10", "20", "40", "50"] and info.passthrough_columns == ["note"]
    limited = config.model_copy(update={"limit": 3})
    info = inspect_source(limited)
    assert [(fragment.key, fragment.rows) for fragment in info.fragments] == [
        ("rows.parquet#0", 2),
        ("rows.parquet#1", 1),
    ]
    assert source_ids(limited, info) == ["30", "10", "20"]


def test_limit_is_applied_when_reading(ray_session, tmp_path):
    path = write_image_parquet(tmp_path / "rows.parquet", rows(5))
    config = SourceConfig(uri=str(path), limit=2)
    read = read_source(config, inspect_source(config)).take_all()
    assert sorted(row["id"] for row in read) == ["r0", "r1"]
    assert {row["label"] for row in read} == {0, 1}


@pytest.mark.parametrize(
    ("table", "options", "message"),
    [
        ({"id": ["a", "a", "b"], "image": [b"x"] * 3}, {}, r"has 1 repeated ids, e.g. \['a'\]; ids must be unique"),
        ({"id": ["a", None], "image": [b"x"] * 2}, {}, "has 1 null ids"),
        (
            {"id": ["a"], "picture": [b"x"]},
            {},
            r"source.image_column 'image' is not a column of .*columns: \['id', 'picture'\]",
        ),
        ({"id": ["a"], "image": ["path/a.png"]}, {}, "has type string; accepted: binary"),
        ({"id": ["a"], "image": [b"x"], "status": ["new"]}, {}, r"source columns \['status'\] clash with columns"),
    ],
)
def test_bad_sources_are_refused_with_the_reason(tmp_path, table, options, message):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table(table), path)
    config = SourceConfig(uri=str(path), **options)
    with pytest.raises(SourceError, match=message):
        check_ids(config, inspect_source(config))


@pytest.mark.parametrize("small", [False, True])
def test_repeated_ids_across_files_and_row_groups_are_found_by_tasks(ray_session, tmp_path, monkeypatch, small):
    """Past `DRIVER_ID_CHECK_ROWS` the ids never come to the driver: tasks hash them into buckets and
    count repeats per bucket. A source within it is checked here by the same functions, with no task
    (the first tasks of a job wait seconds for their workers to start)."""
    import ray

    from jobs import sources

    remote, tasks = ray.remote, []

    def counted_remote(function):
        tasks.append(function.__name__)
        return remote(function)

    monkeypatch.setattr(ray, "remote", counted_remote)
    if not small:
        monkeypatch.setattr(sources, "DRIVER_ID_CHECK_ROWS", 0)
    (tmp_path / "in").mkdir()
    for name, ids in (("a", ["x", "y", "z", "w"]), ("b", ["v", "y", "u", "z"])):
        pq.write_table(
            pa.table({"id": ids, "image": [b"x"] * 4}), tmp_path / "in" / f"{name}.parquet", row_group_size=2
        )
    config = SourceConfig(uri=str(tmp_path / "in"))
    info = inspect_source(config)
    assert len(info.fragments) == 4
    with pytest.raises(SourceError, match=r"has 2 repeated ids, e.g. \['y', 'z'\]; ids must be unique"):
        check_ids(config, info, tasks=3)
    unique = SourceConfig(uri=str(tmp_path / "in"), limit=5)  # x y z w v: the repeats lie beyond the limit
    check_ids(unique, inspect_source(unique), tasks=2)
    assert bool(tasks) is not small


def test_two_ids_that_share_a_hash_are_no_repeat(monkeypatch, tmp_path):
    from jobs import sources

    monkeypatch.setattr(sources, "_id_hash", lambda row_id: 7 if row_id in ("p", "q") else hash(row_id) & 0xFFFF)
    pq.write_table(pa.table({"id": ["p", "q", "r"], "image": [b"x"] * 3}), tmp_path / "rows.parquet")
    config = SourceConfig(uri=str(tmp_path / "rows.parquet"))
    check_ids(config, inspect_source(config))


def test_missing_source_names_the_uri(tmp_path):
    with pytest.raises(SourceError, match=f"cannot read Parquet at source.uri {tmp_path / 'nope'}"):
        inspect_source(SourceConfig(uri=str(tmp_path / "nope")))
    with pytest.raises(SourceError, match="is not a directory"):
        inspect_source(SourceConfig(uri=str(tmp_path / "nope"), format="images"))


def test_hugging_face_save_to_disk_arrow_shards(ray_session, tmp_path):
    import datasets

    data = datasets.Dataset.from_dict(
        {"id": ["x", "y", "z"], "image": [png_bytes(8, 8)] * 3, "caption": ["one", "two", "three"]},
        features=datasets.Features(
            {"id": datasets.Value("string"), "image": datasets.Image(), "caption": datasets.Value("string")}
        ),
    )
    data.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    config = SourceConfig(uri=str(tmp_path / "saved"), format="arrow")
    info = inspect_source(config)
    assert source_ids(config, info) == ["x", "y", "z"] and info.passthrough_columns == ["caption"]
    assert len(info.fragments) == 2
    read = sorted(read_source(config, info).take_all(), key=lambda row: row["id"])
    assert [(row["id"], row["caption"], row["status"]) for row in read] == [
        ("x", "one", "ok"),
        ("y", "two", "ok"),
        ("z", "three", "ok"),
    ]
    assert read[0]["image"] == png_bytes(8, 8)


def encoded(image_format: str, color=(10, 200, 30), size=(12, 10), frames: int = 1) -> bytes:
    """An image in the given Pillow format; GIFs get `frames` frames of different colours."""
    buffer = io.BytesIO()
    first = Image.new("RGB", size, color)
    more = [Image.new("RGB", size, (index * 40, 0, 0)) for index in range(1, frames)]
    first.save(buffer, format=image_format, save_all=bool(more), append_images=more)
    return buffer.getvalue()


def image_folder(root) -> dict[str, bytes]:
    """A folder of images Pillow opens whatever their name, plus a text file; returns every file by id."""
    files = {
        "anim.gif": encoded("GIF", frames=3),
        "flat.bmp": encoded("BMP"),
        "sub/no-suffix": encoded("PNG", color=(1, 2, 3)),
        "sub/photo.JPG": encoded("JPEG"),
        "notes.txt": b"not an image",
    }
    for row_id, data in files.items():
        (root / row_id).parent.mkdir(parents=True, exist_ok=True)
        (root / row_id).write_bytes(data)
    return files


def read_rows(config: SourceConfig) -> dict[str, dict]:
    return {row["id"]: row for row in read_source(config, inspect_source(config)).take_all()}


def test_folder_images_are_recognised_by_content_and_other_files_become_error_rows(ray_session, tmp_path):
    files = image_folder(tmp_path)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "thumb.png").write_bytes(encoded("PNG"))
    config = SourceConfig(uri=str(tmp_path), format="images")

    info = inspect_source(config)
    rows = read_rows(config)

    assert source_ids(config, info) == ["anim.gif", "flat.bmp", "notes.txt", "sub/no-suffix", "sub/photo.JPG"]
    # Hidden files and folders are never inputs, but they are counted and named.
    assert info.skipped == [".DS_Store", ".cache/thumb.png"]
    assert sorted(rows) == source_ids(config, info)
    assert {row_id: rows[row_id]["status"] for row_id in rows} == {
        "anim.gif": "ok",
        "flat.bmp": "ok",
        "notes.txt": "error",
        "sub/no-suffix": "ok",
        "sub/photo.JPG": "ok",
    }
    assert rows["notes.txt"]["error"] == "not an image Pillow can open: notes.txt"
    assert rows["notes.txt"]["image"] is None
    assert {row_id: rows[row_id]["image"] for row_id in rows if row_id != "notes.txt"} == {
        row_id: data for row_id, data in files.items() if row_id != "notes.txt"
    }


def test_dicom_file_in_a_folder_is_an_error_row_that_says_so(ray_session, tmp_path):
    (tmp_path / "a.png").write_bytes(encoded("PNG"))
    (tmp_path / "scan.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00")
    rows = read_rows(SourceConfig(uri=str(tmp_path), format="images"))
    assert rows["scan.dcm"]["status"] == "error"
    assert rows["scan.dcm"]["error"] == "a DICOM file (read DICOM folders with source.format: dicom): scan.dcm"
    assert rows["a.png"]["status"] == "ok"


def test_include_filter_reads_only_matching_files_and_counts_the_rest(tmp_path):
    image_folder(tmp_path)
    (tmp_path / "sub" / "deeper").mkdir()
    (tmp_path / "sub" / "deeper" / "x.gif").write_bytes(encoded("GIF"))
    (tmp_path / ".hidden.gif").write_bytes(encoded("GIF"))
    config = SourceConfig(uri=str(tmp_path), format="images", include=["*.GIF", "**/*.jpg"])

    info = inspect_source(config)

    # `*` crosses folders, `**/` also matches at the top, and matching ignores case.
    assert source_ids(config, info) == ["anim.gif", "sub/deeper/x.gif", "sub/photo.JPG"]
    assert info.skipped == [".hidden.gif", "flat.bmp", "notes.txt", "sub/no-suffix"]
    assert info.skipped_files == 4
    with pytest.raises(SourceError, match=r"no file under source.uri .* matches source.include \['\*.png'\]"):
        inspect_source(SourceConfig(uri=str(tmp_path / "sub"), format="images", include=["*.png"]))


def test_symlinks_leaving_the_folder_are_error_rows_and_never_read(ray_session, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    secret = encoded("PNG", color=(123, 45, 67))
    (outside / "secret.png").write_bytes(secret)
    (outside / "more.png").write_bytes(secret)
    kept = encoded("PNG", color=(9, 9, 9))
    (root / "real.png").write_bytes(kept)
    (root / "sub").mkdir()
    (root / "leak.png").symlink_to(outside / "secret.png")
    (root / "sub" / "up.png").symlink_to("../../outside/secret.png")
    (root / "folder-link").symlink_to(outside, target_is_directory=True)
    (root / "alias.png").symlink_to("real.png")
    (root / "sub" / "same").symlink_to(root / "sub", target_is_directory=True)
    (root / "gone.png").symlink_to(root / "missing.png")
    config = SourceConfig(uri=str(root), format="images")

    info = inspect_source(config)
    rows = read_rows(config)

    assert source_ids(config, info) == [
        "alias.png",
        "folder-link",
        "gone.png",
        "leak.png",
        "real.png",
        "sub/same",
        "sub/up.png",
    ]
    assert {row_id: (row["status"], row["error"]) for row_id, row in rows.items()} == {
        "alias.png": ("ok", None),
        "real.png": ("ok", None),
        "folder-link": ("error", "symlink leaves the source folder: folder-link"),
        "leak.png": ("error", "symlink leaves the source folder: leak.png"),
        "sub/up.png": ("error", "symlink leaves the source folder: sub/up.png"),
        "sub/same": ("error", "symlink loops back into a folder it is in: sub/same"),
        "gone.png": ("error", "symlink target does not exist: gone.png"),
    }
    assert rows["alias.png"]["image"] == rows["real.png"]["image"] == kept
    assert all(row["image"] is None for row_id, row in rows.items() if row["status"] == "error")
    assert not any(secret == row["image"] for row in rows.values())


def test_a_resumed_folder_fragment_reads_only_its_rows_left_and_refused_ones_stay_unread(ray_session, tmp_path):
    image_folder(tmp_path)
    (tmp_path / "leak.png").symlink_to("/etc/hostname")
    config = SourceConfig(uri=str(tmp_path), format="images")
    info = inspect_source(config)
    ids = source_ids(config, info)
    keep = {ids.index("flat.bmp"), ids.index("leak.png")}
    skip = {0: frozenset(set(range(len(ids))) - keep)}
    rows = read_source(config, info, skip_rows=skip).take_all()
    assert sorted((row["id"], row["status"], row["_row"]) for row in rows) == [
        ("flat.bmp", "ok", ids.index("flat.bmp")),
        ("leak.png", "error", ids.index("leak.png")),
    ]
    only_refused = {0: frozenset(set(range(len(ids))) - {ids.index("leak.png")})}
    rows = read_source(config, info, skip_rows=only_refused, keep_source_image=True).take_all()
    assert [(row["id"], row["status"], row["source_image"]) for row in rows] == [("leak.png", "error", None)]


def test_folder_job_counts_errors_and_skipped_files_and_never_publishes_a_linked_outside_file(ray_session, tmp_path):
    from jobs.pipeline import run_job

    folder, outside, sink = tmp_path / "in", tmp_path / "outside", tmp_path / "out"
    folder.mkdir()
    outside.mkdir()
    image_folder(folder)
    (folder / "skip.jpg").write_bytes(encoded("JPEG"))
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    secret = encoded("PNG", color=(250, 1, 2), size=(20, 20))
    (outside / "private.png").write_bytes(secret)
    (folder / "leak.gif").symlink_to(outside / "private.png")
    (folder / "same.bmp").symlink_to("flat.bmp")
    config = validate_config(
        {
            "source": {"uri": str(folder), "format": "images", "include": ["*.gif", "*.bmp", "*.txt", "sub/*"]},
            "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}], "output_mode": "rgb"}],
            "sink": {"uri": str(sink), "write_images": True},
        }
    )

    result = run_job(config)

    summary = json.loads((sink / "summary.json").read_text())
    assert summary == {**summary, "rows_in": 7, "rows_out": 7, "ok": 5, "error": 2, "skipped": 2, "missing": 0}
    table = pq.read_table(sink / "data").sort_by("id")
    statuses = dict(
        zip(table.column("id").to_pylist(), zip(table.column("status").to_pylist(), table.column("error").to_pylist()))
    )
    assert statuses == {
        "anim.gif": ("ok", None),
        "flat.bmp": ("ok", None),
        "leak.gif": ("error", "symlink leaves the source folder: leak.gif"),
        "notes.txt": ("error", "not an image Pillow can open: notes.txt"),
        "same.bmp": ("ok", None),
        "sub/no-suffix": ("ok", None),
        "sub/photo.JPG": ("ok", None),
    }
    report = (sink / "report.html").read_text()
    assert "2 files skipped (hidden, or matching no source.include pattern): .DS_Store, skip.jpg</p>" in report
    assert result.summary["skipped"] == 2
    # The linked file's pixels appear nowhere: no output row, PNG or report thumbnail holds them.
    assert table.filter(pc.equal(table.column("id"), "leak.gif")).column("image").to_pylist() == [None]
    # Five PNGs for the five ok rows, none for the link.
    assert len(list((sink / "images").rglob("*.png"))) == 5
    assert report.count("data:image/webp;base64,") == 10  # input and output of the five ok rows only


def test_a_file_that_became_a_link_out_of_the_folder_after_listing_is_not_passed_on(tmp_path):
    from jobs.sources import read_fragment
    from operators.storage import filesystem_for

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "private.png").write_bytes(encoded("PNG"))
    (root / "a.png").write_bytes(encoded("PNG"))
    (root / "b.png").write_bytes(encoded("PNG"))
    config = SourceConfig(uri=str(root), format="images")
    fragment = inspect_source(config).fragments[0]
    (root / "b.png").unlink()
    (root / "b.png").symlink_to(outside / "private.png")  # after the listing, before the read
    filesystem, resolved = filesystem_for(str(root))
    rows = read_fragment(config, filesystem, resolved, 0, fragment, {}, keep_source_image=True)
    assert rows.column("status").to_pylist() == ["ok", "error"]
    assert rows.column("error").to_pylist() == [None, "symlink leaves the source folder: b.png"]
    assert rows.column("image").to_pylist()[1] is None and rows.column("source_image").to_pylist()[1] is None
    assert rows.column("_row").to_pylist() == [0, 1] and rows.column("_fragment").to_pylist() == [0, 0]


def test_arrow_files_without_the_id_column_are_refused(tmp_path):
    for name, table in (
        ("a.arrow", pa.table({"id": ["x"], "image": [png_bytes(8, 8)]})),
        ("b.arrow", pa.table({"image": [png_bytes(8, 8)]})),
    ):
        with pa.ipc.new_file(tmp_path / name, table.schema) as writer:
            writer.write_table(table)
    config = SourceConfig(uri=str(tmp_path), format="arrow")
    with pytest.raises(SourceError, match="source.id_column 'id' has 1 null ids"):
        check_ids(config, inspect_source(config))


def test_reading_no_fragments_gives_no_rows_in_the_job_form(ray_session, tmp_path):
    path = write_image_parquet(tmp_path / "rows.parquet", rows(2))
    config = SourceConfig(uri=str(path))
    dataset = read_source(config, inspect_source(config), fragments=[])
    assert dataset.count() == 0 and {"id", "image", "status", "error", "_fragment", "_row"} <= set(dataset.columns())
