"""The outpaint operator called directly on a few rows, without Ray."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from operators.outpaint import Outpaint, OutpaintConfig, extension, feathered_mask
from tests.conftest import make_batch


def make_config(model, **overrides) -> OutpaintConfig:
    fields = {"kind": "outpaint", "model": str(model), "prompt": "a wide beach", "num_inference_steps": 2}
    fields.update(overrides)
    return OutpaintConfig(**fields)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "give pixels on at least one of left, right, top, bottom, or an aspect_ratio"),
        ({"left": 8, "aspect_ratio": "16:9"}, "not both"),
        ({"aspect_ratio": "wide"}, "aspect_ratio must be WIDTH:HEIGHT in whole numbers, e.g. '16:9', got 'wide'"),
        ({"right": 8, "sides": ["left"]}, "sides applies with aspect_ratio only"),
        ({"right": -8}, "greater than or equal to 0"),
    ],
)
def test_a_bad_extension_is_refused_with_one_line(sd_model, fields, message):
    with pytest.raises(ValidationError, match=message):
        make_config(sd_model, **fields)


@pytest.mark.parametrize("fill", ["edge", "blur", "noise"])
def test_the_border_is_new_and_the_original_region_is_byte_identical(sd_model, fill):
    operator = Outpaint(make_config(sd_model, right=16, bottom=8, fill=fill, feather=4), seed=7)
    source = photo(48, 40)
    out = operator(make_batch([encoded(source)], ids=["beach"]))
    assert out.column("status").to_pylist() == ["ok"]
    output = decoded(out.column("image")[0].as_py())
    assert output.shape == (48, 64, 3)
    assert (out.column("width").to_pylist(), out.column("height").to_pylist()) == ([64], [48])
    assert np.array_equal(output[:40, :48], source)
    edge = np.repeat(source[:, -1:], 8, axis=1)  # what an edge fill left there before inpainting
    assert not np.array_equal(output[:40, 56:], edge)  # the feathered border was repainted
    record = out.column("outpaint").to_pylist()[0]
    assert record["mask"] == f"outpaint right 16 bottom 8, fill {fill}, feather 4"
    assert record["mask_note"] == "extended left 0, right 16, top 0, bottom 8 to 64x48"
    assert record["mask_pixels"] == 64 * 48 - 48 * 40


def test_aspect_ratio_grows_the_short_axis_on_the_chosen_sides(sd_model):
    config = make_config(sd_model, aspect_ratio="16:9")
    assert extension(config, 64, 64) == {"left": 25, "right": 25, "top": 0, "bottom": 0}
    assert extension(config, 160, 64) == {"left": 0, "right": 0, "top": 13, "bottom": 13}
    assert extension(make_config(sd_model, aspect_ratio="1:1", sides=["right"]), 32, 48) == {
        "left": 0,
        "right": 16,
        "top": 0,
        "bottom": 0,
    }
    operator = Outpaint(make_config(sd_model, aspect_ratio="2:1", sides=["top"]), seed=7)
    out = operator(make_batch([encoded(photo(32, 32)), encoded(photo(64, 32))]))
    assert out.column("status").to_pylist() == ["error", "ok"]
    assert out.column("error").to_pylist()[0] == (
        "aspect_ratio 2:1 needs this 32x32 image to grow on left or right, and sides are ['top']"
    )
    # Already 2:1: nothing to fill, the row passes through unchanged.
    assert out.column("outpaint").to_pylist()[1]["mask_note"] == "empty mask: passed through unchanged"
    assert np.array_equal(decoded(out.column("image")[1].as_py()), photo(64, 32))


def test_the_mask_rises_over_the_feather_from_the_original_edge():
    mask = feathered_mask((4, 10), {"left": 2, "right": 4, "top": 0, "bottom": 0}, feather=4)
    assert mask[0].tolist() == [128, 64, 0, 0, 0, 0, 64, 128, 191, 255]
    assert feathered_mask((2, 4), {"left": 0, "right": 2, "top": 0, "bottom": 0}, feather=0)[0].tolist() == [
        0,
        0,
        255,
        255,
    ]
