"""What changes output bytes is in the config hash or in every row: torch's thread count comes from
config (never from num_cpus), and each stage records its library versions, threads and batching."""

from __future__ import annotations

import pytest
import torch

from jobs.commits import config_hash
from jobs.config import validate_config
from operators.base import library_versions
from operators.img2img import Img2Img, Img2ImgConfig
from operators.standardize import Standardize, StandardizeConfig
from tests.conftest import make_batch, png_bytes


def job(**operator) -> dict:
    return {
        "source": {"uri": "/data/in.parquet", "format": "parquet"},
        "operators": [{"kind": "img2img", "model": "/models/sd", "prompt": "a watercolor", **operator}],
        "sink": {"uri": "/data/out"},
    }


def test_torch_threads_are_in_the_config_hash_and_num_cpus_is_not():
    base = config_hash(validate_config(job()))
    assert config_hash(validate_config(job(torch_threads=1))) == base
    assert config_hash(validate_config(job(torch_threads=2))) != base
    assert config_hash(validate_config(job(num_cpus=3))) == base


def test_library_versions_are_in_the_config_hash(monkeypatch):
    base = config_hash(validate_config(job()))
    monkeypatch.setattr("jobs.commits.library_versions", lambda names: "torch 0.0.1")
    assert config_hash(validate_config(job())) != base


def test_library_versions_names_each_library_and_its_installed_version():
    from importlib import metadata

    assert library_versions(("torch", "numpy", "opencv", "no-such-library")) == (
        f"torch {metadata.version('torch')}, numpy {metadata.version('numpy')}, "
        f"opencv {metadata.version('opencv-python-headless')}, no-such-library not installed"
    )


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("restore_torch_threads")
@pytest.mark.parametrize(("num_cpus", "torch_threads"), [(4, None), (1, 3)])
def test_torch_threads_come_from_config_not_num_cpus(sd_model, num_cpus, torch_threads):
    fields = {"kind": "img2img", "model": str(sd_model), "prompt": "a watercolor", "num_inference_steps": 2}
    fields |= {"num_cpus": num_cpus} | ({"torch_threads": torch_threads} if torch_threads else {})
    operator = Img2Img(Img2ImgConfig(**fields), seed=1)
    expected = torch_threads or 1
    assert torch.get_num_threads() == expected
    out = operator(make_batch([png_bytes(32, 32)]))
    assert out.column("img2img")[0].as_py()["torch_threads"] == expected


@pytest.mark.usefixtures("restore_torch_threads")
def test_every_diffusion_row_records_what_shaped_its_bytes(sd_model):
    config = Img2ImgConfig(kind="img2img", model=str(sd_model), prompt="a watercolor", num_inference_steps=2)
    out = Img2Img(config, seed=1)(make_batch([png_bytes(32, 32), None]))
    assert out.column("status").to_pylist() == ["ok", "error"]
    for record in out.column("img2img").to_pylist():  # error rows too
        assert {key: record[key] for key in ("device", "dtype", "model_batch_size", "torch_threads")} == {
            "device": "cpu",
            "dtype": "float32",
            "model_batch_size": 1,
            "torch_threads": 1,
        }
        assert record["versions"] == library_versions(("torch", "diffusers", "transformers", "numpy", "pillow"))
        assert record["versions"].startswith(f"torch {torch.__version__}, diffusers ")


def test_a_torch_free_stage_records_its_versions_and_no_threads():
    config = StandardizeConfig(kind="standardize", steps=[{"op": "normalize"}])
    record = Standardize(config)(make_batch([png_bytes(8, 8)])).column("standardize")[0].as_py()
    assert record["versions"] == library_versions(("numpy", "opencv", "pillow"))
    assert record["torch_threads"] is None
