"""Whole jobs on the shared local Ray session: accounting, determinism, HF-loadable output."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.commits import SinkError
from jobs.config import validate_config
from jobs.pipeline import run_job
from jobs.sinks import image_file_name
from operators.images import EncodingConfig
from operators.rows import derive_seed
from tests.conftest import png_bytes, write_image_parquet

GOOD_IDS = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    rows = [
        {"id": row_id, "image": png_bytes(48 + 8 * i, 40, (40 * i, 100, 180)), "label": i, "tags": [row_id, "x"]}
        for i, row_id in enumerate(GOOD_IDS)
    ]
    rows.append({"id": "truncated", "image": png_bytes()[:50], "label": 98, "tags": []})
    rows.append({"id": "missing", "image": None, "label": 99, "tags": None})
    return write_image_parquet(tmp_path_factory.mktemp("source") / "rows.parquet", rows)


def job(source, sink, sink_mode="resume", **operator):
    fields = {
        "kind": "img2img",
        "model": "",
        "prompt": "a pastel drawing",
        "negative_prompt": "text",
        "num_inference_steps": 2,
        "strength": 0.5,
        "batch_size": 2,
        "variants": 2,
    }
    fields.update(operator)
    return validate_config(
        {
            "source": {"uri": str(source)},
            "operators": [fields],
            "sink": {"uri": str(sink), "write_images": True, "mode": sink_mode},
            "run": {"seed": 42},
        }
    )


@pytest.fixture(scope="module")
def first_run(ray_session, source, sd_model, tmp_path_factory):
    sink = tmp_path_factory.mktemp("out") / "run-a"
    result = run_job(job(source, sink, model=str(sd_model), batch_size=2))
    return sink, result


def read_rows(sink):
    return pq.read_table(sink / "data").to_pylist()


def test_every_input_is_accounted_for_exactly_once(first_run):
    sink, result = first_run
    rows = read_rows(sink)
    pairs = sorted((row["id"], row["variant_index"]) for row in rows)
    all_ids = sorted([*GOOD_IDS, "truncated", "missing"])
    assert pairs == [(row_id, v) for row_id in all_ids for v in (0, 1)]
    status = {(row["id"], row["variant_index"]): row["status"] for row in rows}
    errors = sorted(key for key, value in status.items() if value == "error")
    assert errors == [("missing", 0), ("missing", 1), ("truncated", 0), ("truncated", 1)]
    summary = json.loads((sink / "summary.json").read_text())
    assert (summary["rows_in"], summary["rows_out"], summary["ok"], summary["error"]) == (7, 14, 10, 4)
    assert result.summary["missing"] == result.summary["duplicated"] == 0


def test_rows_carry_seed_parameters_and_passthrough(first_run, sd_model):
    sink, _ = first_run
    rows = {(row["id"], row["variant_index"]): row for row in read_rows(sink)}
    row = rows[("c", 1)]
    assert row["seed"] == derive_seed(42, "c", 1)
    assert row["label"] == 2 and row["tags"] == ["c", "x"]
    assert (row["width"], row["height"]) == (64, 40)
    assert row["img2img"]["model"] == str(sd_model)
    assert row["img2img"]["strength"] == 0.5 and row["img2img"]["negative_prompt"] == "text"
    assert row["img2img"]["model_seconds"] > 0 and row["img2img"]["prepare_seconds"] > 0
    assert row["image"]["path"] == image_file_name("c", 1)
    assert rows[("missing", 0)]["error"] == "image has no bytes in this row (path-only references are not read)"
    assert rows[("truncated", 1)]["error"].startswith("cannot decode image")
    assert rows[("truncated", 1)]["image"] is None


def test_output_loads_with_hugging_face_datasets(first_run):
    import datasets

    sink, _ = first_run
    loaded = datasets.load_dataset("parquet", data_files=str(sink / "data" / "*.parquet"), split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    first_ok = next(row for row in loaded if row["status"] == "ok")
    assert isinstance(first_ok["image"], Image.Image)
    assert first_ok["image"].size == (first_ok["width"], first_ok["height"])
    assert len(loaded) == 14


def test_image_files_carry_generation_parameters(first_run):
    sink, _ = first_run
    files = sorted(path.relative_to(sink / "images").as_posix() for path in (sink / "images").rglob("*.png"))
    assert files == sorted(image_file_name(row_id, v) for row_id in GOOD_IDS for v in (0, 1))
    text = Image.open(sink / "images" / image_file_name("a", 0)).text["parameters"]
    assert text.startswith("a pastel drawing\nNegative prompt: text\nSteps: 2, ")
    assert f"Seed: {derive_seed(42, 'a', 0)}, Size: 48x40, " in text


def test_report_shows_inputs_beside_outputs(first_run):
    sink, result = first_run
    page = (sink / "report.html").read_text()
    assert result.summary["report"].endswith("report.html")
    assert page.count('<figure class="variant ok">') == 10 and page.count('<figure class="variant error">') == 4
    assert page.count("<figure class=input>") == 7  # each input once, beside its two variants
    assert page.count("data:image/webp;base64,") == 5 + 10  # the five readable inputs and their outputs


def test_a_single_file_source_fills_every_model_call(ray_session, sd_model, tmp_path, monkeypatch):
    """One Parquet file is one fragment, split for parallelism into blocks that hold whole batches, so
    every model call has `model_batch_size` rows. Ray's own split cuts into its minimum number of read
    blocks whatever the batch (1 024 rows into its default 200: blocks of 5 and 6, each a call of 4 and
    one of 1 or 2); a minimum of 4 cuts these 24 rows into blocks of 6."""
    import ray.data

    monkeypatch.setattr(ray.data.DataContext.get_current(), "read_op_min_num_blocks", 4)
    rows = [{"id": f"r{i:02d}", "image": png_bytes(16, 16, (i * 10, 0, 0))} for i in range(24)]
    source = write_image_parquet(tmp_path / "rows.parquet", rows)
    sink = tmp_path / "out"
    run_job(job(source, sink, model=str(sd_model), batch_size=4, model_batch_size=4, variants=1))
    calls = [(row["id"], row["img2img"]["model_call_rows"]) for row in read_rows(sink)]
    assert sorted(calls) == [(row["id"], 4) for row in rows]


def test_same_config_other_batch_size_gives_identical_bytes(first_run, source, sd_model, tmp_path):
    sink_a, _ = first_run
    sink_b = tmp_path / "run-b"
    run_job(job(source, sink_b, model=str(sd_model), batch_size=3))

    def images(sink):
        return {(r["id"], r["variant_index"]): r["image"] and r["image"]["bytes"] for r in read_rows(sink)}

    first, second = images(sink_a), images(sink_b)
    assert first.keys() == second.keys()
    assert first == second


def test_rerunning_a_finished_job_writes_nothing_new(first_run, source, sd_model):
    sink, result = first_run
    before = {path: path.stat().st_mtime_ns for path in (sink / "data").iterdir()}
    images_before = {path: path.stat().st_mtime_ns for path in (sink / "images").rglob("*.png")}
    again = run_job(job(source, sink, model=str(sd_model)))
    assert again.summary["inputs_processed"] == 0 and again.summary["rows_out"] == 14
    assert {path: path.stat().st_mtime_ns for path in (sink / "data").iterdir()} == before
    assert {path: path.stat().st_mtime_ns for path in (sink / "images").rglob("*.png")} == images_before
    manifest = json.loads((sink / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 14
    assert manifest["config_hash"] == result.summary["config_hash"] == again.summary["config_hash"]
    assert sum(shard["rows"] for shard in manifest["shards"]) == 14


def test_a_changed_config_does_not_mix_with_earlier_output(first_run, source, sd_model):
    sink, _ = first_run
    with pytest.raises(
        SinkError, match="holds output of a different config .* Use a new sink.uri, or sink.mode: overwrite"
    ):
        run_job(job(source, sink, model=str(sd_model), strength=0.75))
    # Another encoding of the same rows would mix file formats or compression in one dataset.
    config = job(source, sink, model=str(sd_model))
    webp = config.model_copy(
        update={"sink": config.sink.model_copy(update={"encoding": EncodingConfig(format="webp")})}
    )
    with pytest.raises(SinkError, match="holds output of a different config"):
        run_job(webp)


def test_sink_mode_error_refuses_a_non_empty_sink(first_run, source, sd_model):
    sink, _ = first_run
    config = job(source, sink, sink_mode="error", model=str(sd_model))
    with pytest.raises(SinkError, match="is not empty; choose a new uri"):
        run_job(config)


def test_image_folder_source(ray_session, sd_model, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.png").write_bytes(png_bytes(32, 32))
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), (1, 2, 3)).save(buffer, format="JPEG")
    (folder / "sub" / "two.JPG").write_bytes(buffer.getvalue())
    (folder / "sub" / "broken.webp").write_bytes(b"RIFF....WEBP")
    (folder / "notes.txt").write_text("not an image")
    sink = tmp_path / "out"
    config = validate_config(
        {
            "source": {"uri": str(folder), "format": "images"},
            "operators": [
                {"kind": "img2img", "model": str(sd_model), "prompt": "x", "num_inference_steps": 2, "strength": 0.5}
            ],
            "sink": {"uri": str(sink)},
        }
    )
    result = run_job(config)
    table = pq.read_table(sink / "data").sort_by("id")
    assert table.column("id").to_pylist() == ["notes.txt", "one.png", "sub/broken.webp", "sub/two.JPG"]
    assert table.column("status").to_pylist() == ["error", "ok", "error", "ok"]
    assert table.column("error").to_pylist()[0] == "not an image Pillow can open: notes.txt"
    assert result.summary["rows_in"] == 4
    assert pa.types.is_struct(table.schema.field("image").type)


def test_sink_encoding_webp_writes_webp_once_with_the_parameters_and_the_same_pixels(
    ray_session, source, sd_model, first_run, tmp_path
):
    from operators.images import EncodingConfig, read_parameters

    sink = tmp_path / "webp"
    config = job(source, sink, model=str(sd_model), batch_size=2)
    config = config.model_copy(
        update={"sink": config.sink.model_copy(update={"encoding": EncodingConfig(format="webp")})}
    )
    run_job(config)
    rows = {(row["id"], row["variant_index"]): row for row in read_rows(sink)}
    png_rows = {(row["id"], row["variant_index"]): row for row in read_rows(first_run[0])}
    row, png_row = rows[("a", 1)], png_rows[("a", 1)]
    data = row["image"]["bytes"]
    assert row["image"]["path"].endswith(".v1.webp")
    assert (sink / "images" / row["image"]["path"]).read_bytes() == data
    assert Image.open(io.BytesIO(data)).format == "WEBP"
    # Lossless WebP of the very pixels the PNG run wrote, carrying the same AUTOMATIC1111 text.
    png = Image.open(io.BytesIO(png_row["image"]["bytes"]))
    assert list(Image.open(io.BytesIO(data)).convert("RGB").getdata()) == list(png.convert("RGB").getdata())
    assert read_parameters(data) == png.text["parameters"]
    assert row["img2img"]["encoding"].startswith("webp lossless")
    assert png_row["img2img"]["encoding"].startswith(f"png level {EncodingConfig().resolved_png_level()}")
    assert row["img2img"]["finish_seconds"] > 0 and rows[("missing", 0)]["img2img"]["encoding"] is None
