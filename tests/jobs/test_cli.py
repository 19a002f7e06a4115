"""The `restyle` command line: bad configs fail before Ray starts; --dry-run prints the plan."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

import jobs.pipeline
from jobs.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(config):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(jobs.pipeline, "start_ray", refuse)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from jobs.demo import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo"))


def test_demo_data_is_real_photographs_as_hf_parquet(demo_data):
    table = pq.read_table(demo_data)
    assert table.num_rows == 8 and table.column_names == ["id", "image", "caption", "source_file"]
    assert table.column("id").to_pylist()[:2] == ["astronaut", "chelsea"]
    assert table.column("image")[0].as_py()["bytes"].startswith(b"\x89PNG")


def test_bad_config_exits_2_naming_the_field_before_ray(tmp_path, capsys, no_ray):
    path = tmp_path / "job.yaml"
    path.write_text("source: {uri: in}\nsink: {uri: out}\noperators:\n  - {kind: img2img, model: m, prompt: p}\n")
    assert main(["run", str(path), "--set", "operators.0.guidance_scale=-1"]) == 2
    assert "operators[0].guidance_scale: Input should be greater than or equal to 0, got -1" in capsys.readouterr().err


def test_dry_run_of_demo_config_prints_the_plan(demo_data, sd_model, tmp_path, capsys, no_ray):
    overrides = [f"source.uri={demo_data}", f"operators.0.model={sd_model}", f"sink.uri={tmp_path / 'out'}"]
    args = ["run", str(REPO / "configs" / "demo.yaml"), "--dry-run"]
    assert main(args + [item for override in overrides for item in ("--set", override)]) == 0
    out = capsys.readouterr().out
    assert f"source:  {demo_data} (parquet, 8 rows)" in out
    assert "stage 0 'img2img' (img2img): 1 actor(s) x 1 CPU / 0 GPU, batch_size 4" in out
    assert f"sink:    {tmp_path / 'out'} (16 rows expected)" in out
    for knob in ("attention: sdpa", "channels_last: False", "compile: none", "cpu_offload: none", "oom_backoff: True"):
        assert f"    {knob}\n" in out  # every speed knob as it will run
    assert not (tmp_path / "out").exists()


def test_bad_speed_knob_and_bad_encoding_exit_2_naming_the_field(tmp_path, capsys, no_ray):
    path = tmp_path / "job.yaml"
    path.write_text("source: {uri: in}\nsink: {uri: out}\noperators:\n  - {kind: img2img, model: m, prompt: p}\n")
    assert main(["run", str(path), "--set", "operators.0.cpu_offload=model"]) == 2
    assert "cpu_offload 'model' moves components to a GPU and needs device cuda" in capsys.readouterr().err
    assert (
        main(["run", str(path), "--set", "sink.encoding.format=jpeg", "--set", "sink.encoding.png_compress_level=3"])
        == 2
    )
    assert "sink.encoding: " in capsys.readouterr().err


def test_dry_run_reports_what_it_cannot_resolve(tmp_path, capsys, no_ray):
    path = tmp_path / "job.yaml"
    path.write_text(
        f"source: {{uri: {tmp_path / 'missing'}}}\nsink: {{uri: out}}\n"
        f"operators:\n  - {{kind: img2img, model: {tmp_path}, prompt: p}}\n"
    )
    assert main(["run", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "stage 0 'img2img'" in captured.out
    assert "error: source: cannot read Parquet at source.uri" in captured.err
    assert "error: operators[0].model:" in captured.err and "has no model_index.json" in captured.err


def test_a_user_error_from_anywhere_in_the_job_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from operators.base import UserError

    def fail(config, **_):
        raise UserError("run.ray_address 'ray://nowhere:10001' cannot be reached; accepted: ...")

    monkeypatch.setattr(jobs.pipeline, "run_job", fail)
    path = tmp_path / "job.yaml"
    path.write_text("source: {uri: in}\nsink: {uri: out}\noperators:\n  - {kind: img2img, model: m, prompt: p}\n")
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err == "error: run.ray_address 'ray://nowhere:10001' cannot be reached; accepted: ...\n"


def test_an_unexpected_error_is_one_line_with_its_traceback_in_a_log(tmp_path, capsys, monkeypatch):
    def fail(config, **_):
        raise KeyError("http://AKIAXYZ:hidden@host is not a known key")

    monkeypatch.setattr(jobs.pipeline, "run_job", fail)
    monkeypatch.setenv("RESTYLE_LOG_DIR", str(tmp_path / "logs"))
    path = tmp_path / "job.yaml"
    path.write_text("source: {uri: in}\nsink: {uri: out}\noperators:\n  - {kind: img2img, model: m, prompt: p}\n")
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    prefix = "error: job failed: KeyError: 'http://***@host is not a known key' (full log in "
    assert err.startswith(prefix) and err.count("\n") == 1 and "hidden" not in err, err
    log = Path(err[len(prefix) :].strip().removesuffix(")"))
    assert log.parent == tmp_path / "logs" and "Traceback" in log.read_text() and "hidden" not in log.read_text()
    monkeypatch.setenv("RESTYLE_DEBUG", "1")  # developers see the exception itself
    with pytest.raises(KeyError):
        main(["run", str(path)])
