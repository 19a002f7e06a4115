"""report.html, written from sinks built here directly (no Ray): cards, charts, every error grouped,
a sample across the run with each input beside its variants, its size, and its rendering in Chromium."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.commits import SinkState, shard_commit, shard_name, write_shard
from jobs.config import validate_config
from jobs.report import _thumbnail, account_for_rows, error_key, sample_key, write_report
from jobs.sources import inspect_source
from operators.storage import filesystem_for
from tests.conftest import png_bytes

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
STAGE_TYPE = pa.struct(
    [
        ("prompt", pa.string()),
        ("strength", pa.float64()),
        ("seed", pa.int64()),
        ("node_id", pa.string()),
        ("prepare_seconds", pa.float64()),
        ("model_seconds", pa.float64()),
        ("finish_seconds", pa.float64()),
    ]
)


def build_sink(tmp_path, count=30, variants=2, report_rows=6, image=None, rows_per_group=10, device="cpu"):
    """A source of `count` inputs and a committed sink of their outputs (shards of 20 rows): every
    third input fails (both variants), and variant 1 of every fifth other input is rejected by
    min_ssim. Returns (config, info, state, summary)."""
    ids = [f"row-{index:04d}" for index in range(count)]
    picture = image or png_bytes(48, 40, (30, 120, 200))
    source = tmp_path / "in" / "rows.parquet"
    source.parent.mkdir(parents=True)
    images = pa.array([{"bytes": picture, "path": None}] * count, IMAGE_TYPE)
    pq.write_table(pa.table({"id": ids, "image": images}), source, row_group_size=rows_per_group)
    sink = tmp_path / "out"
    config = validate_config(
        {
            "source": {"uri": str(source)},
            "operators": [
                {"kind": "img2img", "model": "", "prompt": "a pastel drawing", "variants": variants, "device": device}
            ],
            "sink": {"uri": str(sink), "report_rows": report_rows},
            "fidelity": {"min_ssim": 0.5},
            "run": {"seed": 7},
        }
    )
    info = inspect_source(config.source)
    rows = []
    for fragment in info.fragments:
        start = int(fragment.key.rsplit("#", 1)[1]) * rows_per_group
        for row in range(fragment.rows):
            index = start + row
            for variant in range(variants):
                failed = index % 3 == 0
                rejected = not failed and index % 5 == 0 and variant == 1
                rows.append(
                    {
                        "id": ids[index],
                        "source_fragment": fragment.key,
                        "source_row": row,
                        "variant_index": variant,
                        "status": "error" if failed else "rejected" if rejected else "ok",
                        "error": f"cannot decode {ids[index]}: truncated at byte {index * 7}"
                        if failed
                        else f"ssim 0.{index:04d} < min_ssim 0.5"
                        if rejected
                        else None,
                        "seed": 1000 * index + variant,
                        "width": None if failed else 48,
                        "height": None if failed else 40,
                        "image": None if failed else {"bytes": picture, "path": None},
                        "ssim": None if failed else 0.3 if rejected else 0.9,
                        "psnr": None if failed else float("inf") if index == 1 else 30.0 + variant,
                        "histogram_distance": None,
                        "img2img": {
                            "prompt": "a pastel drawing",
                            "strength": 0.5,
                            "seed": 1000 * index + variant,
                            "node_id": f"node-{index % 2}",
                            "prepare_seconds": 0.5,
                            "model_seconds": 2.0,
                            "finish_seconds": None if failed else 0.25,
                        },
                    }
                )
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("source_fragment", pa.string()),
            ("source_row", pa.int64()),
            ("variant_index", pa.int32()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("seed", pa.int64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("image", IMAGE_TYPE),
            ("ssim", pa.float64()),
            ("psnr", pa.float64()),
            ("histogram_distance", pa.float64()),
            ("img2img", STAGE_TYPE),
        ]
    )
    filesystem, root = filesystem_for(str(sink), {})
    filesystem.makedirs(root, exist_ok=True)
    for shard, start in enumerate(range(0, len(rows), 20)):
        table = pa.Table.from_pylist(rows[start : start + 20], schema)
        name = shard_name(1, "run00001", "00000", shard)
        write_shard(filesystem, root, name, table, shard_commit(name, table, _hash(config), 1, "run00001"))
    state = SinkState(config.sink)
    summary = account_for_rows(config, types.SimpleNamespace(expected_rows=count * variants), info, state, 12.5)
    return config, info, state, summary


def _hash(config):
    from jobs.commits import config_hash

    return config_hash(config)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of a 30-input, 2-variant sink, sampling 6 inputs."""
    config, info, state, summary = build_sink(tmp_path_factory.mktemp("report"))
    path = write_report(config, info, summary, state)
    return path, open(path, encoding="utf-8").read()


