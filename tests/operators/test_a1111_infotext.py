"""Every PNG an operator writes carries a `parameters` text that AUTOMATIC1111's own parser reads back
key for key: checked with a reimplementation of its parser on the PNGs of every operator."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from operators.controlnet import ControlNetImg2Img, ControlNetImg2ImgConfig
from operators.diffusion import SCHEDULERS, a1111_parameters, a1111_quote
from operators.img2img import Img2Img, Img2ImgConfig
from operators.standardize import Standardize, StandardizeConfig
from operators.upscale import Upscale, UpscaleConfig
from tests.conftest import make_batch, png_bytes

# --------------------------------------------------------------------------
# AUTOMATIC1111's parser (modules/infotext_utils.py), as it reads a `parameters` text; the defaults
# it then fills in for keys a text lacks (Clip skip, Hires ..., RNG ...) are left out.
# --------------------------------------------------------------------------

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(text: str) -> dict:
    result = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, last_line = text.strip().split("\n")
    if len(RE_PARAM.findall(last_line)) < 3:
        lines.append(last_line)
        last_line = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result["Prompt"] = prompt
    result["Negative prompt"] = negative_prompt
    for key, value in RE_PARAM.findall(last_line):
        try:
            if value[0] == '"' and value[-1] == '"':
                value = unquote(value)
            size = RE_IMAGESIZE.match(value)
            if size is not None:
                result[f"{key}-1"] = size.group(1)
                result[f"{key}-2"] = size.group(2)
            else:
                result[key] = value
        except Exception:  # A1111 prints and skips a pair it cannot read
            pass
    return result


def parse_controlnet_unit(text: str) -> dict:
    """sd-webui-controlnet's reading of one `ControlNet N` value (scripts/infotext.py `parse_unit`)."""
    return {key: value for item in text.split(",") for (key, value) in (item.strip().split(": "),)}


def parsed_png(table: pa.Table, index: int = 0) -> dict:
    return parse_generation_parameters(Image.open(io.BytesIO(table.column("image")[index].as_py())).text["parameters"])


def lora_hash(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]


# --------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("Euler a", "Euler a"),
        (7.5, "7.5"),
        ("a, b", '"a, b"'),
        ("x: y", '"x: y"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
        ("café, ü", '"café, ü"'),  # ensure_ascii=False, as A1111 writes it
    ],
)
def test_values_are_quoted_by_a1111s_rule(value, written):
    assert a1111_quote(value) == written


def test_text_layout_matches_create_infotext():
    fields = {"Steps": 2, "Sampler": "DDIM", "CFG scale": 7.0, "Seed": 5, "Skipped": None, "Note": "a, b: c"}
    assert a1111_parameters("a cat", "blurry", fields) == (
        'a cat\nNegative prompt: blurry\nSteps: 2, Sampler: DDIM, CFG scale: 7.0, Seed: 5, Note: "a, b: c"'
    )
    # No prompt and no negative prompt: the text is the pairs line alone (A1111 strips the result).
    assert a1111_parameters("", None, fields).startswith("Steps: 2, ")


# --------------------------------------------------------------------------
# Every operator's PNGs, parsed back
# --------------------------------------------------------------------------

PROMPT = 'a cat, ink: bold lines, "quoted", 8k'
NEGATIVE = "blurry, text: none"


