"""Progress: counted from commit records, shown as a bar or log lines ending at 100%, exported as Ray
metrics; Ray Data's own progress output and library notices kept out; the CLI's output options."""

from __future__ import annotations

import json
import logging
import re
import struct
import warnings
from importlib import metadata

import pytest

from jobs.cli import main
from jobs.config import SinkConfig
from jobs.progress import (
    Progress,
    ProgressMetrics,
    configure_output,
    drop_notices,
    duration,
    quiet_ray_data,
    ray_log_level,
)

RUN = "run00002"


def commit(sink, name: str, statuses: dict[str, int]) -> None:
    folder = sink / "_commits"
    folder.mkdir(exist_ok=True)
    record = {"shard": f"data/{name}.parquet", "rows": sum(statuses.values()), "statuses": statuses}
    (folder / f"{name}.parquet.json").write_text(json.dumps(record))


def progress(sink, mode="lines", metrics=None, already=7, expected=20) -> Progress:
    config = SinkConfig(uri=str(sink))
    return Progress(config, 2, already, expected, interval=3600, run_id=RUN, mode=mode, metrics=metrics)


@pytest.fixture
def earlier_records(tmp_path):
    """This run's two records (5 + 3 rows), an earlier attempt's and another run's, and a record being
    written: only the first two count, on top of the 7 rows committed before."""
    commit(tmp_path, f"part-a0002-{RUN}-00000-000", {"ok": 4, "error": 1})
    commit(tmp_path, f"part-a0002-{RUN}-00001-000", {"ok": 3})
    commit(tmp_path, "part-a0001-run00001-00000-000", {"ok": 7})
    commit(tmp_path, "part-a0002-other002-00000-000", {"ok": 11})
    (tmp_path / "_commits" / f".part-a0002-{RUN}-00002-000.parquet.json.0123abcd.tmp").write_text('{"ro')
    return tmp_path


LINE = re.compile(
    r"progress: (\d+)/20 rows committed \((\d+\.\d)%\)(, \d+ error rows?)?, \d+\.\d\d rows/s, "
    r"\d+ s elapsed, (about \d+ s left|time left unknown|done|stopped, \d+ rows not committed)"
)


def test_log_lines_count_this_runs_records_and_the_last_line_says_100_percent(earlier_records, caplog):
    caplog.set_level(logging.INFO, logger="jobs.progress")
    with progress(earlier_records) as running:
        line = running.line()
        commit(earlier_records, f"part-a0002-{RUN}-00002-000", {"ok": 4, "rejected": 1})
    assert LINE.fullmatch(line).group(1, 2, 3) == ("15", "75.0", ", 1 error row")
    (final,) = [record.getMessage() for record in caplog.records if record.name == "jobs.progress"]
    assert LINE.fullmatch(final).group(1, 2, 3, 4) == ("20", "100.0", ", 1 error row", "done")


def test_a_write_that_fails_ends_with_a_line_saying_how_many_rows_are_missing(earlier_records, caplog):
    caplog.set_level(logging.INFO, logger="jobs.progress")
    with pytest.raises(RuntimeError), progress(earlier_records):
        raise RuntimeError("a write task failed")
    (final,) = [record.getMessage() for record in caplog.records if record.name == "jobs.progress"]
    assert final.startswith("progress: 15/20 rows committed (75.0%)")
    assert final.endswith("stopped, 5 rows not committed")


def test_the_bar_counts_the_rows_this_run_has_left_to_commit(earlier_records, monkeypatch, capsys):
    with progress(earlier_records, mode="bar") as running:
        running.committed_now()
        assert (running.bar.total, running.bar.n) == (13, 8)  # 20 expected, 7 committed before this run
    bar = capsys.readouterr().err
    assert "rows committed" in bar and "8/13" in bar and "1 error row" in bar


def test_quiet_mode_logs_no_progress_line(earlier_records, caplog):
    caplog.set_level(logging.INFO, logger="jobs.progress")
    with progress(earlier_records, mode="off") as running:
        assert running.committed_now() == 15
    assert not [record for record in caplog.records if record.name == "jobs.progress"]


class FakeMetric:
    made: dict[str, FakeMetric] = {}

    def __init__(self, name, description="", tag_keys=None):
        self.name, self.tag_keys, self.defaults, self.calls = name, tag_keys, {}, []
        FakeMetric.made[name] = self

    def set_default_tags(self, tags):
        assert set(tags) <= set(self.tag_keys)
        self.defaults = tags
        return self

    def inc(self, value=1.0, tags=None):
        self.calls.append(("inc", value, {**self.defaults, **(tags or {})}))

    def set(self, value, tags=None):
        self.calls.append(("set", value, {**self.defaults, **(tags or {})}))


