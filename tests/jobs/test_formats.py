"""WebDataset and Hugging Face imagefolder sources and sinks, caption files beside images, and image
files recognised by content."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.commits import survey
from jobs.config import SourceConfig, validate_config
from jobs.sinks import webdataset_key, webdataset_tar
from jobs.sources import SourceError, fragment_ids, inspect_source, read_fragment
from operators.storage import filesystem_for


def encoded(color, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, image_format)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


@pytest.fixture
def shards(tmp_path) -> Path:
    folder = tmp_path / "wds"
    folder.mkdir()
    write_tar(
        folder / "shard-000.tar",
        [
            ("a.jpg", encoded("red", "JPEG")),
            ("a.txt", b"a red square"),
            ("a.json", b'{"score": 1}'),
            ("sub/b.jpg", encoded("blue", "JPEG")),
            ("sub/b.txt", b"a blue square"),
            ("sub/b.cls", b"3"),
        ],
    )
    write_tar(folder / "shard-001.tar", [("c.jpg", b"not an image"), ("c.txt", b"broken"), ("d.txt", b"no image")])
    return folder


def read_all(config: SourceConfig, **options):
    info = inspect_source(config)
    filesystem, root = filesystem_for(config.uri, {})
    tables = [
        read_fragment(config, filesystem, root, index, fragment, info.column_types, **options)
        for index, fragment in enumerate(info.fragments)
    ]
    return info, [table.drop_columns(["image"]).to_pylist() for table in tables], tables


def test_webdataset_source_is_one_fragment_per_shard_with_members_as_columns(shards):
    config = SourceConfig(uri=str(shards), format="webdataset")
    info, rows, tables = read_all(config)
    assert [(fragment.key, fragment.rows) for fragment in info.fragments] == [
        ("shard-000.tar", 2),
        ("shard-001.tar", 2),
    ]
    assert info.passthrough_columns == ["txt", "json", "cls"]
    assert rows[0] == [
        {"id": "a", "status": "ok", "error": None, "txt": "a red square", "json": '{"score": 1}', "cls": None,
         "_fragment": 0, "_row": 0},
        {"id": "sub/b", "status": "ok", "error": None, "txt": "a blue square", "json": None, "cls": "3",
         "_fragment": 0, "_row": 1},
    ]  # fmt: skip
    assert tables[0].column("image").to_pylist()[0] == encoded("red", "JPEG")
    assert [row["error"] for row in rows[1]] == [
        "not an image Pillow can open: shard-001.tar c",
        "sample has no image member: shard-001.tar d",
    ]
    filesystem, root = filesystem_for(config.uri, {})
    assert fragment_ids(config, filesystem, root, 0, info.fragments[0]) == ["a", "sub/b"]


def test_webdataset_source_skips_committed_samples_and_reads_only_the_first(shards):
    config = SourceConfig(uri=str(shards), format="webdataset")
    _, rows, _ = read_all(config, skip_rows=frozenset({0}))
    assert [(row["id"], row["_row"]) for row in rows[0]] == [("sub/b", 1)]
    _, rows, _ = read_all(config, first=1)
    assert [[row["id"] for row in fragment] for fragment in rows] == [["a"], ["c"]]
    limited = inspect_source(SourceConfig(uri=str(shards), format="webdataset", limit=3))
    assert [fragment.rows for fragment in limited.fragments] == [2, 1]


def test_webdataset_image_column_names_the_image_member(shards, tmp_path):
    config = SourceConfig(uri=str(shards), format="webdataset", image_column="txt")
    info = inspect_source(config)
    assert "jpg" in info.column_types and "txt" not in info.column_types
    with pytest.raises(SourceError, match="source.image_column 'png' is no member extension"):
        inspect_source(SourceConfig(uri=str(shards), format="webdataset", image_column="png"))
    write_tar(tmp_path / "texts.tar", [("a.txt", b"x")])
    with pytest.raises(SourceError, match="has no image member"):
        inspect_source(SourceConfig(uri=str(tmp_path / "texts.tar"), format="webdataset"))


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "photo.png").write_bytes(encoded("red"))
    (root / "photo.txt").write_text("a red photo\n")
    (root / "photo.caption").write_text("not this one")
    (root / "anim.gif").write_bytes(encoded("green", "GIF"))
    (root / "anim.caption").write_text("a green gif")
    (root / "notes.txt").write_text("no image beside me")
    (root / "sub" / "scan.bmp").write_bytes(encoded("blue", "BMP"))
    (root / "sub" / "scan.tiff").write_bytes(encoded("blue", "TIFF"))
    return root


def test_image_folder_reads_every_format_pillow_reads_and_captions_beside_images(folder):
    info, rows, _ = read_all(SourceConfig(uri=str(folder), format="images"))
    assert info.passthrough_columns == ["caption"]
    assert [(row["id"], row["status"], row["caption"]) for row in rows[0]] == [
        ("anim.gif", "ok", "a green gif"),
        ("notes.txt", "error", None),
        ("photo.png", "ok", "a red photo"),  # .txt is taken over .caption
        ("sub/scan.bmp", "ok", None),
        ("sub/scan.tiff", "ok", None),
    ]


def test_imagefolder_metadata_maps_file_names_to_columns(folder):
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "photo.png", "prompt": "oil painting", "score": 2}) + "\n"
        + json.dumps({"file_name": "anim.gif", "prompt": "sketch", "caption": "from metadata"}) + "\n"
    )  # fmt: skip
    (folder / "sub" / "metadata.csv").write_text("file_name,prompt\nscan.bmp,watercolour\n")
    info, rows, _ = read_all(SourceConfig(uri=str(folder), format="imagefolder"))
    assert {name: str(kind) for name, kind in info.column_types.items()} == {
        "caption": "string",
        "prompt": "string",
        "score": "int64",
    }
    assert [(row["id"], row["prompt"], row["score"], row["caption"]) for row in rows[0]] == [
        ("anim.gif", "sketch", None, "from metadata"),  # the metadata's value wins over the caption file
        ("notes.txt", None, None, None),
        ("photo.png", "oil painting", 2, "a red photo"),
        ("sub/scan.bmp", "watercolour", None, None),
        ("sub/scan.tiff", None, None, None),
    ]
    (folder / "metadata.jsonl").write_text(json.dumps({"name": "photo.png"}) + "\n")
    with pytest.raises(SourceError, match="imagefolder metadata metadata.jsonl of source.uri .* has no 'file_name'"):
        inspect_source(SourceConfig(uri=str(folder), format="imagefolder"))


def test_webdataset_tar_of_a_shard_holds_ok_rows_as_image_and_json(tmp_path):
    import pyarrow as pa

    shard = pa.table(
        {
            "id": ["cat.png", "dog"],
            "image": pa.array(
                [{"bytes": b"PNG", "path": "x"}, None], pa.struct([("bytes", pa.binary()), ("path", pa.string())])
            ),
            "variant_index": [0, 0],
            "status": ["ok", "error"],
            "caption": ["a cat", None],
        }
    )
    data = webdataset_tar(shard, ".png")
    assert data == webdataset_tar(shard, ".png")  # no time or owner of this machine in it
    key = webdataset_key("cat.png", 0)
    assert "." not in key
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == [f"{key}.png", f"{key}.json"]
        assert tar.extractfile(f"{key}.png").read() == b"PNG"
        assert json.loads(tar.extractfile(f"{key}.json").read()) == {
            "id": "cat.png",
            "variant_index": 0,
            "status": "ok",
            "caption": "a cat",
        }


def test_survey_counts_webdataset_shards_and_imagefolder_metadata_as_restyle_output(tmp_path):
    (tmp_path / "webdataset").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "webdataset" / "part-a0001-abc123-00000-000.tar").write_bytes(b"")
    (tmp_path / "webdataset" / "mine.tar").write_bytes(b"")
    (tmp_path / "images" / "metadata.jsonl").write_text("")
    filesystem, root = filesystem_for(str(tmp_path), {})
    ours, foreign = survey(filesystem, root)
    assert sorted(path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1] for path in ours) == [
        "images/metadata.jsonl",
        "webdataset/part-a0001-abc123-00000-000.tar",
    ]
    assert foreign == ["webdataset/mine.tar"]


def test_webdataset_in_webdataset_and_imagefolder_out(ray_session, shards, tmp_path):
    from jobs.pipeline import run_job

    sink = tmp_path / "out"
    config = validate_config(
        {
            "source": {"uri": str(shards), "format": "webdataset"},
            "operators": [{"kind": "standardize", "steps": [{"op": "normalize", "method": "minmax"}]}],
            "sink": {"uri": str(sink), "webdataset": True, "imagefolder": True},
        }
    )
    result = run_job(config)
    assert result.summary["rows_in"] == 4
    table = pq.read_table(sink / "data").sort_by("id")
    assert table.column("id").to_pylist() == ["a", "c", "d", "sub/b"]
    assert table.column("txt").to_pylist() == ["a red square", "broken", "no image", "a blue square"]
    samples = {}
    for path in sorted((sink / "webdataset").iterdir()):
        assert path.name.removesuffix(".tar") + ".parquet" in {shard.name for shard in (sink / "data").iterdir()}
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                samples[member.name] = tar.extractfile(member).read()
    keys = {webdataset_key(row_id, 0): row_id for row_id in ("a", "sub/b")}
    assert sorted(samples) == sorted(f"{key}.{suffix}" for key in keys for suffix in ("json", "png"))
    for key, row_id in keys.items():
        assert json.loads(samples[f"{key}.json"])["id"] == row_id
        assert Image.open(io.BytesIO(samples[f"{key}.png"])).size == (8, 6)
    lines = [json.loads(line) for line in (sink / "images" / "metadata.jsonl").read_text().splitlines()]
    assert sorted((line["id"], line["txt"]) for line in lines) == [("a", "a red square"), ("sub/b", "a blue square")]
    assert all((sink / "images" / line["file_name"]).is_file() for line in lines)
    # --rerun-failed rewrites the shards holding error rows: each keeps its tar, under its new name.
    run_job(config, rerun_failed=True)
    shards = {path.name.removesuffix(".parquet") for path in (sink / "data").iterdir()}
    tars = {path.name.removesuffix(".tar") for path in (sink / "webdataset").iterdir()}
    assert tars == shards
    again = {}
    for path in (sink / "webdataset").iterdir():
        with tarfile.open(path) as tar:
            again.update({member.name: tar.extractfile(member).read() for member in tar.getmembers()})
    assert again == samples
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(sink / "images"), split="train")
    assert sorted(loaded["id"]) == ["a", "sub/b"]
    assert loaded[0]["image"].size == (8, 6)


def test_a_crashed_attempt_s_uncommitted_webdataset_tar_is_removed_with_its_shard(tmp_path):
    from jobs.commits import SinkState
    from jobs.config import SinkConfig

    (tmp_path / "webdataset").mkdir()
    orphan = tmp_path / "webdataset" / "part-a0001-abc123-00000-000.tar"
    orphan.write_bytes(b"")
    (tmp_path / "webdataset" / "mine.tar").write_bytes(b"")
    assert SinkState(SinkConfig(uri=str(tmp_path))).remove_leftovers() == 1
    assert sorted(path.name for path in (tmp_path / "webdataset").iterdir()) == ["mine.tar"]


def test_webdataset_keys_repeated_across_shards_are_refused(tmp_path):
    from jobs.sources import check_ids

    write_tar(tmp_path / "0.tar", [("a.png", encoded("red")), ("b.png", encoded("red"))])
    write_tar(tmp_path / "1.tar", [("a.png", encoded("blue"))])
    config = SourceConfig(uri=str(tmp_path), format="webdataset")
    with pytest.raises(SourceError, match=r"has 1 repeated ids, e.g. \['a'\]"):
        check_ids(config, inspect_source(config))
