"""Model and LoRA references a user gets wrong: `--dry-run` and `run` refuse them with exit 2 and one
line naming the field, before Ray starts."""

from __future__ import annotations

import json
import shutil

import pytest

import jobs.pipeline
from jobs.cli import main
from tests.conftest import png_bytes


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(config):
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(jobs.pipeline, "start_ray", refuse)


@pytest.fixture
def job(tmp_path):
    """Write a one-image job whose operator is given as YAML flow text; returns the config path."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "cat.png").write_bytes(png_bytes(32, 32))

    def write(operator: str) -> str:
        path = tmp_path / "job.yaml"
        path.write_text(
            f"source: {{uri: {images}, format: images}}\nsink: {{uri: {tmp_path / 'out'}}}\n"
            f"operators:\n  - {operator}\n"
        )
        return str(path)

    return write


@pytest.fixture
def model_copy(sd_model, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(sd_model, target)
    return target


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def img2img(model, extra: str = "") -> str:
    return f"{{kind: img2img, model: '{model}', prompt: p{extra}}}"


@pytest.mark.parametrize("command", [["--dry-run"], []])
def test_malformed_model_index_is_one_line(job, model_copy, capsys, no_ray, command):
    (model_copy / "model_index.json").write_text("{not json")
    assert main(["run", job(img2img(model_copy)), *command]) == 2
    line = one_error_line(capsys)
    assert f"operators[0].model: {model_copy / 'model_index.json'} is not valid JSON" in line


@pytest.mark.parametrize(
    ("index", "fragment"),
    [
        ([1, 2], "model_index.json must hold a JSON object, got list"),
        (
            {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers"]},
            "component 'unet' must be [library, class]",
        ),
    ],
)
def test_model_index_of_the_wrong_shape_is_one_line(job, model_copy, capsys, no_ray, index, fragment):
    (model_copy / "model_index.json").write_text(json.dumps(index))
    assert main(["run", job(img2img(model_copy)), "--dry-run"]) == 2
    assert fragment in one_error_line(capsys)


@pytest.mark.parametrize("command", [["--dry-run"], []])
def test_model_path_that_exists_nowhere_is_not_taken_for_a_hub_id(job, tmp_path, capsys, no_ray, command):
    missing = tmp_path / "models" / "sd-img2img"
    assert main(["run", job(img2img(missing)), *command]) == 2
    assert one_error_line(capsys) == (
        f"error: operators[0].model: model '{missing}' does not exist: no local directory {missing}, and it is "
        "neither an s3:// prefix nor a Hub id (owner/name)"
    )


def test_relative_path_that_exists_nowhere_is_not_a_hub_id(job, capsys, no_ray):
    assert main(["run", job(img2img("./models/sd")), "--dry-run"]) == 2
    assert "model './models/sd' does not exist: no local directory" in one_error_line(capsys)


def test_hub_id_without_revision_is_refused_at_dry_run(job, capsys, no_ray):
    assert main(["run", job(img2img("stabilityai/sd-turbo")), "--dry-run"]) == 2
    assert "operators[0].model: model 'stabilityai/sd-turbo' is no local directory, so it is a Hub id; pin it" in (
        one_error_line(capsys)
    )


@pytest.mark.parametrize("command", [["--dry-run"], []])
def test_pickle_lora_is_refused_before_the_job(job, sd_model, tmp_path, capsys, no_ray, command):
    lora = tmp_path / "style.pt"
    lora.write_bytes(b"not read")
    assert main(["run", job(img2img(sd_model, f", loras: [{{model: '{lora}'}}]")), *command]) == 2
    assert one_error_line(capsys) == (
        f"error: operators[0].loras[0]: LoRA {lora} is not a .safetensors file; only safetensors weights are loaded"
    )


def test_custom_code_component_is_refused_at_dry_run(job, model_copy, capsys, no_ray):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["unet"] = ["evil", "EvilUNet"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    assert main(["run", job(img2img(model_copy)), "--dry-run"]) == 2
    assert "operators[0].model: " in (line := one_error_line(capsys))
    assert "component 'unet' names code from 'evil'" in line


def test_controlnet_with_pickle_only_weights_is_refused_at_dry_run(job, tiny_models, tmp_path, capsys, no_ray):
    controlnet = tmp_path / "controlnet"
    shutil.copytree(tiny_models["controlnet-canny"], controlnet)
    for weights in controlnet.glob("*.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    operator = (
        f"{{kind: controlnet_img2img, model: '{tiny_models['sd-img2img']}', prompt: p, "
        f"controlnets: [{{model: '{controlnet}', preprocessor: canny}}]}}"
    )
    assert main(["run", job(operator), "--dry-run"]) == 2
    assert f"error: operators[0].controlnets[0].model: {controlnet} holds only pickle weights" in one_error_line(capsys)


def test_vetted_models_pass_dry_run(job, tiny_models, capsys, no_ray):
    operator = img2img(tiny_models["sd-img2img"], f", loras: [{{model: '{tiny_models['lora-sd']}'}}]")
    assert main(["run", job(operator), "--dry-run"]) == 0


def test_safety_checker_asked_of_a_checkpoint_without_one_is_refused_at_dry_run(job, sd_model, capsys, no_ray):
    assert main(["run", job(img2img(sd_model, ", safety_checker: true")), "--dry-run"]) == 2
    assert one_error_line(capsys) == (
        f"error: operators[0].model: safety_checker is true, but checkpoint {sd_model} has no safety checker"
    )
