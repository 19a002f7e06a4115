"""`prompt_from: png_parameters`: a row's prompt, negative prompt and seed from its input file's own
AUTOMATIC1111 text, and the configured prompt for rows without one."""

from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from operators.diffusion import SOURCE_PARAMETERS, a1111_parameters, parse_a1111_parameters, variant_parameters
from operators.img2img import Img2Img, Img2ImgConfig
from operators.rows import derive_seed
from tests.conftest import make_batch, png_bytes

TEXT = a1111_parameters(
    "a {castle} on a hill,\nat dusk", "blurry, lowres", {"Steps": 20, "Sampler": "Euler a", "Seed": 1234}
)


def png_with_parameters(text: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def config(model="m", **overrides) -> Img2ImgConfig:
    fields = {"kind": "img2img", "model": str(model), "prompt": "a watercolor of {caption}", "num_inference_steps": 2}
    return Img2ImgConfig(**{**fields, **overrides})


def test_parse_reads_prompt_negative_and_seed_as_automatic1111_writes_them():
    assert parse_a1111_parameters(TEXT) == {
        "prompt": "a {castle} on a hill,\nat dusk",
        "negative_prompt": "blurry, lowres",
        "seed": 1234,
    }
    assert parse_a1111_parameters("just a prompt") == {"prompt": "just a prompt", "negative_prompt": None, "seed": None}


def test_rows_with_the_text_use_it_and_the_others_the_configured_prompt():
    chosen = config(prompt_from="png_parameters", variants=2, negative_prompt="ugly")
    own = variant_parameters(chosen, {"caption": "a cat", SOURCE_PARAMETERS: TEXT})
    assert [(item["prompt"], item["negative_prompt"], item["seed"], item["prompt_source"]) for item in own] == [
        ("a {castle} on a hill,\nat dusk", "blurry, lowres", 1234, "png_parameters"),
        ("a {castle} on a hill,\nat dusk", "blurry, lowres", 1235, "png_parameters"),
    ]
    fallback = variant_parameters(chosen, {"caption": "a cat", SOURCE_PARAMETERS: None})
    assert [(item["prompt"], item["negative_prompt"], "seed" in item, item["prompt_source"]) for item in fallback] == [
        ("a watercolor of a cat", "ugly", False, "config")
    ] * 2
    ignored = variant_parameters(config(), {"caption": "a cat", SOURCE_PARAMETERS: TEXT})
    assert ignored[0]["prompt"] == "a watercolor of a cat" and ignored[0]["prompt_source"] == "config"


def test_operator_reuses_a_png_s_own_parameters_and_records_which_prompt_it_used(sd_model):
    operator = Img2Img(config(sd_model, prompt_from="png_parameters"), seed=5)
    batch = make_batch([png_with_parameters(TEXT), png_bytes(32, 32)], ids=["own", "plain"], caption=["x", "a dog"])
    out = operator(batch)
    assert SOURCE_PARAMETERS not in out.column_names
    assert out.column("status").to_pylist() == ["ok", "ok"]
    assert out.column("seed").to_pylist() == [1234, derive_seed(5, "plain", 0)]
    stages = out.column("img2img").to_pylist()
    assert [(stage["prompt"], stage["negative_prompt"], stage["prompt_source"]) for stage in stages] == [
        ("a {castle} on a hill,\nat dusk", "blurry, lowres", "png_parameters"),
        ("a watercolor of a dog", None, "config"),
    ]
    text = Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"]
    assert (
        text.startswith("a {castle} on a hill,\nat dusk\nNegative prompt: blurry, lowres\n") and "Seed: 1234," in text
    )
