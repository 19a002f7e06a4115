"""SD3 and Flux checkpoints through the img2img operator, without Ray: the bytes diffusers itself
makes with the same seed and arguments, the record, vetting, and what each family refuses."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from operators.img2img import Img2Img, Img2ImgConfig
from operators.models import ModelError, check_model_files, vet_models
from operators.rows import derive_seed
from tests.conftest import make_batch, png_bytes

RUN_SEED = 3
IDS = ["wide", "square"]
# Per tiny checkpoint: the pipeline AutoPipelineForImage2Image picks, and call arguments as a user of
# the family sets them (Flux takes no negative prompt; its guidance_scale is the distilled guidance
# the transformer embeds).
FAMILIES = {
    "sd3-img2img": ("StableDiffusion3Img2ImgPipeline", {"negative_prompt": "blurry", "guidance_scale": 5.0}),
    "flux-img2img": ("FluxImg2ImgPipeline", {"guidance_scale": 3.5}),
}


@pytest.fixture(scope="module")
def family_models(tiny_models):
    return {name: tiny_models[name] for name in FAMILIES}


def images() -> list[bytes]:
    # Sides that are multiples of 16, as both families need.
    return [png_bytes(64, 48, (200, 30, 60)), png_bytes(32, 32, (20, 120, 220))]


def make_config(model, **overrides) -> Img2ImgConfig:
    fields = {
        "kind": "img2img",
        "model": str(model),
        "prompt": "a watercolor",
        "num_inference_steps": 2,
        "strength": 0.6,
        "size": {"multiple_of": 16},
    }
    fields.update(overrides)
    return Img2ImgConfig(**fields)


def direct_pixels(model, arguments: dict) -> list[np.ndarray]:
    """The same rows through diffusers itself, one call per row with the recorded seed."""
    import torch
    from diffusers import AutoPipelineForImage2Image

    pipeline = AutoPipelineForImage2Image.from_pretrained(
        str(model), dtype=torch.float32, use_safetensors=True, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    negative = {"negative_prompt": [arguments["negative_prompt"]]} if "negative_prompt" in arguments else {}
    results = []
    for row_id, data in zip(IDS, images(), strict=True):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        output = pipeline(
            prompt=["a watercolor"],
            **negative,
            image=[image],
            strength=0.6,
            num_inference_steps=2,
            guidance_scale=arguments["guidance_scale"],
            height=image.height,
            width=image.width,
            generator=[torch.Generator("cpu").manual_seed(derive_seed(RUN_SEED, row_id, 0))],
            output_type="pil",
        ).images[0]
        results.append(np.asarray(output))
    return results


@pytest.mark.parametrize("name", list(FAMILIES))
def test_output_is_what_diffusers_makes_with_the_same_seed_and_arguments(family_models, name):
    pipeline_name, arguments = FAMILIES[name]
    operator = Img2Img(make_config(family_models[name], **arguments), seed=RUN_SEED)
    out = operator(make_batch(images(), ids=IDS))
    assert out.column("status").to_pylist() == ["ok", "ok"], out.column("error").to_pylist()
    restyled = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in out.column("image").to_pylist()]
    # The input's size, not the 1024x1024 these pipelines make when not given one.
    assert [image.shape for image in restyled] == [(48, 64, 3), (32, 32, 3)]
    assert [image.tobytes() for image in restyled] == [
        image.tobytes() for image in direct_pixels(family_models[name], arguments)
    ]
    records = out.column("img2img").to_pylist()
    assert [(record["pipeline"], record["scheduler"]) for record in records] == [
        (pipeline_name, "FlowMatchEulerDiscreteScheduler")
    ] * 2
    assert [(record["negative_prompt"], record["guidance_scale"], record["strength"]) for record in records] == [
        (arguments.get("negative_prompt"), arguments["guidance_scale"], 0.6)
    ] * 2
    text = Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"]
    assert (
        f"Sampler: Euler, CFG scale: {arguments['guidance_scale']}, Seed: {derive_seed(RUN_SEED, 'wide', 0)}," in text
    )


@pytest.mark.parametrize("name", list(FAMILIES))
def test_checkpoint_passes_vetting(family_models, name):
    path = family_models[name]
    check_model_files(path)
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == FAMILIES[name][0].replace(
        "Img2Img", ""
    )
    assert vet_models([make_config(path, **FAMILIES[name][1])]) == []


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_size_multiple_the_latents_cannot_take_is_refused_before_loading(family_models, name):
    path = family_models[name]
    class_name = json.loads((path / "model_index.json").read_text())["_class_name"]
    message = (
        f"size.multiple_of is 8, but {path} is a {class_name}, whose image sides must be multiples of 16; "
        "set size.multiple_of to 16"
    )
    assert vet_models([make_config(path, size={"multiple_of": 8})]) == [f"operators[0].model: {message}"]
    # The actor checks it too (for s3:// and Hub checkpoints, which the driver does not read).
    with pytest.raises(ModelError, match=re.escape(message)):
        Img2Img(make_config(path, size={"multiple_of": 8}))


def test_a_negative_prompt_for_flux_is_refused_at_vet_time(family_models):
    path = family_models["flux-img2img"]
    message = (
        f"negative_prompt is set, but {path} is a FluxPipeline, which uses no negative prompt (only under true "
        "classifier-free guidance, which restyle does not run); remove negative_prompt and sweep.negative_prompt"
    )
    swept = make_config(path, prompt=None, sweep={"prompt": ["a watercolor"], "negative_prompt": ["blurry"]})
    assert vet_models([make_config(path, negative_prompt="blurry"), swept]) == [
        f"operators[0].model: {message}",
        f"operators[1].model: {message}",
    ]
    with pytest.raises(ModelError, match=r"FluxPipeline, which uses no negative prompt"):
        Img2Img(make_config(path, negative_prompt="blurry"))
