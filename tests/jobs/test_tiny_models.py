"""Tests for jobs.tiny_models: the offline tiny diffusers checkpoints."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.tiny_models import (
    IP_ADAPTER_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    REAL_LAYOUT_NAMES,
    TINY_MODEL_NAMES,
    make_tiny_models,
)

# Every saved component of each pipeline; optional ones (safety checker,
# watermarker, IP-adapter image encoder) are saved as null.
PIPELINE_COMPONENTS = {
    "sd-img2img": {"vae", "text_encoder", "tokenizer", "unet", "scheduler"},
    "sd-inpainting": {"vae", "text_encoder", "tokenizer", "unet", "scheduler"},
    "sd-instruct-pix2pix": {"vae", "text_encoder", "tokenizer", "unet", "scheduler"},
    "sd-x4-upscaler": {"vae", "text_encoder", "tokenizer", "unet", "scheduler", "low_res_scheduler"},
    "sd-latent-x2-upscaler": {"vae", "text_encoder", "tokenizer", "unet", "scheduler"},
    "ldm-super-resolution": {"vqvae", "unet", "scheduler"},
    "sdxl-img2img": {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler"},
    "sd3-img2img": {"vae", "scheduler", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    | {"tokenizer", "tokenizer_2", "tokenizer_3"},
    "flux-img2img": {"vae", "scheduler", "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"},
}
PIPELINE_NAMES = tuple(PIPELINE_COMPONENTS)
# (model, tokenizer folder, the text encoder folder it feeds)
TOKENIZERS = (
    ("sd-img2img", "tokenizer", "text_encoder"),
    ("sd-inpainting", "tokenizer", "text_encoder"),
    ("sd-x4-upscaler", "tokenizer", "text_encoder"),
    ("sd-latent-x2-upscaler", "tokenizer", "text_encoder"),
    ("sdxl-img2img", "tokenizer", "text_encoder"),
    ("sdxl-img2img", "tokenizer_2", "text_encoder_2"),
)
UNSAFE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


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


@pytest.fixture(scope="module")
def latent_upscale_pipe(models):
    from diffusers import StableDiffusionLatentUpscalePipeline

    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(models["sd-latent-x2-upscaler"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ldm_pipe(models):
    from diffusers import LDMSuperResolutionPipeline

    pipe = LDMSuperResolutionPipeline.from_pretrained(models["ldm-super-resolution"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(models):
    from diffusers import AutoPipelineForImage2Image

    pipe = AutoPipelineForImage2Image.from_pretrained(models["sdxl-img2img"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_controlnet_pipe(models):
    from diffusers import AutoPipelineForImage2Image, ControlNetModel

    controlnet = ControlNetModel.from_pretrained(models["controlnet-sdxl-canny"], use_safetensors=True)
    pipe = AutoPipelineForImage2Image.from_pretrained(
        models["sdxl-img2img"], controlnet=controlnet, use_safetensors=True
    )
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


def _latent_upscale(pipe, image, prompt="a cat", guidance_scale=0.0):
    return pipe(
        prompt=prompt,
        image=image,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
    ).images[0]


def _ldm_upscale(pipe, image):
    return pipe(image=image, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]


def test_builds_every_model_under_its_name(models):
    assert tuple(models) == TINY_MODEL_NAMES
    for name, path in models.items():
        assert path.name == name
        assert path.is_dir()


@pytest.mark.parametrize("name", TINY_MODEL_NAMES)
def test_weights_are_safetensors_only(models, name):
    path = models[name]
    if name in PIPELINE_NAMES:
        marker = "model_index.json"
    elif name == "lora-sd":
        marker = LORA_WEIGHT_NAME
    elif name == "ip-adapter-sd":
        marker = IP_ADAPTER_WEIGHT_NAME
    else:
        marker = "config.json"
    assert (path / marker).is_file()
    assert list(path.rglob("*.safetensors"))
    unsafe = [p for p in path.rglob("*") if p.suffix in UNSAFE_WEIGHT_SUFFIXES]
    assert unsafe == []


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_pipeline_components_are_all_saved(models, name):
    index = json.loads((models[name] / "model_index.json").read_text())
    components = {key for key, value in index.items() if isinstance(value, list) and value[0] is not None}
    assert components == PIPELINE_COMPONENTS[name]
    for component in components:
        assert (models[name] / component).is_dir(), component


@pytest.mark.parametrize(("name", "tokenizer_folder", "text_encoder_folder"), TOKENIZERS)
def test_saved_tokenizer_reloads_and_pads_to_77(models, name, tokenizer_folder, text_encoder_folder):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(models[name] / tokenizer_folder)
    text_config = json.loads((models[name] / text_encoder_folder / "config.json").read_text())
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


def test_latent_upscaler_upscales_32_to_64(latent_upscale_pipe, init_image):
    assert latent_upscale_pipe.vae_scale_factor == 8
    low_res = init_image.resize((32, 32))
    image = _latent_upscale(latent_upscale_pipe, low_res)
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)
    assert image.mode == "RGB"
    assert _latent_upscale(latent_upscale_pipe, low_res).tobytes() == image.tobytes()


def test_latent_upscaler_doubles_each_side_of_a_non_square_image(latent_upscale_pipe, init_image):
    # The pipeline rounds sides down to multiples of 8 (the VAE factor); the
    # tiny UNet then needs them to be multiples of 16 and at least 32.
    assert _latent_upscale(latent_upscale_pipe, init_image.resize((48, 32))).size == (96, 64)


def test_latent_upscaler_uses_the_prompt_only_with_guidance(latent_upscale_pipe, init_image):
    low_res = init_image.resize((32, 32))
    # guidance_scale=0 makes the pipeline replace the prompt with "".
    unguided = [_latent_upscale(latent_upscale_pipe, low_res, prompt).tobytes() for prompt in ("a cat", "a dog")]
    assert unguided[0] == unguided[1]
    guided = [
        _latent_upscale(latent_upscale_pipe, low_res, prompt, guidance_scale=5.0).tobytes()
        for prompt in ("a cat", "a dog")
    ]
    assert guided[0] != guided[1]


def test_ldm_super_resolution_upscales_32_to_128(ldm_pipe, init_image):
    low_res = init_image.resize((32, 32))
    image = _ldm_upscale(ldm_pipe, low_res)
    assert isinstance(image, Image.Image)
    assert image.size == (128, 128)
    assert image.mode == "RGB"
    assert _ldm_upscale(ldm_pipe, low_res).tobytes() == image.tobytes()


def test_ldm_super_resolution_shrinks_sides_to_multiples_of_32(ldm_pipe, init_image):
    # The pipeline resizes a PIL input down to multiples of 32 before the 4x.
    assert _ldm_upscale(ldm_pipe, init_image.resize((48, 40))).size == (128, 128)


def test_sdxl_loads_as_img2img_without_aesthetic_score(sdxl_pipe):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    assert isinstance(sdxl_pipe, StableDiffusionXLImg2ImgPipeline)
    assert sdxl_pipe.config.requires_aesthetics_score is False
    assert sdxl_pipe.config.force_zeros_for_empty_prompt is True
    assert sdxl_pipe.vae_scale_factor == 8
    assert sdxl_pipe.unet.config.cross_attention_dim == (
        sdxl_pipe.text_encoder.config.hidden_size + sdxl_pipe.text_encoder_2.config.hidden_size
    )


def test_sdxl_img2img_runs_and_uses_the_prompt(sdxl_pipe, init_image):
    image = _img2img(sdxl_pipe, init_image)
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)
    assert image.mode == "RGB"
    assert _img2img(sdxl_pipe, init_image).tobytes() == image.tobytes()
    other_prompt = sdxl_pipe(
        image=init_image,
        prompt="a dog",
        strength=0.5,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert other_prompt.tobytes() != image.tobytes()


def test_sdxl_controlnet_img2img_runs_and_control_image_matters(sdxl_controlnet_pipe, init_image):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline

    assert isinstance(sdxl_controlnet_pipe, StableDiffusionXLControlNetImg2ImgPipeline)
    first = _controlnet_img2img(sdxl_controlnet_pipe, init_image, _edges(1))
    again = _controlnet_img2img(sdxl_controlnet_pipe, init_image, _edges(1))
    other = _controlnet_img2img(sdxl_controlnet_pipe, init_image, _edges(2))
    assert first.size == (64, 64)
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_lora_is_one_file_that_loads_into_sd_img2img_and_changes_the_output(models, init_image):
    from diffusers import AutoPipelineForImage2Image
    from peft.tuners.lora import LoraLayer

    assert [p.name for p in models["lora-sd"].iterdir()] == [LORA_WEIGHT_NAME]
    # A pipeline of its own: loading an adapter changes the pipeline in place.
    pipe = AutoPipelineForImage2Image.from_pretrained(models["sd-img2img"], use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    without_lora = _img2img(pipe, init_image)

    pipe.load_lora_weights(models["lora-sd"], weight_name=LORA_WEIGHT_NAME, adapter_name="x", use_safetensors=True)
    pipe.set_adapters(["x"], adapter_weights=[1.0])
    assert pipe.get_list_adapters() == {"unet": ["x"]}
    lora_layers = [name for name, module in pipe.unet.named_modules() if isinstance(module, LoraLayer)]
    # Every attention projection of the UNet is adapted, none missed.
    assert len(lora_layers) == 32
    assert all(name.endswith(LORA_TARGET_MODULES) for name in lora_layers)

    with_lora = _img2img(pipe, init_image)
    assert with_lora.size == (64, 64)
    assert with_lora.tobytes() != without_lora.tobytes()
    assert _img2img(pipe, init_image).tobytes() == with_lora.tobytes()

    pipe.set_adapters(["x"], adapter_weights=[0.0])
    assert _img2img(pipe, init_image).tobytes() == without_lora.tobytes()


def test_second_call_does_not_rebuild(models):
    root = models["sd-img2img"].parent
    before = _snapshot(root)
    again = make_tiny_models(root)
    assert again == models
    assert _snapshot(root) == before


@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("controlnet-canny", "diffusion_pytorch_model.safetensors"),
        ("controlnet-sdxl-canny", "diffusion_pytorch_model.safetensors"),
        ("lora-sd", LORA_WEIGHT_NAME),
    ],
)
def test_same_seed_rebuilds_identical_weights_without_touching_global_rng(models, tmp_path, name, weights):
    # Each of these depends on another model's UNet; building it alone into
    # an empty directory shows it rebuilds that UNet rather than reading it.
    state = torch.get_rng_state()
    rebuilt = make_tiny_models(tmp_path, names=name)
    assert torch.equal(torch.get_rng_state(), state)
    assert list(rebuilt) == [name]
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert (rebuilt[name] / weights).read_bytes() == (models[name] / weights).read_bytes()


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


def test_real_layouts_are_built_only_on_request_and_ship_as_real_checkpoints(models, real_layouts):
    assert not set(REAL_LAYOUT_NAMES) & set(models)
    index = json.loads((real_layouts["sd15-safety-checker"] / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert index["requires_safety_checker"] is True
    assert (real_layouts["sd15-safety-checker"] / "safety_checker" / "model.safetensors").is_file()
    assert (real_layouts["sd15-safety-checker"] / "feature_extractor" / "preprocessor_config.json").is_file()
    for component, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model")):
        folder = real_layouts["sd-fp16-variant"] / component
        assert {p.name for p in folder.glob("*.safetensors")} == {
            f"{weights}.safetensors",
            f"{weights}.fp16.safetensors",
        }
        assert (real_layouts["sd-bin-beside-safetensors"] / component / f"{weights}.bin").is_file()
        assert (real_layouts["sd-sharded"] / component / f"{weights}.safetensors.index.json").is_file()
    assert (real_layouts["sd-bin-beside-safetensors"] / "text_encoder" / "pytorch_model.bin").is_file()
    assert (real_layouts["sd-sharded"] / "text_encoder" / "model.safetensors.index.json").is_file()
    for name in ("sd15-safety-checker", "sd-fp16-variant", "sd-sharded"):
        assert not [p for p in real_layouts[name].rglob("*") if p.suffix in UNSAFE_WEIGHT_SUFFIXES]
