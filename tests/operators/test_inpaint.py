"""The inpaint operator called directly on a few rows, without Ray."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from operators.inpaint import Inpaint, InpaintConfig, paste_back, shape_mask
from operators.rows import derive_seed
from tests.conftest import make_batch


def make_config(model, **overrides) -> InpaintConfig:
    fields = {
        "kind": "inpaint",
        "model": str(model),
        "prompt": "a red door",
        "num_inference_steps": 2,
        "mask": {"rectangle": {"left": 16, "top": 16, "width": 24, "height": 16}, "blur": 2},
    }
    fields.update(overrides)
    return InpaintConfig(**fields)


def photo(width: int = 64, height: int = 48, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A noisy image (so that outputs differ from it wherever they are repainted)."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def expected_mask(operator, source: Image.Image) -> np.ndarray:
    """The shaped mask the operator uses for a rule (at the source's size)."""
    from operators.inpaint import rule_mask

    return shape_mask(rule_mask(operator.config.mask, source), operator.config.mask)


@pytest.fixture(scope="module")
def operator(sd_model) -> Inpaint:
    return Inpaint(make_config(sd_model), seed=3)


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        ({}, "give exactly one mask source of column, rectangle, color_key, alpha, segmentation; got none"),
        ({"column": "m", "alpha": True}, r"got \['column', 'alpha'\]"),
        (
            {"rectangle": {"left": 0.5, "top": 0, "width": 0.6, "height": 1, "units": "fraction"}},
            "left \\+ width = 1.1",
        ),
        ({"color_key": {"color": [0, 0, 300]}}, "color must be three values in 0-255, got \\[0, 0, 300\\]"),
    ],
)
def test_a_bad_mask_is_refused_with_one_line(sd_model, mask, message):
    with pytest.raises(ValidationError, match=message):
        make_config(sd_model, mask=mask)


def test_outside_the_mask_every_pixel_is_the_sources_own(operator):
    source = photo()
    out = operator(make_batch([encoded(source)], ids=["door"]))
    assert out.column("status").to_pylist() == ["ok"]
    output, original = decoded(out.column("image")[0].as_py()), np.asarray(source)
    mask = expected_mask(operator, source)
    outside = mask == 0
    assert outside.any() and (mask == 255).any()
    assert np.array_equal(output[outside], original[outside])
    assert not np.array_equal(output[mask == 255], original[mask == 255])  # the inside was repainted
    record = out.column("inpaint").to_pylist()[0]
    assert record["mask"] == "rectangle:16,16,24x16 pixels" and record["mask_pixels"] == 24 * 16
    assert (record["mask_blur"], record["paste_back"], record["padding_mask_crop"]) == (2, True, None)


