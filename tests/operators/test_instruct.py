"""The instruct_edit operator called directly on a few rows, without Ray, on the tiny InstructPix2Pix."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from jobs.config import ConfigError, validate_config
from operators.img2img import Img2ImgConfig
from operators.instruct import InstructEdit, InstructEditConfig
from operators.models import ModelError, vet_models
from operators.rows import derive_seed
from tests.conftest import make_batch, png_bytes


def make_config(model, **overrides) -> InstructEditConfig:
    fields = {"kind": "instruct_edit", "model": str(model), "prompt": "make it snow", "num_inference_steps": 2}
    fields.update(overrides)
    return InstructEditConfig(**fields)


def gradient(width=64, height=48) -> bytes:
    """A PNG with structure, so the image conditioning matters."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    array = np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def instruct_model(tiny_models):
    return tiny_models["sd-instruct-pix2pix"]


@pytest.fixture(scope="module")
def operator(instruct_model) -> InstructEdit:
    return InstructEdit(make_config(instruct_model, negative_prompt="blurry"), seed=3)


def test_tiny_checkpoint_is_an_instruct_pix2pix_pipeline_that_passes_vetting(instruct_model):
    index = json.loads((instruct_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    assert json.loads((instruct_model / "unet" / "config.json").read_text())["in_channels"] == 8
    assert vet_models([make_config(instruct_model)]) == []


def test_output_equals_a_direct_diffusers_call(operator, instruct_model):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    source = gradient()
    out = operator(make_batch([source], ids=["cat"]))
    assert out.column("status").to_pylist() == ["ok"]
    pipeline = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        str(instruct_model), dtype=torch.float32, use_safetensors=True, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        prompt="make it snow",
        negative_prompt="blurry",
        image=Image.open(io.BytesIO(source)).convert("RGB"),
        num_inference_steps=2,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        generator=torch.Generator("cpu").manual_seed(derive_seed(3, "cat", 0)),
    ).images[0]
    assert np.array_equal(pixels(out.column("image")[0].as_py()), np.asarray(expected))


def test_pipeline_gets_image_guidance_and_no_strength(instruct_model, monkeypatch):
    operator = InstructEdit(make_config(instruct_model, image_guidance_scale=1.25), seed=1)
    calls = []
    real = operator.pipeline

    def record(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(operator, "pipeline", record)
    out = operator(make_batch([png_bytes()]))
    assert sorted(calls[0]) == [
        "generator",
        "guidance_scale",
        "image",
        "image_guidance_scale",
        "num_inference_steps",
        "output_type",
        "prompt",
    ]
    assert calls[0]["image_guidance_scale"] == 1.25 and calls[0]["prompt"] == ["make it snow"]
    stage = out.column("instruct_edit")[0].as_py()
    assert stage["image_guidance_scale"] == 1.25 and stage["guidance_scale"] == 7.5
    assert "strength" not in stage and stage["prompt"] == "make it snow"


def test_png_carries_a1111_parameters_with_image_cfg_scale(operator):
    out = operator(make_batch([png_bytes(64, 64)], ids=["cat"]))
    lines = Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"].split("\n")
    assert lines[:2] == ["make it snow", "Negative prompt: blurry"]
    seed = derive_seed(3, "cat", 0)
    assert f"CFG scale: 7.5, Image CFG scale: 1.5, Seed: {seed}, Size: 64x64, " in lines[2]
    assert "Denoising strength" not in lines[2]


def test_sweep_over_instructions_and_image_guidance_fans_out_variants(instruct_model):
    import pyarrow as pa

    config = make_config(
        instruct_model,
        prompt=None,
        variants=2,
        sweep={"prompt": ["make it snow", "make it {style}"], "image_guidance_scale": [1.0, 2.0]},
    )
    assert config.variant_count() == 8
    out = InstructEdit(config, seed=9)(make_batch([gradient()], ids=["p1"], style=pa.array(["gold"])))
    stages = out.column("instruct_edit").to_pylist()
    assert out.column("variant_index").to_pylist() == list(range(8))
    assert [(s["prompt"], s["image_guidance_scale"]) for s in stages[::2]] == [
        ("make it snow", 1.0),
        ("make it snow", 2.0),
        ("make it gold", 1.0),
        ("make it gold", 2.0),
    ]
    assert out.column("seed").to_pylist() == [derive_seed(9, "p1", v) for v in range(8)]
    assert len(set(out.column("image").to_pylist())) == 8


def test_undecodable_row_becomes_an_error_row_and_good_rows_survive(operator):
    out = operator(make_batch([png_bytes(), b"not an image at all"], ids=["good", "bad"]))
    assert out.column("status").to_pylist() == ["ok", "error"]
    assert "cannot decode image" in out.column("error")[1].as_py()
    assert out.column("image")[1].as_py() is None
    assert out.column("instruct_edit")[1].as_py()["image_guidance_scale"] == 1.5


def test_a_checkpoint_without_the_8_channel_unet_is_refused(sd_model):
    with pytest.raises(ModelError, match="instruct_edit needs an InstructPix2Pix checkpoint .* got one with 4"):
        InstructEdit(make_config(sd_model))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"image_guidance_scale": 0.5}, "must be >= 1"),
        ({"strength": 0.5}, "Extra inputs are not permitted"),
        ({"sweep": {"strength": [0.3]}}, "sweep.strength is no parameter of instruct_edit"),
        ({"sweep": {"image_guidance_scale": [1.5, 0.9]}}, r"sweep.image_guidance_scale values must be >= 1, got 0.9"),
        ({"prompt": None}, "give exactly one of prompt, prompt_column or sweep.prompt"),
    ],
)
def test_config_rejects_bad_values(overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        make_config("m", **overrides)


def test_img2img_refuses_an_image_guidance_sweep():
    with pytest.raises(ValidationError, match="sweep.image_guidance_scale is no parameter of img2img"):
        Img2ImgConfig(kind="img2img", model="m", prompt="x", sweep={"image_guidance_scale": [1.5]})


def test_a_bad_image_guidance_scale_is_one_clear_error_line():
    job = {
        "source": {"uri": "in.parquet"},
        "operators": [{"kind": "instruct_edit", "model": "m", "prompt": "make it snow", "image_guidance_scale": 0.5}],
        "sink": {"uri": "out"},
    }
    with pytest.raises(ConfigError) as raised:
        validate_config(job, source_name="edit.yaml")
    assert str(raised.value) == (
        "edit.yaml is invalid:\n  operators[0].image_guidance_scale: must be >= 1 (below 1 diffusers' "
        "InstructPix2Pix switches all guidance off; for no guidance set guidance_scale to 1), got 0.5"
    )