def test_commits_are_exported_as_ray_metrics(earlier_records, monkeypatch):
    import ray.util.metrics

    FakeMetric.made = {}
    monkeypatch.setattr(ray.util.metrics, "Counter", FakeMetric)
    monkeypatch.setattr(ray.util.metrics, "Gauge", FakeMetric)
    metrics = ProgressMetrics(RUN, expected=20)
    with progress(earlier_records, mode="off", metrics=metrics) as running:
        running.committed_now()
        running.committed_now()  # nothing new: nothing counted twice
    metrics.summary(
        {
            "images_per_second": 2.5,
            "wall_seconds": 3.2,
            "stages": {"img2img": {"seconds": {"model": 4.0}, "images_per_model_second": 5.0}, "tidy": {}},
        }
    )
    made = FakeMetric.made
    tags = {"run_id": RUN}
    assert made["restyle_rows_expected"].calls == [("set", 20, tags)]
    assert sorted(made["restyle_rows_committed"].calls, key=str) == [
        ("inc", 1, {**tags, "status": "error"}),
        ("inc", 7, {**tags, "status": "ok"}),
    ]
    assert made["restyle_error_rows"].calls == [("inc", 1, tags)]
    assert [call[0] for call in made["restyle_rows_per_second"].calls] == ["set"] * 3  # 2 reads above, 1 at the end
    assert made["restyle_images_per_second"].calls == [("set", 2.5, tags)]
    assert made["restyle_wall_seconds"].calls == [("set", 3.2, tags)]
    assert made["restyle_seconds_left"].calls[-1] == ("set", 0, tags)
    assert made["restyle_stage_images_per_second"].calls == [("set", 5.0, {**tags, "stage": "img2img"})]


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (0.4, 59, 61, 3599, 3600, 7505)] == [
        "0 s",
        "59 s",
        "1 min 01 s",
        "59 min 59 s",
        "1 h 00 min",
        "2 h 05 min",
    ]


def test_ray_data_bars_and_status_block_are_off_unless_verbose(monkeypatch):
    import ray.data

    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", True)
    monkeypatch.setattr(context, "enable_operator_progress_bars", True)
    (console,) = [handler for handler in logging.getLogger("ray.data").handlers if handler.name == "console"]
    monkeypatch.setattr(console, "level", console.level)
    quiet_ray_data(verbose=True)
    assert context.enable_progress_bars and context.enable_operator_progress_bars
    quiet_ray_data(verbose=False)
    assert not context.enable_progress_bars and not context.enable_operator_progress_bars
    assert console.level == logging.WARNING  # "Starting execution", "Total Progress: 0/?" are INFO


def test_notices_that_tell_a_user_nothing_are_dropped(caplog):
    drop_notices()
    token = logging.getLogger("ray._private.authentication.authentication_token_setup")
    fallback = logging.getLogger("transformers.models.auto.image_processing_auto")
    pil_class = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING):
        token.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        fallback.warning("Requested torchvision backend is not available. Falling back to pil backend.")
        pil_class.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
            "backward compatibility. Install torchvision to use the default backend, or import "
            "`CLIPImageProcessorPil` directly to silence this warning."
        )
        token.warning("the token file cannot be read")
    assert [record.getMessage() for record in caplog.records] == ["the token file cannot be read"]
    with warnings.catch_warnings(record=True) as caught:
        drop_notices()
        warnings.warn_explicit(
            "Corrupt EXIF data.  Expecting to read 12 bytes but only got 2. ",
            UserWarning,
            "TiffImagePlugin.py",
            982,
            module="PIL.TiffImagePlugin",
        )
        warnings.warn_explicit("a warning of restyle's own", UserWarning, "x.py", 1, module="jobs.x")
    assert [str(item.message) for item in caught] == ["a warning of restyle's own"]


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"restyle {metadata.version('restyle')}\n"


@pytest.mark.parametrize(
    ("argv", "root", "ray_level"),
    [
        ([], logging.INFO, logging.WARNING),
        (["--log-level", "debug"], logging.DEBUG, logging.WARNING),
        (["--log-level", "warning", "--verbose"], logging.WARNING, logging.INFO),
        (["-q"], logging.ERROR, logging.ERROR),
    ],
)
def test_output_options_set_the_log_levels(argv, root, ray_level, restore_logging, tmp_path, capsys):
    """The options work before or after the command; a bad config still fails before Ray starts.
    Ray's own INFO lines ("Started a local Ray instance.") show only with --verbose."""
    bad = tmp_path / "job.yaml"
    bad.write_text("source: {uri: in}\n")
    assert main(["run", str(bad), *argv]) == 2
    assert logging.getLogger().level == root
    assert "error:" in capsys.readouterr().err
    assert ray_log_level(verbose="--verbose" in argv) == ray_level
    if argv:
        assert main([*argv, "run", str(bad)]) == 2
        assert logging.getLogger().level == root


