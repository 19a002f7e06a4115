"""Real checkpoint layouts (SD 1.5 with its safety checker, fp16 variant files, pickle files beside
safetensors ones, sharded safetensors) load through `resolve_model` and the img2img operator, and
give the same pixels as a direct diffusers call."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from operators.img2img import Img2Img, Img2ImgConfig
from operators.models import ModelError, check_model_files, resolve_model
from operators.rows import derive_seed
from tests.conftest import make_batch, png_bytes

RUN_SEED = 3
IDS = ["a", "b"]


@pytest.fixture(scope="module")
def layouts(real_layouts):
    return real_layouts


def images() -> list[bytes]:
    return [png_bytes(64, 48, (200, 30, 60)), png_bytes(64, 48, (20, 160, 90))]


def run_img2img(model, **overrides):
    fields = {"kind": "img2img", "model": str(model), "prompt": "a watercolor", "num_inference_steps": 2}
    fields.update(overrides)
    operator = Img2Img(Img2ImgConfig(**fields), seed=RUN_SEED)
    out = operator(make_batch(images(), ids=IDS))
    assert out.column("status").to_pylist() == ["ok", "ok"], out.column("error").to_pylist()
    return operator, out


def pixels(out) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in out.column("image").to_pylist()]


def direct_pixels(model, **load) -> list[np.ndarray]:
    """The same rows through diffusers itself, one call per row with the recorded seed."""
    import torch
    from diffusers import AutoPipelineForImage2Image

    pipeline = AutoPipelineForImage2Image.from_pretrained(str(model), dtype=torch.float32, use_safetensors=True, **load)
    pipeline.set_progress_bar_config(disable=True)
    results = []
    for row_id, data in zip(IDS, images(), strict=True):
        generator = torch.Generator("cpu").manual_seed(derive_seed(RUN_SEED, row_id, 0))
        image = pipeline(
            prompt=["a watercolor"],
            image=[Image.open(io.BytesIO(data)).convert("RGB")],
            strength=0.6,
            num_inference_steps=2,
            guidance_scale=7.5,
            generator=[generator],
            output_type="pil",
        ).images[0]
        results.append(np.asarray(image))
    return results


def assert_same_pixels(left: list[np.ndarray], right: list[np.ndarray]) -> None:
    assert len(left) == len(right)
    for one, other in zip(left, right, strict=True):
        np.testing.assert_array_equal(one, other)


def stage(out) -> list[dict]:
    return out.column("img2img").to_pylist()


def test_sd15_model_index_with_pipeline_module_components_is_accepted(layouts):
    # SD 1.5 names its safety checker ["stable_diffusion", "StableDiffusionSafetyChecker"].
    check_model_files(layouts["sd15-safety-checker"])
    assert resolve_model(str(layouts["sd15-safety-checker"])).path == layouts["sd15-safety-checker"]


def test_safety_checker_runs_by_default_and_is_recorded_per_row(layouts):
    model = layouts["sd15-safety-checker"]
    operator, out = run_img2img(model)
    assert operator.pipeline.safety_checker is not None
    assert [(row["safety_checker"], row["nsfw_content_detected"]) for row in stage(out)] == [(True, False)] * 2
    assert_same_pixels(pixels(out), direct_pixels(model))


def test_safety_checker_can_be_turned_off(layouts):
    model = layouts["sd15-safety-checker"]
    operator, out = run_img2img(model, safety_checker=False)
    assert operator.pipeline.safety_checker is None
    assert [(row["safety_checker"], row["nsfw_content_detected"]) for row in stage(out)] == [(False, None)] * 2
    assert_same_pixels(pixels(out), direct_pixels(model, safety_checker=None, requires_safety_checker=False))


def test_flagged_rows_are_blacked_out_and_say_so(layouts, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "flagging"
    shutil.copytree(layouts["sd15-safety-checker"], model)
    weights = model / "safety_checker" / "model.safetensors"
    tensors = load_file(weights)
    tensors["concept_embeds_weights"].fill_(-2.0)  # every image is past every concept threshold
    save_file(tensors, weights, metadata={"format": "pt"})
    _, out = run_img2img(model)
    assert [row["nsfw_content_detected"] for row in stage(out)] == [True, True]
    assert all(not image.any() for image in pixels(out))
    _, unchecked = run_img2img(model, safety_checker=False)
    assert all(image.any() for image in pixels(unchecked))


def test_safety_checker_true_needs_a_checkpoint_that_has_one(sd_model):
    with pytest.raises(ModelError, match="safety_checker is true, but checkpoint .* has no safety checker"):
        run_img2img(sd_model, safety_checker=True)


def test_fp16_variant_files_are_the_ones_loaded(layouts, sd_model):
    model = layouts["sd-fp16-variant"]
    _, plain = run_img2img(model)
    _, variant = run_img2img(model, variant="fp16")
    assert [row["model_variant"] for row in stage(variant)] == ["fp16", "fp16"]
    # The fp16 files hold other weights than the plain ones (which are sd-img2img's).
    assert_same_pixels(pixels(variant), direct_pixels(model, variant="fp16"))
    assert not np.array_equal(pixels(variant)[0], pixels(plain)[0])
    assert_same_pixels(pixels(plain), pixels(run_img2img(sd_model)[1]))


def test_missing_variant_is_refused(sd_model):
    with pytest.raises(ModelError, match="has no weight files of variant 'fp16'"):
        resolve_model(str(sd_model), variant="fp16")


def test_pickle_files_beside_safetensors_are_ignored(layouts, sd_model):
    model = layouts["sd-bin-beside-safetensors"]
    check_model_files(model)
    _, out = run_img2img(model)
    # The .bin files hold other weights: equal pixels mean the safetensors were loaded.
    assert_same_pixels(pixels(out), pixels(run_img2img(sd_model)[1]))


def test_sharded_safetensors_with_an_index_load(layouts, sd_model):
    model = layouts["sd-sharded"]
    assert len(list((model / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    assert len(list((model / "text_encoder").glob("model-*-of-*.safetensors"))) > 1
    _, out = run_img2img(model)
    assert_same_pixels(pixels(out), pixels(run_img2img(sd_model)[1]))


def with_fp16_variant(source, target, component: str | None, model_class):
    """Copy a checkpoint and write fp16 variant files of one of its models with doubled weights."""
    import torch

    shutil.copytree(source, target)
    folder = target / component if component else target
    model = model_class.from_pretrained(str(folder), use_safetensors=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2)
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
    return model


def test_controlnet_variant_files_are_the_ones_loaded(tiny_models, tmp_path):
    from diffusers import ControlNetModel

    from operators.controlnet import ControlSource, load_controlnets

    expected = with_fp16_variant(tiny_models["controlnet-canny"], tmp_path / "cn", None, ControlNetModel)
    sources = [ControlSource(model=str(tmp_path / "cn"), variant="fp16", preprocessor="canny")]
    (loaded,), _ = load_controlnets(sources, "float32", True, {})
    assert loaded.conv_in.weight.equal(expected.conv_in.weight.float())
    (plain,), _ = load_controlnets([sources[0].model_copy(update={"variant": None})], "float32", True, {})
    assert not plain.conv_in.weight.equal(loaded.conv_in.weight)


def test_upscaler_variant_files_are_the_ones_loaded(tiny_models, tmp_path):
    from diffusers import UNet2DConditionModel

    from operators.upscale import Upscale, UpscaleConfig

    expected = with_fp16_variant(tiny_models["sd-x4-upscaler"], tmp_path / "x4", "unet", UNet2DConditionModel)
    config = UpscaleConfig(kind="upscale", method="sd_x4", model=str(tmp_path / "x4"), variant="fp16")
    operator = Upscale(config)
    assert operator.pipeline.unet.conv_in.weight.equal(expected.conv_in.weight.float())