def test_without_paste_back_the_output_is_what_diffusers_makes(sd_model):
    import diffusers
    import torch

    operator = Inpaint(make_config(sd_model, paste_back=False), seed=3)
    source = photo(64, 64)
    out = operator(make_batch([encoded(source)], ids=["door"]))
    pipeline = diffusers.AutoPipelineForInpainting.from_pretrained(str(sd_model), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    mask = Image.fromarray(expected_mask(operator, source))
    direct = pipeline(
        prompt="a red door",
        image=source,
        mask_image=mask,
        height=64,
        width=64,
        strength=1.0,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(derive_seed(3, "door", 0)),
    ).images[0]
    assert np.array_equal(decoded(out.column("image")[0].as_py()), np.asarray(direct))


def test_an_inpainting_checkpoint_with_a_nine_channel_unet_works(tiny_models):
    operator = Inpaint(make_config(tiny_models["sd-inpainting"]), seed=3)
    source = photo()
    out = operator(make_batch([encoded(source)]))
    assert out.column("status").to_pylist() == ["ok"]
    outside = expected_mask(operator, source) == 0
    assert np.array_equal(decoded(out.column("image")[0].as_py())[outside], np.asarray(source)[outside])


def test_masks_from_a_column_are_checked_per_row(sd_model):
    operator = Inpaint(make_config(sd_model, mask={"column": "mask", "blur": 0}), seed=3)
    source = photo(64, 48)
    half = np.zeros((24, 32), np.uint8)
    half[:, 16:] = 255
    masks = [
        encoded(Image.fromarray(half)),  # half the size, same aspect: resized
        encoded(Image.fromarray(np.zeros((30, 30), np.uint8))),  # another aspect
        None,
        encoded(Image.fromarray(np.zeros((48, 64), np.uint8))),  # empty: nothing to repaint
        b"not an image",
    ]
    batch = make_batch([encoded(source)] * 5, mask=pa.array(masks, pa.binary()))
    out = operator(batch)
    statuses, errors = out.column("status").to_pylist(), out.column("error").to_pylist()
    records = out.column("inpaint").to_pylist()
    assert statuses == ["ok", "error", "error", "ok", "error"]
    assert records[0]["mask_note"] == "mask resized from 32x24" and records[0]["mask_pixels"] == 32 * 48
    output = decoded(out.column("image")[0].as_py())
    assert np.array_equal(output[:, :32], np.asarray(source)[:, :32])
    assert errors[1] == (
        "mask in column 'mask' is 30x30 and the image 64x48: the aspect differs "
        "(give a mask of the image's size or aspect)"
    )
    assert errors[2] == "mask column 'mask' is null in this row"
    assert errors[4].startswith("mask in column 'mask': cannot decode image")
    assert records[3]["mask_note"] == "empty mask: passed through unchanged" and records[3]["mask_pixels"] == 0
    assert np.array_equal(decoded(out.column("image")[3].as_py()), np.asarray(source))


def test_alpha_and_color_rules_select_their_pixels(sd_model):
    rgba = photo(32, 32, "RGBA")
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:16, 8:16] = 0
    rgba.putalpha(Image.fromarray(alpha))
    operator = Inpaint(make_config(sd_model, mask={"alpha": True, "blur": 0}), seed=3)
    out = operator(make_batch([encoded(rgba), encoded(photo(32, 32))]))
    assert out.column("status").to_pylist() == ["ok", "error"]
    assert out.column("inpaint").to_pylist()[0]["mask_pixels"] == 64
    assert out.column("error").to_pylist()[1] == "mask alpha: the image (mode RGB) has no alpha channel"
    keyed = np.asarray(photo(32, 32)).copy()
    keyed[0:4, :] = (0, 255, 0)
    operator = Inpaint(make_config(sd_model, mask={"color_key": {"color": [0, 250, 0], "tolerance": 5}}), seed=3)
    out = operator(make_batch([encoded(Image.fromarray(keyed))]))
    assert out.column("inpaint").to_pylist()[0]["mask_pixels"] == 4 * 32


def test_only_masked_runs_one_row_per_call_and_writes_a1111_fields(sd_model):
    operator = Inpaint(make_config(sd_model, padding_mask_crop=8, model_batch_size=4), seed=3)
    assert operator.model_batch_size() == 1
    sources = [photo(64, 48, seed=1), photo(64, 48, seed=2)]
    out = operator(make_batch([encoded(image) for image in sources]))
    assert out.column("status").to_pylist() == ["ok", "ok"]
    for index, source in enumerate(sources):
        output = decoded(out.column("image")[index].as_py())
        outside = expected_mask(operator, source) == 0
        assert output.shape == (48, 64, 3) and np.array_equal(output[outside], np.asarray(source)[outside])
    text = Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"]
    assert "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 8" in text
    assert '"Mask: rectangle:16,16,24x16 pixels"' in text or "Mask: " in text


def test_paste_back_keeps_the_source_where_the_mask_is_black():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)  # made at a smaller size: resized first
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    mask[2, 2] = 128
    out = paste_back(generated, source, mask)
    assert np.array_equal(out[mask == 0], source[mask == 0])
    resized = np.asarray(Image.fromarray(generated).resize((8, 8), resample=Image.BICUBIC))
    assert np.array_equal(out[mask == 255], resized[mask == 255])
    assert out.dtype == np.uint8 and out.shape == source.shape


def test_an_sdxl_checkpoint_inpaints_through_the_same_operator(tiny_models):
    """`AutoPipelineForInpainting` picks SDXL's inpainting pipeline from an SDXL checkpoint."""
    operator = Inpaint(make_config(tiny_models["sdxl-img2img"]), seed=3)
    source = photo()
    out = operator(make_batch([encoded(source)]))
    assert out.column("status").to_pylist() == ["ok"], out.column("error").to_pylist()
    assert out.column("inpaint").to_pylist()[0]["pipeline"] == "StableDiffusionXLInpaintPipeline"
    outside = expected_mask(operator, source) == 0
    assert np.array_equal(decoded(out.column("image")[0].as_py())[outside], np.asarray(source)[outside])