def test_every_error_and_rejection_is_grouped_by_message_with_five_example_ids(report):
    _, page = report
    # Inputs 0, 3, ..., 27 fail in both variants: 20 rows, one group although each message names its id.
    examples = ", ".join(f"row-{index:04d} (variant {variant})" for index in (0, 3, 6) for variant in (0, 1))
    examples = examples.rsplit(", ", 1)[0]  # five examples, in shard order
    assert (
        "<tr class=error><td>20</td><td>error</td><td class=message>cannot decode row-0000: truncated at byte 0</td>"
        f"<td>{examples}</td></tr>"
    ) in page
    # Inputs 5, 10, 20, 25 (not 15: it fails) have variant 1 rejected: 4 rows, read from every shard.
    assert (
        "<tr class=rejected><td>4</td><td>rejected</td><td class=message>ssim 0.0005 &lt; min_ssim 0.5</td>"
        "<td>row-0005 (variant 1), row-0010 (variant 1), row-0020 (variant 1), row-0025 (variant 1)</td></tr>"
    ) in page
    assert page.count("<tr class=error>") == 1 and page.count("<tr class=rejected>") == 1


def test_error_messages_group_without_their_ids_hashes_and_numbers():
    assert (
        error_key("cannot decode a/b.png: truncated at byte 41", "a/b.png")
        == "cannot decode {id}: truncated at byte {n}"
    )
    assert error_key("psnr 12.5 dB < min_psnr 20", "x") == "psnr {n} dB < min_psnr {n}"
    assert error_key("image x-0123456789abcdef.v0.png not written", "x") == "image {id}-{hex}.v0.png not written"
    assert error_key("CUDA out of memory in float16", "r1") == "CUDA out of memory in float16"


def test_the_sample_is_spread_over_the_run_by_id_hash_not_the_first_ids(report):
    _, page = report
    shown = re.findall(r"<figure class=input>.*?<figcaption>([^<]*)</figcaption>", page)
    expected = sorted((f"row-{index:04d}" for index in range(30)), key=sample_key)[:6]
    assert shown == expected
    assert shown != [f"row-{index:04d}" for index in range(6)]


def test_each_sampled_input_is_shown_once_beside_all_its_variants_with_differences_marked(report):
    _, page = report
    assert page.count("<figure class=input>") == 6
    assert page.count('<figure class="variant ') == 12
    # The prompt is the same in every row shown: listed once, above the grid; node and timings never.
    assert page.count("<dt>img2img.prompt</dt>") == 1
    assert "<dd>a pastel drawing</dd>" in page.split("<section class=sample-grid>")[0]
    assert "node_id" not in page and "prepare_seconds" not in page
    # The seed differs between an input's variants: highlighted in each variant.
    first = sorted((f"row-{index:04d}" for index in range(30)), key=sample_key)[0]
    index = int(first.split("-")[1])
    for variant in (0, 1):
        assert f"<dt>seed</dt><dd><mark>{1000 * index + variant}</mark></dd>" in page


