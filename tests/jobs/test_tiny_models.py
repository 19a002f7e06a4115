"""Tests for jobs.tiny_models: the offline tiny diffusers checkpoints."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.tiny_models import TINY_MODEL_NAMES, make_tiny_models

PIPELINE_NAMES = ("sd-img2img", "sd-x4-upscaler")
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, pathlib.Path]:
    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(64, 64, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def img2img_pipe(models):
    from diffusers import AutoPipelineForImage2Image

    pipe = AutoPipelineForImage2Image.from_pretrained(models["sd-img2img"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def controlnet_pipe(models):
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline

    controlnet = ControlNetModel.from_pretrained(models["controlnet-canny"], use_safetensors=True)
    pipe = StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
        models["sd-img2img"], controlnet=controlnet, use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def upscale_pipe(models):
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(models["sd-x4-upscaler"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _snapshot(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _edges(seed: int) -> Image.Image:
    """A sparse binary image standing in for a canny edge map."""
    rng = np.random.RandomState(seed)
    return Image.fromarray(((rng.rand(64, 64) > 0.8) * 255).astype(np.uint8)).convert("RGB")


def _img2img(pipe, image):
    return pipe(
        image=image,
        prompt="a cat",
        strength=0.5,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]


def _controlnet_img2img(pipe, image, control_image):
    return pipe(
        prompt="a cat",
        image=image,
        control_image=control_image,
        strength=0.5,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]


def _upscale(pipe, image):
    return pipe(
        prompt="a cat",
        image=image,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]


def test_builds_every_model_under_its_name(models):
    assert tuple(models) == TINY_MODEL_NAMES
    for name, path in models.items():
        assert path.name == name
        assert path.is_dir()


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_weights_are_safetensors_only(models, name):
    path = models[name]
    marker = "model_index.json" if name in PIPELINE_NAMES else "config.json"
    assert (path / marker).is_file()
    assert list(path.rglob("*.safetensors"))
    unsafe = [p for p in path.rglob("*") if p.suffix in UNSAFE_WEIGHT_SUFFIXES]
    assert unsafe == []


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_pipeline_components_are_all_saved(models, name):
    index = json.loads((models[name] / "model_index.json").read_text())
    components = [key for key, value in index.items() if isinstance(value, list) and value[0] is not None]
    assert {"vae", "text_encoder", "tokenizer", "unet", "scheduler"} <= set(components)
    for component in components:
        assert (models[name] / component).is_dir(), component


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_saved_tokenizer_reloads_and_pads_to_77(models, name):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(models[name] / "tokenizer")
    text_config = json.loads((models[name] / "text_encoder" / "config.json").read_text())
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) <= text_config["vocab_size"]

    prompts = ["a cat", "ünïcödé 猫 🐱 — naïve café", "word " * 200]
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert [len(row) for row in ids] == [77, 77, 77]
    for row in ids:
        assert row[0] == tokenizer.bos_token_id
        assert tokenizer.eos_token_id in row

    # Byte-level coverage means no text ever falls back to the unknown token,
    # which here shares its id with the end/pad token.
    unicode_ids = tokenizer(prompts[1]).input_ids
    assert tokenizer.unk_token_id not in unicode_ids[1:-1]
    assert tokenizer.decode(unicode_ids, skip_special_tokens=True) == prompts[1].lower()


def test_img2img_loads_through_auto_pipeline_and_runs(img2img_pipe, init_image):
    from diffusers import StableDiffusionImg2ImgPipeline

    assert isinstance(img2img_pipe, StableDiffusionImg2ImgPipeline)
    assert img2img_pipe.vae_scale_factor == 8
    image = _img2img(img2img_pipe, init_image)
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)
    assert image.mode == "RGB"


def test_img2img_same_seed_is_byte_identical(img2img_pipe, init_image):
    assert _img2img(img2img_pipe, init_image).tobytes() == _img2img(img2img_pipe, init_image).tobytes()


def test_controlnet_img2img_runs_and_control_image_matters(controlnet_pipe, init_image):
    first = _controlnet_img2img(controlnet_pipe, init_image, _edges(1))
    again = _controlnet_img2img(controlnet_pipe, init_image, _edges(1))
    other = _controlnet_img2img(controlnet_pipe, init_image, _edges(2))
    assert first.size == (64, 64)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_upscaler_upscales_32_to_128(upscale_pipe, init_image):
    low_res = init_image.resize((32, 32))
    image = _upscale(upscale_pipe, low_res)
    assert image.size == (128, 128)
    assert _upscale(upscale_pipe, low_res).tobytes() == image.tobytes()


def test_upscaler_accepts_max_noise_level(upscale_pipe, init_image):
    image = upscale_pipe(
        prompt="a cat",
        image=init_image.resize((16, 16)),
        num_inference_steps=1,
        noise_level=upscale_pipe.config.max_noise_level,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert upscale_pipe.config.max_noise_level == 350
    assert image.size == (64, 64)


def test_second_call_does_not_rebuild(models):
    root = models["sd-img2img"].parent
    before = _snapshot(root)
    again = make_tiny_models(root)
    assert again == models
    assert _snapshot(root) == before


def test_same_seed_rebuilds_identical_weights_without_touching_global_rng(models, tmp_path):
    state = torch.get_rng_state()
    rebuilt = make_tiny_models(tmp_path, names="controlnet-canny")
    assert torch.equal(torch.get_rng_state(), state)
    assert list(rebuilt) == ["controlnet-canny"]
    weights = "diffusion_pytorch_model.safetensors"
    assert (rebuilt["controlnet-canny"] / weights).read_bytes() == (models["controlnet-canny"] / weights).read_bytes()


def test_unknown_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model"):
        make_tiny_models(tmp_path, names=["sd-img2img", "no-such-model"])
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_unrelated_directory(tmp_path):
    stray = tmp_path / "controlnet-canny" / "notes.txt"
    stray.parent.mkdir()
    stray.write_text("not a model")
    with pytest.raises(FileExistsError):
        make_tiny_models(tmp_path, names=["controlnet-canny"])
    assert stray.read_text() == "not a model"
    # The staging directory is cleaned up, not left beside the target.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["controlnet-canny"]