@pytest.fixture(scope="module")
def second_lora(tiny_models, tmp_path_factory) -> Path:
    """A second adapter with other weights (so another hash), under its own file name."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_models["lora-sd"] / "pytorch_lora_weights.safetensors")
    path = tmp_path_factory.mktemp("loras") / "ink.safetensors"
    save_file({name: tensor * 0.5 for name, tensor in tensors.items()}, path)
    return path


def test_img2img_with_two_loras_round_trips(tiny_models, sd_model, second_lora):
    first_lora = tiny_models["lora-sd"] / "pytorch_lora_weights.safetensors"
    config = Img2ImgConfig(
        kind="img2img",
        model=str(sd_model),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=2,
        loras=[{"model": str(tiny_models["lora-sd"]), "scale": 0.5}, {"model": str(second_lora), "scale": 0.8}],
    )
    out = Img2Img(config, seed=4)(make_batch([png_bytes(40, 32)]))
    record = out.column("img2img")[0].as_py()
    assert parsed_png(out) == {
        "Prompt": f"{PROMPT} <lora:lora-sd:0.5><lora:ink:0.8>",
        "Negative prompt": NEGATIVE,
        "Steps": str(record["num_inference_steps"]),
        "Sampler": SCHEDULERS[record["scheduler"]],
        "CFG scale": str(record["guidance_scale"]),
        "Seed": str(out.column("seed")[0].as_py()),
        "Size-1": str(out.column("width")[0].as_py()),
        "Size-2": str(out.column("height")[0].as_py()),
        "Model hash": record["model_revision"].removeprefix("sha256:")[:10],
        "Model": record["model"],
        "Denoising strength": str(record["strength"]),
        "Lora hashes": f"lora-sd: {lora_hash(first_lora)}, ink: {lora_hash(second_lora)}",
    }


def test_controlnet_units_round_trip(tiny_models):
    config = ControlNetImg2ImgConfig(
        kind="controlnet_img2img",
        model=str(tiny_models["sd-img2img"]),
        prompt=PROMPT,
        num_inference_steps=2,
        control_guidance_end=0.8,
        controlnets=[
            {"model": str(tiny_models["controlnet-canny"]), "preprocessor": "canny", "low_threshold": 50},
            {"model": str(tiny_models["controlnet-canny"]), "preprocessor": "sobel", "conditioning_scale": 0.5},
        ],
    )
    out = ControlNetImg2Img(config, seed=4)(make_batch([png_bytes(32, 32)]))
    record = out.column("controlnet_img2img")[0].as_py()
    parsed = parsed_png(out)
    units = [parse_controlnet_unit(parsed.pop(f"ControlNet {index}")) for index in range(2)]
    short_hash = record["controlnet_revisions"].split(",")[0].removeprefix("sha256:")[:8]
    window = {
        "Guidance Start": str(record["control_guidance_start"]),
        "Guidance End": str(record["control_guidance_end"]),
    }
    assert units == [
        {
            "Module": "canny",
            "Model": f"controlnet-canny [{short_hash}]",
            "Weight": "1.0",
            "Threshold A": "50",
            "Threshold B": "200",
            **window,
        },
        {"Module": "sobel", "Model": f"controlnet-canny [{short_hash}]", "Weight": "0.5", **window},
    ]
    assert record["controlnets"].startswith(f"{tiny_models['controlnet-canny']}[canny(50,200)]x1; ")
    assert parsed == {
        "Prompt": PROMPT,
        "Negative prompt": "",
        "Steps": "2",
        "Sampler": SCHEDULERS[record["scheduler"]],
        "CFG scale": "7.5",
        "Seed": str(out.column("seed")[0].as_py()),
        "Size-1": "32",
        "Size-2": "32",
        "Model hash": record["model_revision"].removeprefix("sha256:")[:10],
        "Model": record["model"],
        "Denoising strength": str(record["strength"]),
    }


def test_sd_x4_upscale_round_trips(tiny_models):
    config = UpscaleConfig(
        kind="upscale", method="sd_x4", model=str(tiny_models["sd-x4-upscaler"]), prompt=PROMPT, num_inference_steps=2
    )
    out = Upscale(config, seed=4)(make_batch([png_bytes(16, 16)]))
    record = out.column("upscale")[0].as_py()
    assert parsed_png(out) == {
        "Prompt": PROMPT,
        "Negative prompt": "",
        "Steps": "2",
        "Sampler": SCHEDULERS[record["scheduler"]],
        "CFG scale": str(record["guidance_scale"]),
        "Seed": str(out.column("seed")[0].as_py()),
        "Size-1": "64",
        "Size-2": "64",
        "Model hash": record["model_revision"].removeprefix("sha256:")[:10],
        "Model": record["model"],
        "Postprocess upscale by": f"{record['scale']:g}",
        "Postprocess upscaler": "SD x4",
        "Noise level": str(record["noise_level"]),
        "Eta": str(record["eta"]),
    }


@pytest.mark.parametrize(("method", "upscaler"), [("lanczos", "Lanczos"), ("bicubic", "Bicubic")])
def test_classical_upscale_round_trips(method, upscaler):
    sixteen_bit_rgb = np.full((10, 12, 3), (1000, 30000, 65000), np.uint16)
    import cv2

    sources = [png_bytes(12, 10), cv2.imencode(".png", sixteen_bit_rgb)[1].tobytes()]
    out = Upscale(UpscaleConfig(kind="upscale", method=method, scale=2.5))(make_batch(sources))
    for index in range(2):
        record = out.column("upscale")[index].as_py()
        assert parsed_png(out, index) == {
            "Prompt": "",
            "Negative prompt": "",
            "Postprocess upscale by": "2.5",
            "Postprocess upscaler": upscaler,
            "Size-1": "30",
            "Size-2": "25",
        }
        assert record["scale"] == 2.5


def test_standardize_round_trips():
    ramp = np.linspace(0, 65535, 24 * 16).reshape(16, 24).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    config = StandardizeConfig(
        kind="standardize",
        steps=[{"op": "percentile_clip", "low": 1, "high": 99}, {"op": "clahe"}, {"op": "normalize"}],
        output_dtype="uint8",
    )
    out = Standardize(config)(make_batch([buffer.getvalue()]))
    record = out.column("standardize")[0].as_py()
    assert parsed_png(out) == {
        "Prompt": "",
        "Negative prompt": "",
        "Standardize": "percentile_clip(low=1.0, high=99.0); clahe(clip_limit=2.0, tile_grid_size=8); "
        "normalize(method=minmax, zscore_range=3.0); output(dtype=uint8, mode=keep)",
        "Size-1": "24",
        "Size-2": "16",
        "Bit depth": "8",
    }
    assert (record["input_dtype"], record["output_dtype"]) == ("uint16", "uint8")