def test_cards_and_charts_are_drawn_from_every_committed_row(report):
    _, page = report
    cards = {
        label: value
        for value, label in re.findall(r"<div class=value>([^<]*)</div><div class=label>([^<]*)</div>", page)
    }
    assert cards["rows in"] == "30"
    assert cards["rows out / expected"] == "60 / 60"
    assert cards["error"] == "20 (33.3%)" and cards["rejected"] == "4 (6.7%)" and cards["ok"] == "36 (60.0%)"
    assert cards["wall time (this run)"] == "12.5 s"
    # 60 rows x (0.5 + 2.0) s, and 40 x 0.25 s of finishing: 160 s on the CPU.
    assert cards["img2img: CPU hours"] == f"{160 / 3600:.3g} h"
    for chart in ("rows-committed", "stage-seconds", "fidelity"):
        assert re.search(f'<figure class=chart id="{chart}"><figcaption>[^<]*</figcaption><svg ', page)
    assert "min_ssim 0.5" in page  # the threshold, drawn in the fidelity chart's legend
    assert "2 identical (infinite) not drawn" in page  # row-0001's two variants, infinite PSNR


def test_a_gpu_stage_reports_gpu_hours_of_its_model_calls(tmp_path):
    config, info, state, summary = build_sink(tmp_path, count=6, report_rows=0, device="cuda")
    page = open(write_report(config, info, summary, state), encoding="utf-8").read()
    # Each stage's figures join the summary (and the run's Ray metrics): 12 rows of 2.0 s model calls.
    assert summary["stages"]["img2img"]["seconds"]["model"] == 24.0
    assert summary["stages"]["img2img"]["images_per_model_second"] == 0.5
    assert f"<div class=value>{12 * 2.0 / 3600:.3g} h</div><div class=label>img2img: GPU hours (model calls)" in page
    assert f"<div class=value>{(12 * 0.5 + 8 * 0.25) / 3600:.3g} h</div><div class=label>img2img: CPU hours" in page
    assert "<figure class=input>" not in page


def test_a_1000_row_job_report_stays_under_5_mb_even_when_it_samples_every_input(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")  # incompressible: the largest thumbnails there are
    config, info, state, summary = build_sink(
        tmp_path, count=1000, variants=2, report_rows=10_000, image=buffer.getvalue(), rows_per_group=250
    )
    path = write_report(config, info, summary, state)
    page = open(path, encoding="utf-8").read()
    assert len(page.encode()) < 5_000_000
    assert page.count("<figure class=input>") == 1000  # every input is listed, with its parameters...
    assert page.count('<figure class="variant ') == 2000
    assert re.search(
        r"<p class=note>\d+ images are not shown: the report keeps about 3.5 MB", page
    )  # ...not all images


def test_thumbnails_are_small_webp_of_encoded_images_and_of_pixel_structs():
    big = png_bytes(640, 480)
    tag = _thumbnail(big)
    assert tag.startswith('<img src="data:image/webp;base64,') and "width=160 height=120" in tag
    pixels = np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 16
    struct = {"data": pixels.tobytes(), "shape": [32, 64, 1], "dtype": "uint16"}
    assert "width=64 height=32" in _thumbnail(struct)
    assert _thumbnail(b"not an image") == "<i>cannot show: " + _thumbnail(b"not an image")[len("<i>cannot show: ") :]
    assert _thumbnail(None) == "<i>none</i>"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (`make test` installs Debian's chromium where it can): "
    "the rendering of report.html is not checked",
)
def test_report_renders_in_headless_chromium_without_console_errors(report, tmp_path):
    path, _ = report
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=2000",
            "--dump-dom",
            f"file://{path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    dom = done.stdout
    assert dom.count('class="card') >= 8
    assert dom.count("<svg") == 3
    assert dom.count('<figure class="input">') == 6 and dom.count('<figure class="variant ') == 12
    assert '<table class="errors">' in dom
