"""The upscale operator called directly on a few rows, without Ray; tiling and blending as pure functions."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from operators.acceleration import speed_record
from operators.base import library_versions
from operators.images import EncodingConfig
from operators.rows import derive_seed
from operators.upscale import TiledCanvas, Upscale, UpscaleConfig, axis_starts, tile_boxes, tile_seed
from tests.conftest import make_batch, png_bytes

REPOSITORY = Path(__file__).resolve().parents[2]


def encoded(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    return encoded(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def decoded(table: pa.Table, index: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(table.column("image")[index].as_py()))


def model_operator(tiny_models, method: str, seed: int = 11, **overrides) -> Upscale:
    names = {"sd_x4": "sd-x4-upscaler", "latent_x2": "sd-latent-x2-upscaler", "ldm": "ldm-super-resolution"}
    fields = {"kind": "upscale", "method": method, "model": str(tiny_models[names[method]]), "num_inference_steps": 2}
    fields.update(overrides)
    return Upscale(UpscaleConfig(**fields), seed=seed)


@pytest.fixture(scope="module")
def sd_x4(tiny_models) -> Upscale:
    return model_operator(tiny_models, "sd_x4", prompt="a {caption} photo", negative_prompt="blurry")


# --------------------------------------------------------------------------
# Model methods
# --------------------------------------------------------------------------


def test_sd_x4_quadruples_and_writes_parameters(sd_x4):
    out = sd_x4(make_batch([png_bytes(32, 32)], ids=["cat"], caption=pa.array(["sharp"])))
    assert out.column_names == [
        "id",
        "image",
        "status",
        "error",
        "caption",
        "variant_index",
        "seed",
        "width",
        "height",
        "upscale",
    ]
    assert out.column("status").to_pylist() == ["ok"]
    assert (out.column("width")[0].as_py(), out.column("height")[0].as_py()) == (128, 128)
    image = decoded(out)
    assert image.format == "PNG" and image.mode == "RGB" and image.size == (128, 128)
    seed = derive_seed(11, "cat", 0)
    stage = out.column("upscale")[0].as_py()
    revision = stage.pop("model_revision")
    assert revision.startswith("sha256:")
    assert image.text["parameters"].split("\n") == [
        "a sharp photo",
        "Negative prompt: blurry",
        f"Steps: 2, Sampler: DDIM, CFG scale: 9.0, Seed: {seed}, Size: 128x128, Model hash: {revision[7:17]}, "
        f"Model: {sd_x4.config.model}, Postprocess upscale by: 4, Postprocess upscaler: SD x4, Noise level: 20, "
        "Eta: 0.0",
    ]
    assert stage.pop("prepare_seconds") >= 0 and stage.pop("model_seconds") >= 0 and stage.pop("finish_seconds") >= 0
    assert isinstance(stage.pop("node_id"), str | None)  # None outside Ray, the driver node inside it
    assert stage.pop("encoding") == EncodingConfig().describe(np.zeros((1, 1, 3), np.uint8))
    assert stage == {
        "method": "sd_x4",
        "model": sd_x4.config.model,
        "prompt": "a sharp photo",
        "negative_prompt": "blurry",
        "noise_level": 20,
        "num_inference_steps": 2,
        "guidance_scale": 9.0,
        "eta": 0.0,
        "scheduler": "DDIMScheduler",
        "scale": 4.0,
        "input_width": 32,
        "input_height": 32,
        "tiles": 1,
        "tile_size": 512,
        "tile_overlap": 32,
        "dtype": "float32",
        "device": "cpu",
        "model_batch_size": 1,
        "model_variant": None,
        "versions": library_versions(("torch", "diffusers", "transformers", "numpy", "pillow")),
        "torch_threads": 1,
        **speed_record(sd_x4.config),  # the knobs' defaults
        "compile_seconds": None,
        "oom_backoffs": 0,
    }


@pytest.mark.parametrize(
    ("method", "size", "expected"),
    [
        ("latent_x2", (32, 32), (64, 64)),
        # Smaller than the UNet's smallest input and not a multiple of 16: padded, then cropped.
        ("latent_x2", (20, 12), (40, 24)),
        ("ldm", (32, 32), (128, 128)),
        ("ldm", (21, 13), (84, 52)),
    ],
)
def test_latent_x2_and_ldm_output_sizes(tiny_models, method, size, expected):
    operator = model_operator(tiny_models, method)
    out = operator(make_batch([noise_png(*size)]))
    assert out.column("status").to_pylist() == ["ok"], out.column("error").to_pylist()
    assert decoded(out).size == expected and decoded(out).mode == "RGB"
    stage = out.column("upscale")[0].as_py()
    assert stage["scale"] == expected[0] / size[0] and stage["tiles"] == 1
    assert "Noise level" not in decoded(out).text["parameters"]


def test_ldm_takes_no_prompt_and_records_none(tiny_models):
    operator = model_operator(tiny_models, "ldm", eta=0.5)
    out = operator(make_batch([png_bytes(16, 16)]))
    stage = out.column("upscale")[0].as_py()
    assert (stage["prompt"], stage["guidance_scale"], stage["noise_level"], stage["eta"]) == (None, None, None, 0.5)
    text = decoded(out).text["parameters"]
    assert text.startswith("Steps: 2, Sampler: ") and ", CFG scale: 1.0, " in text and "\n" not in text
    assert text.endswith("Postprocess upscale by: 4, Postprocess upscaler: LDSR, Eta: 0.5")


def test_tiled_sd_x4_is_seamless_size_and_deterministic(tiny_models):
    operator = model_operator(tiny_models, "sd_x4", tile_size=32, tile_overlap=8)
    batch = make_batch([noise_png(80, 48)], ids=["big"])
    first, second = operator(batch), operator(batch)
    assert first.column("status").to_pylist() == ["ok"]
    assert decoded(first).size == (320, 192)
    stage = first.column("upscale")[0].as_py()
    assert (stage["tiles"], stage["tile_size"], stage["tile_overlap"], stage["scale"]) == (6, 32, 8, 4.0)
    assert first.column("image")[0].as_py() == second.column("image")[0].as_py()
    assert decoded(first).text["parameters"].endswith("Tiles: 6, Tile size: 32, Tile overlap: 8")


def test_tiles_go_to_the_model_a_few_at_a_time_with_their_own_seeds(tiny_models, monkeypatch):
    operator = model_operator(tiny_models, "sd_x4", tile_size=32, tile_overlap=8, model_batch_size=4)
    calls = []
    real = operator.pipeline

    def record(**kwargs):
        calls.append(([image.size for image in kwargs["image"]], [g.initial_seed() for g in kwargs["generator"]]))
        return real(**kwargs)

    monkeypatch.setattr(operator, "pipeline", record)
    out = operator(make_batch([noise_png(80, 48), png_bytes(16, 16), png_bytes(16, 16)], ids=["a", "b", "c"]))
    assert out.column("status").to_pylist() == ["ok", "ok", "ok"]
    seed = derive_seed(11, "a", 0)
    # Six 32x32 tiles of row a in calls of at most four; then the untiled rows b and c share one call.
    assert [sizes for sizes, _ in calls] == [[(32, 32)] * 4, [(32, 32)] * 2, [(16, 16)] * 2]
    assert calls[0][1] + calls[1][1] == [tile_seed(seed, index) for index in range(6)]
    assert calls[2][1] == [derive_seed(11, "b", 0), derive_seed(11, "c", 0)]


def test_model_failure_in_one_call_becomes_error_rows(tiny_models, monkeypatch):
    operator = model_operator(tiny_models, "sd_x4")
    real = operator.pipeline

    def fail_on_small_images(**kwargs):
        if kwargs["image"][0].size == (16, 16):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(**kwargs)

    monkeypatch.setattr(operator, "pipeline", fail_on_small_images)
    out = operator(make_batch([png_bytes(32, 32), png_bytes(16, 16), png_bytes(24, 24)]))
    assert out.column("status").to_pylist() == ["ok", "error", "ok"]
    assert out.column("error")[1].as_py() == (
        "model call failed for a batch of 1 tiles: RuntimeError: CUDA out of memory (simulated)"
    )
    assert out.column("image")[1].as_py() is None and out.column("upscale")[1].as_py()["input_width"] == 16


def test_bad_rows_become_error_rows(tiny_models):
    operator = model_operator(tiny_models, "sd_x4", prompt_column="caption")
    sixteen_bit = io.BytesIO()
    Image.new("I;16", (16, 16), 40000).save(sixteen_bit, format="PNG")
    batch = make_batch(
        [png_bytes(16, 16), sixteen_bit.getvalue(), b"not an image", png_bytes(16, 16)],
        caption=pa.array(["a fox", "a fox", "a fox", " "]),
    )
    out = operator(batch)
    assert out.column("status").to_pylist() == ["ok", "error", "error", "error"]
    errors = out.column("error").to_pylist()
    assert "mode I;16" in errors[1] and "crush" in errors[1]
    assert "cannot decode image" in errors[2]
    assert errors[3] == "prompt column 'caption' is empty for this row"


def test_tiles_share_one_encoding_of_their_prompt(tiny_models):
    operator = model_operator(
        tiny_models, "sd_x4", tile_size=32, tile_overlap=8, model_batch_size=4, prompt="a {caption} photo"
    )
    forwards = []
    handle = operator.pipeline.text_encoder.register_forward_hook(lambda *_: forwards.append(1))
    try:
        out = operator(make_batch([noise_png(80, 48), noise_png(80, 48, seed=1)], caption=pa.array(["fox", "fox"])))
        operator(make_batch([noise_png(16, 16)], ids=["other"], caption=pa.array(["cat"])))
    finally:
        handle.remove()
    assert out.column("status").to_pylist() == ["ok", "ok"]
    # 12 tiles in 3 calls share "a fox photo" and the empty negative prompt: one encoding each (the
    # pipeline itself would encode both in every call); the next row's prompt and negative prompt once.
    assert len(forwards) == 4


def direct_upscale(operator: Upscale, pixels: np.ndarray, seed: int, **arguments) -> np.ndarray:
    """The 8-bit output of one call of the operator's loaded pipeline, given prompt strings, as a user
    of diffusers would make it."""
    import torch

    from operators.diffusion import generators

    config = operator.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = operator.pipeline(
            image=[Image.fromarray(pixels)],
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            generator=generators([seed], "cpu"),
            output_type="np",
            **arguments,
        )
    return np.clip(np.round(np.asarray(result.images[0]) * 255), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("method", "overrides", "arguments"),
    [
        ("sd_x4", {}, {"noise_level": 20, "eta": 0.0}),
        ("latent_x2", {}, {}),
        # Unguided: the latent upscaler then encodes the empty prompt, whatever the prompt is.
        ("latent_x2", {"guidance_scale": 0.0}, {}),
    ],
)
def test_embedded_prompts_give_the_bytes_of_prompt_strings(tiny_models, method, overrides, arguments):
    operator = model_operator(tiny_models, method, prompt="a {caption} photo", negative_prompt="blurry", **overrides)
    pixels = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = operator(make_batch([encoded(pixels)], ids=["cat"], caption=pa.array(["sharp"])))
    assert out.column("status").to_pylist() == ["ok"], out.column("error").to_pylist()
    seed = derive_seed(11, "cat", 0)
    expected = direct_upscale(operator, pixels, seed, prompt=["a sharp photo"], negative_prompt=["blurry"], **arguments)
    assert np.array_equal(np.asarray(decoded(out)), expected)


# --------------------------------------------------------------------------
# Classical methods
# --------------------------------------------------------------------------


def classical_operator(method: str, **overrides) -> Upscale:
    return Upscale(UpscaleConfig(kind="upscale", method=method, **overrides))


def test_lanczos_keeps_16_bit_grayscale():
    gradient = np.linspace(0, 65535, 40 * 30).reshape(30, 40).round().astype(np.uint16)
    constant = np.full((30, 40), 40000, dtype=np.uint16)
    out = classical_operator("lanczos")(make_batch([encoded(gradient), encoded(constant)]))
    assert out.column("status").to_pylist() == ["ok", "ok"]
    image = decoded(out, 0)
    assert image.mode == "I;16" and image.size == (80, 60)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint16 and pixels.max() > 60000 and pixels.min() < 1000
    # The gradient is smooth, so the resize tracks it closely.
    assert abs(float(pixels.mean()) - float(gradient.mean())) < 0.005 * 65535
    assert np.array_equal(np.asarray(decoded(out, 1)), np.full((60, 80), 40000, dtype=np.uint16))
    stage = out.column("upscale")[0].as_py()
    assert (stage["method"], stage["scale"], stage["tiles"], stage["input_width"], stage["input_height"]) == (
        "lanczos",
        2.0,
        1,
        40,
        30,
    )
    assert (stage["model"], stage["model_revision"], stage["dtype"], stage["tile_size"], stage["device"]) == (
        None,
        None,
        None,
        None,
        None,
    )


def test_bicubic_on_rgb_and_grayscale():
    out = classical_operator("bicubic", scale=1.5)(
        make_batch([png_bytes(30, 20, (200, 30, 60)), png_bytes(10, 10, 77, mode="L"), png_bytes(10, 10, mode="RGBA")])
    )
    assert out.column("status").to_pylist() == ["ok", "ok", "ok"]
    rgb, gray, rgba = decoded(out, 0), decoded(out, 1), decoded(out, 2)
    assert (rgb.mode, rgb.size) == ("RGB", (45, 30))
    assert rgb.text["parameters"] == "Postprocess upscale by: 1.5, Postprocess upscaler: Bicubic, Size: 45x30"
    assert np.array_equal(np.asarray(rgb), np.full((30, 45, 3), (200, 30, 60), dtype=np.uint8))
    assert (gray.mode, gray.size) == ("L", (15, 15))
    assert np.array_equal(np.asarray(gray), np.full((15, 15), 77, dtype=np.uint8))
    assert rgba.mode == "RGB"
    assert out.column("upscale")[0].as_py()["scale"] == 1.5


def test_lanczos_keeps_16_bit_rgb():
    import cv2

    pixels = np.zeros((12, 16, 3), dtype=np.uint16)
    pixels[...] = (1000, 30000, 65000)
    _, data = cv2.imencode(".png", pixels[..., ::-1])
    out = classical_operator("lanczos", scale=3)(make_batch([data.tobytes()]))
    assert out.column("status").to_pylist() == ["ok"], out.column("error").to_pylist()
    result = cv2.imdecode(np.frombuffer(out.column("image")[0].as_py(), np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    assert result.dtype == np.uint16 and result.shape == (36, 48, 3)
    assert np.array_equal(result, np.broadcast_to(np.array([1000, 30000, 65000], np.uint16), (36, 48, 3)))
    # OpenCV writes the PNG; the parameters chunk is inserted after its header, where Pillow reads it.
    assert decoded(out).text["parameters"] == "Postprocess upscale by: 3.0, Postprocess upscaler: Lanczos, Size: 48x36"


def test_classical_refuses_float_images():
    float_image = io.BytesIO()
    Image.new("F", (8, 8), 0.5).save(float_image, format="TIFF")
    out = classical_operator("lanczos")(make_batch([float_image.getvalue()]))
    assert out.column("status").to_pylist() == ["error"]
    assert out.column("error")[0].as_py().startswith("image mode F: 32-bit float images are not supported")


def test_a_2048_square_input_resizes_in_one_go():
    ramp = np.linspace(0, 255, 2048).astype(np.uint8)
    pixels = np.stack([np.tile(ramp, (2048, 1)), np.tile(ramp[:, None], (1, 2048)), np.full((2048, 2048), 9)], -1)
    out = classical_operator("bicubic")(make_batch([encoded(pixels.astype(np.uint8))]))
    assert out.column("status").to_pylist() == ["ok"]
    assert decoded(out).size == (4096, 4096)
    assert out.column("upscale")[0].as_py()["tiles"] == 1


def test_classical_methods_never_import_torch():
    script = (
        "import sys, pyarrow as pa\n"
        "from operators.upscale import Upscale, UpscaleConfig\n"
        "from tests.conftest import png_bytes\n"
        "operator = Upscale(UpscaleConfig(kind='upscale', method='lanczos'))\n"
        "out = operator(pa.table({'id': ['a'], 'image': pa.array([png_bytes(8, 8)], pa.binary())}))\n"
        "assert out.column('status').to_pylist() == ['ok'], out.column('error').to_pylist()\n"
        "print(sorted(name for name in ('torch', 'diffusers') if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPOSITORY, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------
# Tiling and blending
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "tile", "overlap"),
    [(80, 48, 32, 8), (32, 32, 32, 8), (33, 7, 32, 8), (1000, 517, 128, 16), (2048, 2048, 512, 32), (65, 65, 16, 0)],
)
def test_tile_boxes_cover_the_image_within_bounds(width, height, tile, overlap):
    boxes = tile_boxes(width, height, tile, overlap)
    covered = np.zeros((height, width), dtype=np.int32)
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert (right - left, bottom - top) == (min(width, tile), min(height, tile))
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    for length in (width, height):
        starts = axis_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(length, tile) == length
        shared = [previous + tile - start for previous, start in zip(starts, starts[1:])]
        # Every neighbour pair shares exactly `overlap` but the last, which is flush with the border.
        assert all(value == overlap for value in shared[:-1]) and all(value >= overlap for value in shared[-1:])
    assert len(boxes) == len(axis_starts(width, tile, overlap)) * len(axis_starts(height, tile, overlap))


def test_tile_boxes_examples():
    assert axis_starts(80, 32, 8) == [0, 24, 48]
    assert axis_starts(48, 32, 8) == [0, 16]
    assert axis_starts(20, 32, 8) == [0]
    assert tile_boxes(48, 20, 32, 8) == [(0, 0, 32, 20), (16, 0, 48, 20)]


@pytest.mark.parametrize(("width", "height", "tile", "overlap", "scale"), [(80, 48, 32, 8, 4), (67, 41, 16, 5, 2)])
def test_blending_exact_crops_gives_back_the_image(width, height, tile, overlap, scale):
    known = np.random.default_rng(1).random((height * scale, width * scale, 3), dtype=np.float32)
    canvas = TiledCanvas(width, height, tile, overlap, scale)
    assert len(canvas.boxes) > 1
    for index, (left, top, right, bottom) in reversed(list(enumerate(canvas.boxes))):
        assert not canvas.complete
        canvas.add(index, known[top * scale : bottom * scale, left * scale : right * scale])
    assert canvas.complete
    np.testing.assert_allclose(canvas.pixels, known, rtol=0, atol=1e-6)


def test_blending_is_linear_across_the_overlap():
    canvas = TiledCanvas(56, 8, 32, 8, 1, channels=1)
    assert canvas.boxes == [(0, 0, 32, 8), (24, 0, 56, 8)]
    canvas.add(0, np.zeros((8, 32, 1), dtype=np.float32))
    canvas.add(1, np.ones((8, 32, 1), dtype=np.float32))
    row = canvas.pixels[3, :, 0]
    expected = np.concatenate([np.zeros(24), (np.arange(8) + 0.5) / 8, np.ones(24)])
    np.testing.assert_allclose(row, expected, atol=1e-6)


def test_tile_seeds():
    assert tile_seed(123, 0) == 123
    seeds = [tile_seed(123, index) for index in range(1, 50)]
    assert len(set(seeds)) == 49 and all(0 <= seed < 2**63 for seed in seeds)
    assert seeds == [tile_seed(123, index) for index in range(1, 50)]


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


def test_method_defaults_fill_only_fields_that_apply():
    sd = UpscaleConfig(kind="upscale", method="sd_x4", model="m")
    assert (sd.prompt, sd.noise_level, sd.num_inference_steps, sd.guidance_scale, sd.scale) == ("", 20, 75, 9.0, None)
    ldm = UpscaleConfig(kind="upscale", method="ldm", model="m")
    assert (ldm.prompt, ldm.noise_level, ldm.num_inference_steps, ldm.eta) == (None, None, 100, 0.0)
    lanczos = UpscaleConfig(kind="upscale", method="lanczos")
    assert (lanczos.scale, lanczos.num_inference_steps, lanczos.resolved_dtype()) == (2.0, None, None)
    templated = UpscaleConfig(kind="upscale", method="latent_x2", model="m", prompt="{style} {subject}")
    assert templated.input_columns() == {"style", "subject"}


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"method": "sd_x4"}, "model is required for method 'sd_x4'"),
        ({"method": "lanczos", "model": "some/model"}, "model does not apply to method 'lanczos', got 'some/model'"),
        ({"method": "sd_x4", "model": "m", "tile_overlap": 256}, r"tile_overlap must be less than tile_size / 2 = 256"),
        ({"method": "sd_x4", "model": "m", "scale": 2}, "scale does not apply to method 'sd_x4', got 2.0; it is used"),
        ({"method": "ldm", "model": "m", "prompt": "x"}, "prompt does not apply to method 'ldm'"),
        ({"method": "latent_x2", "model": "m", "noise_level": 5}, "noise_level does not apply to method 'latent_x2'"),
        ({"method": "sd_x4", "model": "m", "noise_level": 351}, "less than or equal to 350"),
        ({"method": "bicubic", "scale": 1}, "greater than 1"),
        ({"method": "sd_x4", "model": "m", "prompt": "x", "prompt_column": "c"}, "at most one of prompt or prompt"),
        ({"method": "ldm", "model": "m", "scheduler": "UniPCMultistepScheduler"}, "does not work with method 'ldm'"),
        ({"method": "latent_x2", "model": "m", "scheduler": "DDIMScheduler"}, "scheduler does not apply to method"),
        ({"method": "nearest"}, "'sd_x4', 'latent_x2', 'ldm', 'lanczos' or 'bicubic'"),
    ],
)
def test_config_rejects_bad_values(fields, fragment):
    with pytest.raises(ValidationError, match=fragment):
        UpscaleConfig(kind="upscale", **fields)
