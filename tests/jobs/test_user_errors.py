"""Every mistake a user can make is one `error:` line naming the field, with exit 2 and no
traceback; credentials never appear, wherever they were put; a job that fails inside Ray exits 1
with one line and the path of its full log.

Most cases call `jobs.cli.main` in-process (no Ray may start); a few run the `restyle` entry
point as a subprocess to prove that nothing prints a traceback there either.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

import jobs.pipeline
from jobs.cli import main
from tests.conftest import free_port, png_bytes

REPO = Path(__file__).resolve().parents[2]
RESTYLE = str(REPO / ".venv" / "bin" / "restyle")
SECRET = "TopSecret/Value+42"


def job(**sections) -> dict:
    """A valid job (one CPU operator) with some sections replaced."""
    data = {
        "source": {"uri": "in"},
        "operators": [{"kind": "standardize", "steps": [{"op": "normalize", "method": "minmax"}]}],
        "sink": {"uri": "out"},
    }
    data.update(sections)
    return data


def storage(**fields) -> dict:
    return {"uri": "s3://bucket/in", "storage": fields}


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(config):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(jobs.pipeline, "start_ray", refuse)


# (case id, config: a mapping, or raw text, or a callable(tmp_path) returning the config path;
#  extra CLI arguments, fragment every message must contain)
CASES = [
    (
        "gs-source-without-gcsfs",
        job(source={"uri": "gs://bucket/in"}),
        ["--dry-run"],
        "source.uri: gs:// URIs need the gcsfs package, which is not installed: pip install gcsfs",
    ),
    ("hdfs-sink-dry-run", job(sink={"uri": "hdfs://bucket/out"}), ["--dry-run"], "sink.uri: unsupported URI scheme"),
    ("hdfs-sink-run", job(sink={"uri": "hdfs://bucket/out"}), [], "accepted: a local path, file://PATH, s3://"),
    ("https-source", job(source={"uri": "https://example.com/x.parquet"}), [], "source.uri: unsupported URI scheme"),
    ("binary-file", lambda tmp: _write(tmp / "job.png", b"\x89PNG\r\n\x1a\n\x00\xff\xfe"), [], "is not text"),
    ("directory", lambda tmp: tmp, [], "is a directory; give the path of a YAML job file"),
    ("through-a-file", lambda tmp: _write(tmp / "job.yaml", b"x: 1\n") / "inner.yaml", [], "Not a directory"),
    ("missing-file", lambda tmp: tmp / "nope.yaml", [], "does not exist"),
    ("empty-file", "", [], "it holds nothing (an empty file)"),
    ("top-level-list", "- source\n- sink\n", [], "must hold a mapping with source, operators, sink and run"),
    ("bad-yaml", "source: [unclosed\n", [], "is not valid YAML"),
    ("set-bad-yaml", job(), ["--set", "run.seed=["], "--set run.seed: the value is not valid YAML"),
    ("set-without-equals", job(), ["--set", "run.seed"], "--set takes dotted.path=value"),
    ("set-empty-path", job(), ["--set", "=3"], "--set takes dotted.path=value with a path like run.seed"),
    ("set-index-out-of-range", job(), ["--set", "operators.9.strength=1"], "operators is a list of 1; '9' is not"),
    (
        "set-into-a-number",
        job(run={"seed": 3}),
        ["--set", "run.seed.x=1"],
        "--set run.seed.x: run.seed is not a mapping or list",
    ),
    ("endpoint-not-a-url", job(source=storage(endpoint_url="not a url")), [], "source.storage.endpoint_url: must be"),
    ("endpoint-no-scheme", job(source=storage(endpoint_url="minio:9000")), [], "must be http://HOST[:PORT]"),
    ("batch-size-bool", job(), ["--set", "operators.0.batch_size=true"], "valid integer, got True; accepted: whole"),
    (
        "steps-float",
        job(operators=[{"kind": "img2img", "model": "m", "prompt": "p", "num_inference_steps": 2.5}]),
        [],
        "operators[0].num_inference_steps: Input should be a valid integer, got 2.5",
    ),
    ("batch-size-huge", job(), ["--set", "operators.0.batch_size=1.0e+23"], "whole numbers from 1 to 65536"),
    ("batch-size-1e15", job(), ["--set", "operators.0.batch_size=1.0e+15"], "operators[0].batch_size"),
    ("batch-size-text", job(), ["--set", "operators.0.batch_size=1e23"], "operators[0].batch_size"),
    ("negative-seed", job(run={"seed": -1}), [], "run.seed: Input should be greater than or equal to 0, got -1"),
    ("seed-over-int64", job(run={"seed": 2**64}), [], "run.seed: Input should be less than or equal to"),
    ("fractional-rows-per-shard", job(sink={"uri": "out", "rows_per_shard": 2.5}), [], "sink.rows_per_shard"),
    ("zero-limit", job(source={"uri": "in", "limit": 0}), [], "source.limit: Input should be greater than"),
    ("unknown-kind", job(operators=[{"kind": "restyle"}]), [], "operators[0].kind"),
    ("operators-not-a-list", job(operators={"kind": "standardize"}), [], "operators: Input should be a valid list"),
    ("missing-sink", {"source": {"uri": "in"}, "operators": job()["operators"]}, [], "sink: Field required"),
    ("sink-a-string", job(sink="out"), [], "sink: Input should be a valid dictionary"),
    ("wrong-type", job(sink={"uri": "out", "write_images": "maybe"}), [], "sink.write_images: Input should be"),
    ("unknown-format", job(source={"uri": "in", "format": "tfrecord"}), [], "source.format: Input should be"),
    ("unknown-mode", job(sink={"uri": "out", "mode": "append"}), [], "sink.mode: Input should be"),
    ("typo-top-level", {**job(), "operator": []}, [], "operator: unknown field; accepted: fidelity, operators"),
    (
        "gs-model",
        job(operators=[{"kind": "img2img", "model": "gs://bucket/model", "prompt": "x"}]),
        ["--dry-run"],
        "operators[0].model: model 'gs://bucket/model': gs:// URIs need the gcsfs package, which is not installed",
    ),
    (
        "gs-lora",
        job(operators=[{"kind": "img2img", "model": "gs://b/m", "prompt": "x", "loras": [{"model": "gs://b/l"}]}]),
        [],
        "operators[0].loras[0]: LoRA 'gs://b/l': gs:// URIs need the gcsfs package",
    ),
    ("sink-is-home-dry-run", job(sink={"uri": "~"}), ["--dry-run"], "sink.uri ~ (resolved: "),
    ("sink-inside-source-dry-run", job(sink={"uri": "in/out"}), ["--dry-run"], "is inside source.uri in"),
    (
        "ray-address-unreachable-dry-run",
        job(run={"ray_address": f"127.0.0.1:{free_port()}"}),
        ["--dry-run"],
        "run.ray_address 127.0.0.1:",
    ),
]

# Credentials in the wrong place: the field is named, the value never shown.
SECRET_CASES = [
    ("storage-as-a-string", job(source={"uri": "in", "storage": f"AKIAXYZ:{SECRET}"}), "source.storage: Input should"),
    ("password-key", job(source={"uri": "in", "password": SECRET}), "source.password: unknown field"),
    ("secret-key", job(sink={"uri": "out", "secret": SECRET}), "sink.secret: unknown field"),
    ("aws-key-in-storage", job(source=storage(aws_secret_access_key=SECRET)), "aws_secret_access_key: unknown"),
    ("token-in-run", job(run={"token": SECRET}), "run.token: unknown field"),
    (
        "endpoint-with-userinfo",
        job(source=storage(endpoint_url=f"http://AKIAXYZ:{SECRET}@127.0.0.1:9000")),
        "source.storage.endpoint_url: must not hold credentials",
    ),
    ("userinfo-in-uri", job(sink={"uri": f"gs://AKIAXYZ:{SECRET}@bucket/out"}), "gs://***@bucket/out"),
    ("model-storage-list", job(run={"model_storage": [SECRET]}), "run.model_storage: Input should be"),
    ("secret-wrong-type", job(sink={"uri": "out", "storage": {"secret_access_key": 42}}), "secret_access_key"),
]


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def config_path(tmp_path: Path, config) -> Path:
    if callable(config):
        return config(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "job.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def assert_one_clear_error(code: int, out: str, err: str, fragment: str) -> None:
    assert code == 2, (out, err)
    assert "Traceback" not in out + err and 'File "' not in out + err, err
    assert fragment in err, err
    assert err.startswith("error: "), err
    assert SECRET not in out + err and "TopSecret" not in out + err


@pytest.mark.parametrize(("config", "arguments", "fragment"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_user_error_is_one_line_with_exit_2(config, arguments, fragment, tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(config_path(tmp_path, config)), *arguments])
    captured = capsys.readouterr()
    assert_one_clear_error(code, captured.out, captured.err, fragment)


@pytest.mark.parametrize(("config", "fragment"), [case[1:] for case in SECRET_CASES], ids=[c[0] for c in SECRET_CASES])
def test_misplaced_credentials_are_named_never_shown(config, fragment, tmp_path, capsys, no_ray, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(config_path(tmp_path, config)), "--dry-run"])
    captured = capsys.readouterr()
    assert_one_clear_error(code, captured.out, captured.err, fragment)


def test_an_override_holding_a_secret_is_not_echoed(tmp_path, capsys, no_ray):
    path = config_path(tmp_path, job())
    assert main(["run", str(path), "--set", f"source.storage=AKIAXYZ:{SECRET}"]) == 2
    captured = capsys.readouterr()
    assert_one_clear_error(2, captured.out, captured.err, "source.storage: Input should be a valid dictionary")
    assert main(["run", str(path), "--set", f"source.storage.secret_access_key:{SECRET}"]) == 2
    captured = capsys.readouterr()
    assert_one_clear_error(2, captured.out, captured.err, "--set takes dotted.path=value, got a value that is not")
    assert main(["run", str(path), "--set", f"source.storage.secret_access_key=[{SECRET}"]) == 2
    captured = capsys.readouterr()
    assert_one_clear_error(2, captured.out, captured.err, "--set source.storage.secret_access_key: the value is not")


def test_unreadable_config_file(tmp_path, capsys, no_ray):
    if os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file; the unreadable paths are covered by 'directory' and 'through-a-file'")
    path = config_path(tmp_path, job())
    path.chmod(0)
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert_one_clear_error(2, captured.out, captured.err, f"cannot read config file {path}: Permission denied")


def test_unreachable_endpoint_fails_fast_naming_the_host_not_the_credentials(tmp_path, capsys, no_ray):
    port = free_port()  # nothing listens there
    source = storage(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="AKIAXYZ", secret_access_key=SECRET)
    path = config_path(tmp_path, job(source=source, sink={"uri": str(tmp_path / "out")}))
    for arguments in (["--dry-run"], []):
        assert main(["run", str(path), *arguments]) == 2
        captured = capsys.readouterr()
        assert_one_clear_error(2, captured.out, captured.err, f"cannot connect to object storage at 127.0.0.1:{port}")
        assert "source.uri s3://bucket/in" in captured.err


def test_a_stage_with_num_actors_takes_its_cpus_before_the_others_are_split():
    from jobs.config import validate_config

    steps = [{"op": "normalize", "method": "minmax"}]
    stages = [
        {"kind": "standardize", "name": "a", "num_actors": 5, "steps": steps},
        {"kind": "img2img", "name": "b", "model": "m", "prompt": "p"},
        {"kind": "standardize", "name": "c", "steps": steps},  # no model: CPU tasks, no pool
    ]
    config = validate_config(job(operators=stages))
    assert jobs.pipeline.size_pools(config, cpus=8, gpus=0) == [5, 2, 0]


def test_two_cpu_pools_on_two_cpus_are_refused_naming_the_split():
    from jobs.config import validate_config

    stages = [{"kind": "img2img", "name": name, "model": "m", "prompt": "p"} for name in ("a", "b")]
    config = validate_config(job(operators=stages, run={"resources": {"num_cpus": 2}}))
    with pytest.raises(jobs.pipeline.PlanError) as refused:
        jobs.pipeline.size_pools(config, cpus=2, gpus=0)
    assert (
        "leaving 1 for CPU stages, split between the 2 CPU stages sized automatically (operators[0], operators[1]): "
        "0.5 CPUs each; set operators[0].num_cpus to 0.5 or less"
    ) in str(refused.value)


def run_restyle(*arguments: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RESTYLE, "run", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "RAY_ADDRESS": "", **(env or {})},
    )


def test_the_entry_point_prints_one_line_and_no_traceback(tmp_path):
    cases = [
        (config_path(tmp_path / "gs", job(source={"uri": "gs://bucket/in"})), ["--dry-run"], "source.uri"),
        (_write(tmp_path / "bin.yaml", b"\x00\xff\xfe binary"), [], "is not text"),
        (config_path(tmp_path / "seed", job()), ["--set", "run.seed=["], "--set run.seed"),
        (config_path(tmp_path / "key", job(source={"uri": "in", "storage": f"AKIAXYZ:{SECRET}"})), [], "storage"),
    ]
    for path, arguments, fragment in cases:
        finished = run_restyle(str(path), *arguments)
        assert_one_clear_error(finished.returncode, finished.stdout, finished.stderr, fragment)
        assert len(finished.stderr.strip().splitlines()) <= 2, finished.stderr


def test_the_entry_point_gives_up_on_an_unreachable_endpoint_within_seconds(tmp_path):
    port = free_port()
    source = storage(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="AKIAXYZ", secret_access_key=SECRET)
    path = config_path(tmp_path, job(source=source))
    # Bounded retries: with botocore's default eight attempts and backoff this took about a minute.
    finished = run_restyle(str(path), "--dry-run", timeout=40)
    assert_one_clear_error(finished.returncode, finished.stdout, finished.stderr, f"127.0.0.1:{port}")


def test_a_job_failing_inside_ray_exits_1_with_one_line_and_its_log(tmp_path):
    """An actor that raises an unexpected error: the kill-once test hook, given a marker path in a
    folder that does not exist, raises FileNotFoundError in every batch call."""
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(2):
        (folder / f"r{index}.png").write_bytes(png_bytes(16, 16, (index * 90, 20, 40)))
    config = job(
        source={"uri": str(folder), "format": "images"},
        sink={"uri": str(tmp_path / "out")},
        run={"resources": {"num_cpus": 2}},
    )
    marker = tmp_path / "missing" / "marker"
    finished = run_restyle(
        str(config_path(tmp_path, config)),
        timeout=300,
        env={"RESTYLE_TESTING_KILL_ACTOR_ONCE": str(marker), "RESTYLE_LOG_DIR": str(tmp_path / "logs")},
    )
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert "Traceback" not in finished.stderr and 'File "' not in finished.stderr, finished.stderr[-3000:]
    last = finished.stderr.strip().splitlines()[-1]
    expected = f"error: job failed: FileNotFoundError: [Errno 2] No such file or directory: '{marker}' (full log in "
    assert last.startswith(expected), last
    log = Path(last.removeprefix(expected).removesuffix(")"))
    assert log.parent == tmp_path / "logs"
    text = log.read_text()
    assert "Traceback" in text and "_kill_once_if_asked" in text and "Ray's logs" in text
