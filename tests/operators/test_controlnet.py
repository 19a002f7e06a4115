"""The controlnet_img2img operator called directly, without Ray, on the tiny SD + ControlNet."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from operators.controlnet import ControlNetImg2Img, ControlNetImg2ImgConfig, ControlSource, control_image
from tests.conftest import make_batch, png_bytes


def photo(width=64, height=64) -> bytes:
    """A structured image (a bright square on dark) so edge maps are not empty."""
    array = np.zeros((height, width, 3), np.uint8)
    array[16:48, 16:48] = (230, 200, 40)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_config(tiny_models, **overrides) -> ControlNetImg2ImgConfig:
    fields = {
        "kind": "controlnet_img2img",
        "model": str(tiny_models["sd-img2img"]),
        "prompt": "a neon sign",
        "num_inference_steps": 2,
        "strength": 0.5,
        "controlnets": [{"model": str(tiny_models["controlnet-canny"]), "preprocessor": "canny"}],
    }
    fields.update(overrides)
    return ControlNetImg2ImgConfig(**fields)


@pytest.fixture(scope="module")
def operator(tiny_models) -> ControlNetImg2Img:
    return ControlNetImg2Img(make_config(tiny_models, control_guidance_end=0.8), seed=3)


def test_canny_preprocessor_finds_the_square_edges():
    edges = np.asarray(
        control_image(
            Image.open(io.BytesIO(photo())).convert("RGB"),
            ControlSource(model="m", preprocessor="canny", low_threshold=50, high_threshold=150),
        )
    )
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[16:48, 15:17].any() and not edges[30:34, 30:34].any()


def test_generates_and_records_the_control(operator, tiny_models):
    out = operator(make_batch([photo(), photo(48, 32)]))
    assert out.column("status").to_pylist() == ["ok", "ok"]
    assert (out.column("width").to_pylist(), out.column("height").to_pylist()) == ([64, 48], [64, 32])
    stage = out.column("controlnet_img2img").to_pylist()[0]
    assert stage["controlnets"] == f"{tiny_models['controlnet-canny']}[canny(100,200)]x1"
    assert stage["controlnet_revisions"].startswith("sha256:")
    assert (stage["control_guidance_start"], stage["control_guidance_end"]) == (0.0, 0.8)
    text = Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"]
    unit = (
        f"Module: canny, Model: controlnet-canny [{stage['controlnet_revisions'][7:15]}], Weight: 1.0, "
        "Threshold A: 100, Threshold B: 200, Guidance Start: 0.0, Guidance End: 0.8"
    )
    # One unit per ControlNet, as sd-webui-controlnet writes it, quoted as AUTOMATIC1111 quotes values.
    assert text.endswith(f'Denoising strength: 0.5, ControlNet 0: "{unit}"')


def test_control_image_from_a_column_changes_the_output(tiny_models):
    config = make_config(tiny_models, controlnets=[{"model": str(tiny_models["controlnet-canny"]), "column": "depth"}])
    operator = ControlNetImg2Img(config, seed=3)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def run(control: bytes | None):
        depth = pa.array([{"bytes": control, "path": None} if control else None], struct)
        return operator(make_batch([photo()], ids=["x"], depth=depth))

    flat, edges = run(png_bytes(64, 64, (0, 0, 0))), run(photo())
    assert flat.column("status").to_pylist() == edges.column("status").to_pylist() == ["ok"]
    assert flat.column("seed").to_pylist() == edges.column("seed").to_pylist()
    assert flat.column("image").to_pylist() != edges.column("image").to_pylist()
    missing = run(None)
    assert missing.column("status").to_pylist() == ["error"]
    assert "control image in column 'depth': image is empty" in missing.column("error")[0].as_py()


def test_two_controlnets_with_their_own_scales(tiny_models):
    net = str(tiny_models["controlnet-canny"])
    config = make_config(
        tiny_models,
        controlnets=[
            {"model": net, "preprocessor": "canny", "conditioning_scale": 0.5},
            {"model": net, "preprocessor": "sobel", "conditioning_scale": 1.5},
        ],
    )
    out = ControlNetImg2Img(config, seed=1)(make_batch([photo(), photo()]))
    assert out.column("status").to_pylist() == ["ok", "ok"]
    assert out.column("controlnet_img2img")[0].as_py()["controlnets"] == f"{net}[canny(100,200)]x0.5; {net}[sobel]x1.5"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"controlnets": []}, "at least 1 item"),
        ({"controlnets": [{"model": "m"}]}, "give exactly one of preprocessor or column"),
        ({"controlnets": [{"model": "m", "preprocessor": "canny", "column": "d"}]}, "give exactly one of"),
        ({"controlnets": [{"model": "m", "preprocessor": "hed"}]}, "'segmentation' or 'pose'"),
        ({"controlnets": [{"model": "m", "preprocessor": "depth"}]}, "preprocessor depth needs an annotator"),
        ({"control_guidance_start": 0.9, "control_guidance_end": 0.2}, "must be below control_guidance_end"),
    ],
)
def test_config_rejects_bad_values(tiny_models, overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        make_config(tiny_models, **overrides)


def test_sdxl_checkpoints_go_through_the_same_operators(tiny_models):
    from operators.img2img import Img2Img, Img2ImgConfig

    sdxl = str(tiny_models["sdxl-img2img"])
    config = make_config(
        tiny_models,
        model=sdxl,
        controlnets=[{"model": str(tiny_models["controlnet-sdxl-canny"]), "preprocessor": "canny"}],
    )
    operator = ControlNetImg2Img(config, seed=4)
    assert type(operator.pipeline).__name__ == "StableDiffusionXLControlNetImg2ImgPipeline"
    out = operator(make_batch([photo()]))
    assert out.column("status").to_pylist() == ["ok"] and out.column("width").to_pylist() == [64]
    plain = Img2Img(Img2ImgConfig(kind="img2img", model=sdxl, prompt="x", num_inference_steps=2, strength=0.5))
    assert type(plain.pipeline).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert plain(make_batch([photo()])).column("status").to_pylist() == ["ok"]