def test_an_unknown_log_level_is_refused_naming_the_accepted_ones(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "job.yaml", "--log-level", "loud"])
    assert exited.value.code == 2
    expected = "argument --log-level: invalid choice: 'loud' (choose from 'debug', 'info', 'warning', 'error')"
    assert expected in capsys.readouterr().err


def test_configure_output_without_options_keeps_restyle_at_info(restore_logging):
    configure_output()
    assert logging.getLogger().level == logging.INFO


# An EXIF block whose orientation tag points past its end: Pillow warns "Tag data larger than file.
# Skipping tag 274" as a read task decodes the image, in a Ray worker.
DAMAGED_EXIF = b"Exif\x00\x00MM\x00\x2a" + struct.pack(">IHHHII", 8, 1, 0x0112, 3, 1000, 0x1000) + bytes(4)
QUIET_RAY = (
    "Skipping tag",
    "Total Progress",  # Ray Data's status block (logging_progress.py)
    "logging_progress",
    "streaming_executor",  # "Starting execution of Dataset ...", "Execution plan ..."
    "Progress bars disabled",
    "Token authentication is enabled",
    "Started a local Ray instance",
)


def test_a_job_logged_to_a_file_shows_restyle_progress_to_100_percent_and_no_ray_status(tmp_path):
    """`restyle run` with stdout and stderr not a terminal, as a scheduled job or `ray job logs` has it;
    then the same job again with -q: everything is committed, and only the three paths are printed.
    Notices from the workers (Pillow on a source's EXIF) are dropped as well as the driver's."""
    import io
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    cells = []
    for index in range(6):
        data = io.BytesIO()
        Image.new("RGB", (8, 8), (index * 40, 10, 20)).save(data, "JPEG", exif=DAMAGED_EXIF if index == 0 else b"")
        cells.append({"id": f"r{index}", "image": {"bytes": data.getvalue(), "path": None}})
    pq.write_table(pa.Table.from_pylist(cells), tmp_path / "in.parquet")
    config = tmp_path / "job.yaml"
    config.write_text(
        f"source: {{uri: {tmp_path / 'in.parquet'}}}\n"
        "operators: [{kind: standardize, steps: [{op: normalize}]}]\n"
        f"sink: {{uri: {tmp_path / 'out'}}}\n"
        "run: {progress_interval_seconds: 1, resources: {num_cpus: 2}}\n"
    )
    command = [sys.executable, "-m", "jobs.cli", "run", str(config)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    lines = [line.split("jobs.progress: ", 1)[1] for line in first.stderr.splitlines() if "jobs.progress: " in line]
    assert lines and all(LINE6.fullmatch(line) for line in lines), lines
    assert LINE6.fullmatch(lines[-1]).group(1, 2, 3) == ("6", "100.0", "done")
    assert [noise for noise in QUIET_RAY if noise in first.stderr + first.stdout] == []
    assert json.loads(first.stdout[: first.stdout.index("\noutputs: ") + 1])["rows_out"] == 6

    again = subprocess.run([*command, "-q"], capture_output=True, text=True, timeout=300)
    assert (again.returncode, again.stderr) == (0, "")
    sink = tmp_path / "out"
    assert again.stdout.splitlines() == [
        f"outputs: {sink}/data/*.parquet",
        f"summary: {sink}/summary.json",
        f"report:  {sink}/report.html",
    ]


# What a model's actor would print as it loads: library notices and loading bars.
QUIET_MODEL_LOAD = ("falling back to", "Loading pipeline components", "Loading weights")


def test_a_model_job_prints_no_notices_or_loading_bars_from_its_actor(tmp_path, tiny_models):
    """`restyle run` of an img2img job, as `make demo` runs one: the actor's transformers notice about a
    missing torchvision and the loading bars of diffusers and transformers are not printed."""
    import subprocess
    import sys

    from tests.conftest import png_bytes, write_image_parquet

    source = write_image_parquet(
        tmp_path / "in.parquet", [{"id": f"r{index}", "image": png_bytes(32, 32)} for index in range(2)]
    )
    config = tmp_path / "job.yaml"
    config.write_text(
        f"source: {{uri: {source}}}\n"
        f"operators: [{{kind: img2img, model: {tiny_models['sd-img2img']}, prompt: a fox, num_inference_steps: 2}}]\n"
        f"sink: {{uri: {tmp_path / 'out'}}}\n"
        "run: {resources: {num_cpus: 2}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(config)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert [noise for noise in QUIET_MODEL_LOAD if noise in done.stderr + done.stdout] == []


LINE6 = re.compile(
    r"progress: (\d)/6 rows committed \((\d+\.\d)%\), \d+\.\d\d rows/s, \d+ s elapsed, "
    r"(about \d+ s left|time left unknown|done)"
)
