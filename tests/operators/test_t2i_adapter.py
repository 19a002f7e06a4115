"""The t2i_adapter operator called directly on a few rows, without Ray, on the tiny SD and T2I-Adapter."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from jobs.config import ConfigError, validate_config
from operators.models import ModelError, vet_models
from operators.rows import derive_seed
from operators.t2i_adapter import T2IAdapterText2Image, T2IAdapterText2ImageConfig
from tests.conftest import make_batch, png_bytes


def photo(width=64, height=64) -> bytes:
    """A bright square on dark, so the edge map is not empty."""
    array = np.zeros((height, width, 3), np.uint8)
    array[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (230, 200, 40)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def make_config(tiny_models, **overrides) -> T2IAdapterText2ImageConfig:
    fields = {
        "kind": "t2i_adapter",
        "model": str(tiny_models["sd-img2img"]),
        "prompt": "a neon sign",
        "negative_prompt": "blurry",
        "num_inference_steps": 2,
        "adapters": [{"model": str(tiny_models["t2i-adapter-canny"]), "preprocessor": "canny"}],
    }
    fields.update(overrides)
    return T2IAdapterText2ImageConfig(**fields)


def direct_call(tiny_models, adapter, conditions, scale, seed):
    """The same generation through diffusers alone: conditions are grayscale edge maps (the tiny
    adapter takes one channel, as TencentARC's canny adapter does)."""
    import torch
    from diffusers import StableDiffusionAdapterPipeline

    pipeline = StableDiffusionAdapterPipeline.from_pretrained(
        str(tiny_models["sd-img2img"]),
        adapter=adapter,
        dtype=torch.float32,
        use_safetensors=True,
        local_files_only=True,
    )
    pipeline.set_progress_bar_config(disable=True)
    height, width = np.asarray(conditions[0]).shape
    return pipeline(
        prompt="a neon sign",
        negative_prompt="blurry",
        image=conditions[0] if len(conditions) == 1 else conditions,
        height=height,
        width=width,
        num_inference_steps=2,
        guidance_scale=7.5,
        adapter_conditioning_scale=scale,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]


def canny(data: bytes) -> Image.Image:
    import cv2

    gray = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    return Image.fromarray(cv2.Canny(gray, 100, 200))


def load_adapter(tiny_models):
    import torch
    from diffusers import T2IAdapter

    return T2IAdapter.from_pretrained(
        str(tiny_models["t2i-adapter-canny"]), dtype=torch.float32, use_safetensors=True, local_files_only=True
    )


@pytest.fixture(scope="module")
def operator(tiny_models) -> T2IAdapterText2Image:
    adapters = [{"model": str(tiny_models["t2i-adapter-canny"]), "preprocessor": "canny", "conditioning_scale": 0.8}]
    return T2IAdapterText2Image(make_config(tiny_models, adapters=adapters), seed=3)


def test_tiny_adapter_is_a_safetensors_model_that_passes_vetting(tiny_models):
    files = sorted(path.name for path in tiny_models["t2i-adapter-canny"].iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert vet_models([make_config(tiny_models)]) == []
    missing = make_config(tiny_models, adapters=[{"model": str(tiny_models["sd-img2img"]), "preprocessor": "canny"}])
    assert vet_models([missing]) == [
        f"operators[0].adapters[0].model: {tiny_models['sd-img2img']} has no config.json; it is not a diffusers "
        "model directory"
    ]


def test_output_equals_a_direct_diffusers_call_and_carries_the_a1111_unit(operator, tiny_models):
    source = photo()
    out = operator(make_batch([source], ids=["cat"]))
    assert out.column("status").to_pylist() == ["ok"]
    assert type(operator.pipeline).__name__ == "StableDiffusionAdapterPipeline"
    seed = derive_seed(3, "cat", 0)
    adapter = load_adapter(tiny_models)
    expected = direct_call(tiny_models, adapter, [canny(source)], 0.8, seed)
    assert np.array_equal(pixels(out.column("image")[0].as_py()), np.asarray(expected))
    # The adapter matters: without its features the same seed gives other pixels.
    unsteered = direct_call(tiny_models, adapter, [canny(source)], 0.0, seed)
    assert not np.array_equal(np.asarray(expected), np.asarray(unsteered))

    stage = out.column("t2i_adapter")[0].as_py()
    assert stage["adapters"] == f"{tiny_models['t2i-adapter-canny']}[canny(100,200)]x0.8"
    assert stage["adapter_revisions"].startswith("sha256:") and stage["adapter_conditioning_factor"] == 1.0
    assert stage["pipeline"] == "StableDiffusionAdapterPipeline" and "strength" not in stage
    text = Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"]
    unit = (
        f"Module: canny, Model: t2i-adapter-canny [{stage['adapter_revisions'][7:15]}], Weight: 0.8, "
        "Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 1.0"
    )
    # sd-webui-controlnet writes a T2I-Adapter as a ControlNet unit; txt2img has no denoising strength.
    assert f"Seed: {seed}, Size: 64x64, Model hash: " in text
    assert text.endswith(f'Model: {tiny_models["sd-img2img"]}, ControlNet 0: "{unit}"')
    assert "Denoising strength" not in text


def test_two_adapters_with_weights_equal_diffusers_multi_adapter(tiny_models):
    from diffusers import MultiAdapter

    model = str(tiny_models["t2i-adapter-canny"])
    adapters = [
        {"model": model, "preprocessor": "canny", "conditioning_scale": 0.7},
        {"model": model, "preprocessor": "grayscale", "conditioning_scale": 0.4},
    ]
    operator = T2IAdapterText2Image(make_config(tiny_models, adapters=adapters, size={"multiple_of": 32}), seed=5)
    wide = photo(96, 32)
    out = operator(make_batch([photo(), wide], ids=["square", "wide"]))
    assert out.column("status").to_pylist() == ["ok", "ok"]
    assert (out.column("width").to_pylist(), out.column("height").to_pylist()) == ([64, 96], [64, 32])
    assert out.column("t2i_adapter")[0].as_py()["adapters"] == f"{model}[canny(100,200)]x0.7; {model}[grayscale]x0.4"
    adapter = load_adapter(tiny_models)
    gray = Image.open(io.BytesIO(wide)).convert("L")
    expected = direct_call(
        tiny_models, MultiAdapter([adapter, adapter]), [canny(wide), gray], [0.7, 0.4], derive_seed(5, "wide", 0)
    )
    assert np.array_equal(pixels(out.column("image")[1].as_py()), np.asarray(expected))


def test_an_undecodable_condition_in_a_column_is_that_rows_error(tiny_models):
    adapters = [{"model": str(tiny_models["t2i-adapter-canny"]), "column": "edges"}]
    operator = T2IAdapterText2Image(make_config(tiny_models, adapters=adapters), seed=1)
    edges = pa.array([png_bytes(32, 32, (255, 255, 255)), b"not an image"], pa.binary())
    out = operator(make_batch([photo(), photo()], ids=["good", "bad"], edges=edges))
    assert out.column("status").to_pylist() == ["ok", "error"]
    assert out.column("error")[1].as_py().startswith("control image in column 'edges': cannot decode image")
    assert out.column("image")[1].as_py() is None


def test_a_depth_annotator_makes_the_condition_and_saves_it(tiny_models):
    adapters = [
        {
            "model": str(tiny_models["t2i-adapter-canny"]),
            "preprocessor": "depth",
            "annotator": {"model": str(tiny_models["depth-dpt"])},
            "save_as": "depth_map",
        }
    ]
    config = make_config(tiny_models, adapters=adapters)
    assert [reference.field for reference in config.model_references()][-2:] == [
        "adapters[0].model",
        "adapters[0].annotator.model",
    ]
    operator = T2IAdapterText2Image(config, seed=2)
    out = operator(make_batch([photo()], ids=["cat"]))
    assert out.column("status").to_pylist() == ["ok"]
    assert out.column("t2i_adapter")[0].as_py()["annotators"].startswith(f"0={tiny_models['depth-dpt']}")
    assert Image.open(io.BytesIO(out.column("depth_map")[0].as_py())).size == (64, 64)
    text = Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"]
    assert f'ControlNet 0: "Module: {operator.annotators[0].module}, Model: t2i-adapter-canny [' in text


def test_an_sdxl_checkpoint_selects_the_sdxl_adapter_pipeline_and_its_factor(tiny_models, monkeypatch):
    # The tiny adapter fits the tiny SDXL UNet too: both start with a plain DownBlock2D of the same widths.
    config = make_config(tiny_models, model=str(tiny_models["sdxl-img2img"]), adapter_conditioning_factor=0.5)
    operator = T2IAdapterText2Image(config, seed=4)
    assert operator.pipeline_name == "StableDiffusionXLAdapterPipeline"
    calls, real = [], operator.pipeline
    monkeypatch.setattr(operator, "pipeline", lambda **kwargs: calls.append(kwargs) or real(**kwargs))
    out = operator(make_batch([photo()], ids=["cat"]))
    assert out.column("status").to_pylist() == ["ok"]
    assert calls[0]["adapter_conditioning_factor"] == 0.5 and "strength" not in calls[0]
    assert out.column("t2i_adapter")[0].as_py()["adapter_conditioning_factor"] == 0.5
    text = Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"]
    assert text.endswith('Guidance Start: 0.0, Guidance End: 0.5"')


def test_adapter_limits_are_refused_when_the_actor_loads(tiny_models):
    with pytest.raises(
        ModelError, match=r"size.multiple_of is 8, but adapter .* multiples of 32; set size.multiple_of"
    ):
        T2IAdapterText2Image(make_config(tiny_models, size={"multiple_of": 8}))
    with pytest.raises(ModelError, match="adapter_conditioning_factor is 0.5, but .* StableDiffusionAdapterPipeline"):
        T2IAdapterText2Image(make_config(tiny_models, adapter_conditioning_factor=0.5))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"adapters": []}, "at least 1 item"),
        ({"adapters": [{"model": "a"}]}, "give exactly one of preprocessor or column"),
        ({"strength": 0.5}, "Extra inputs are not permitted"),
        ({"sweep": {"strength": [0.3]}}, "sweep.strength is no parameter of t2i_adapter"),
        ({"adapter_conditioning_factor": 1.5}, "less than or equal to 1"),
    ],
)
def test_config_rejects_bad_values(overrides, fragment):
    fields = {"kind": "t2i_adapter", "model": "m", "prompt": "x", "adapters": [{"model": "a", "preprocessor": "canny"}]}
    with pytest.raises(ValidationError, match=fragment):
        T2IAdapterText2ImageConfig(**{**fields, **overrides})


def test_a_bad_adapter_is_one_clear_error_line():
    job = {
        "source": {"uri": "in.parquet"},
        "operators": [{"kind": "t2i_adapter", "model": "m", "prompt": "x", "adapters": [{"model": "a"}]}],
        "sink": {"uri": "out"},
    }
    with pytest.raises(ConfigError) as raised:
        validate_config(job, source_name="adapter.yaml")
    assert str(raised.value) == (
        "adapter.yaml is invalid:\n  operators[0].adapters[0]: give exactly one of preprocessor or column"
    )
