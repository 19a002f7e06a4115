"""IP-Adapter style references on the img2img and inpaint operators, called directly without Ray."""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from operators.img2img import Img2Img, Img2ImgConfig
from operators.inpaint import Inpaint, InpaintConfig
from operators.models import vet_models
from operators.rows import derive_seed
from tests.conftest import make_batch


def noise(width: int, height: int, seed: int) -> bytes:
    """An encoded PNG of random pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


REFERENCE = noise(40, 30, seed=1)
OTHER_REFERENCE = noise(24, 24, seed=2)
SOURCE = noise(64, 64, seed=0)


def make_config(model, ip_adapter: dict | None = None, config_class=Img2ImgConfig, **overrides):
    fields = {"kind": "img2img", "model": str(model), "prompt": "a watercolor", "num_inference_steps": 2}
    if ip_adapter is not None:
        fields["ip_adapter"] = ip_adapter
    fields.update(overrides)
    return config_class(**fields)


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("style") / "style.png"
    path.write_bytes(REFERENCE)
    return path


@pytest.fixture(scope="module")
def adapter(tiny_models, reference_file) -> dict:
    return {
        "model": str(tiny_models["ip-adapter-sd"]),
        "weight_name": "ip_adapter.safetensors",
        "scale": 0.8,
        "image": str(reference_file),
    }


@pytest.fixture(scope="module")
def styled(sd_model, adapter) -> Img2Img:
    return Img2Img(make_config(sd_model, adapter), seed=4)


@pytest.mark.parametrize(
    ("reference", "given"),
    [({"image": "style.png", "column": "style"}, "image and column"), ({}, "neither")],
)
def test_a_reference_is_an_image_or_a_column(tmp_path, reference, given):
    from jobs.config import ConfigError, validate_config

    adapter = {"model": "adapters/ip", "weight_name": "ip.safetensors", **reference}
    message = f"give exactly one of image (one reference for every row) or column (a reference per row), got {given}"
    with pytest.raises(ValidationError, match=re.escape(message)):
        make_config("models/sd", adapter)
    job = {
        "source": {"uri": str(tmp_path / "in.parquet")},
        "operators": [{"kind": "img2img", "model": "models/sd", "prompt": "x", "ip_adapter": adapter}],
        "sink": {"uri": str(tmp_path / "out")},
    }
    with pytest.raises(ConfigError) as refused:
        validate_config(job)
    assert str(refused.value).splitlines() == ["config is invalid:", f"  operators[0].ip_adapter: {message}"]


def test_the_driver_vets_the_adapter(tiny_models, sd_model, adapter):
    config = make_config(sd_model, {**adapter, "image": None, "column": "style"})
    assert config.input_columns() == {"style"}
    assert [reference.field for reference in config.model_references()] == ["model", "ip_adapter.model"]
    assert vet_models([config]) == []
    lora = {**adapter, "model": str(tiny_models["lora-sd"]), "weight_name": "pytorch_lora_weights.safetensors"}
    (problem,) = vet_models([make_config(sd_model, lora)])
    assert problem.startswith("operators[0].ip_adapter.model: ")
    assert "holds no IP-Adapter: it needs image_proj.* and ip_adapter.* tensors" in problem


def test_a_fixed_reference_that_cannot_be_used_is_refused_before_the_job(sd_model, adapter, reference_file, tmp_path):
    """A fixed reference is read by every actor: one that is missing or undecodable would fail the
    job, so the driver refuses it with the models, naming the field."""
    config = make_config(sd_model, adapter)
    assert [reference.field for reference in config.model_references()][-1] == "ip_adapter.image"
    assert vet_models([config]) == []
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    (problem,) = vet_models([make_config(sd_model, {**adapter, "image": str(broken)})])
    assert problem.startswith("operators[0].ip_adapter.image: cannot be used: cannot decode image")
    (problem,) = vet_models([make_config(sd_model, {**adapter, "image": str(tmp_path / "missing.png")})])
    assert problem.startswith("operators[0].ip_adapter.image: ip_adapter.image ") and "cannot be read" in problem


def test_the_adapter_changes_the_output_and_records_the_reference(sd_model, styled, reference_file):
    plain = Img2Img(make_config(sd_model), seed=4)
    batch = make_batch([SOURCE], ids=["cat"])
    with_style, without = styled(batch), plain(batch)
    assert with_style.column("status").to_pylist() == ["ok"]
    assert not np.array_equal(
        decoded(with_style.column("image")[0].as_py()), decoded(without.column("image")[0].as_py())
    )
    short_hash = hashlib.sha256(REFERENCE).hexdigest()[:12]
    record = with_style.column("img2img")[0].as_py()
    assert record["ip_adapter"] == f"{styled.config.ip_adapter.model}/ip_adapter.safetensors:0.8"
    assert record["ip_adapter_reference"] == f"image:{reference_file}"
    assert record["ip_adapter_image_hash"] == short_hash
    assert without.column("img2img")[0].as_py()["ip_adapter_image_hash"] is None
    text = Image.open(io.BytesIO(with_style.column("image")[0].as_py())).text["parameters"]
    assert text.split("\n")[-1].endswith(
        f"IP-Adapter: ip_adapter, IP-Adapter weight: 0.8, IP-Adapter image hash: {short_hash}"
    )


def test_output_is_what_diffusers_makes_with_the_same_adapter(sd_model, styled, tiny_models):
    import diffusers
    import torch

    out = styled(make_batch([SOURCE, SOURCE], ids=["cat", "dog"]))
    pipeline = diffusers.AutoPipelineForImage2Image.from_pretrained(str(sd_model), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_ip_adapter(
        str(tiny_models["ip-adapter-sd"]), subfolder="", weight_name="ip_adapter.safetensors", local_files_only=True
    )
    pipeline.set_ip_adapter_scale(0.8)
    direct = pipeline(
        prompt="a watercolor",
        image=Image.open(io.BytesIO(SOURCE)),
        ip_adapter_image=Image.open(io.BytesIO(REFERENCE)).convert("RGB"),
        strength=0.6,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(derive_seed(4, "dog", 0)),
    ).images[0]
    assert np.array_equal(decoded(out.column("image")[1].as_py()), np.asarray(direct))


def test_references_from_a_column_are_decoded_per_row(sd_model, styled, adapter):
    operator = Img2Img(make_config(sd_model, {**adapter, "image": None, "column": "style"}), seed=4)
    styles = [REFERENCE, b"not an image", None, {"bytes": OTHER_REFERENCE, "path": "b.png"}]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    column = pa.array(
        [{"bytes": value, "path": None} if isinstance(value, bytes | None) else value for value in styles]
    )
    out = operator(make_batch([SOURCE] * 4, ids=["cat", "bad", "null", "dog"], style=column.cast(struct)))
    assert out.column("status").to_pylist() == ["ok", "error", "error", "ok"]
    errors = out.column("error").to_pylist()
    assert errors[1].startswith("ip_adapter reference in column 'style': cannot decode image")
    assert errors[2] == "ip_adapter column 'style' is null in this row"
    hashes = [record["ip_adapter_image_hash"] for record in out.column("img2img").to_pylist()]
    assert hashes == [
        hashlib.sha256(REFERENCE).hexdigest()[:12],
        None,
        None,
        hashlib.sha256(OTHER_REFERENCE).hexdigest()[:12],
    ]
    # The first row's reference is the fixed operator's: the same bytes; the last row's is another.
    fixed = styled(make_batch([SOURCE, SOURCE], ids=["cat", "dog"]))
    assert out.column("image")[0].as_py() == fixed.column("image")[0].as_py()
    assert not np.array_equal(decoded(out.column("image")[3].as_py()), decoded(fixed.column("image")[1].as_py()))


def test_inpaint_takes_a_reference_too(sd_model, adapter):
    mask = {"rectangle": {"left": 16, "top": 16, "width": 32, "height": 32}, "blur": 0}
    fields = {"kind": "inpaint", "mask": mask, "strength": 1.0}
    styled = Inpaint(make_config(sd_model, adapter, config_class=InpaintConfig, **fields), seed=4)
    plain = Inpaint(make_config(sd_model, config_class=InpaintConfig, **fields), seed=4)
    batch = make_batch([SOURCE], ids=["door"])
    with_style, without = styled(batch), plain(batch)
    record = with_style.column("inpaint")[0].as_py()
    assert record["ip_adapter_image_hash"] == hashlib.sha256(REFERENCE).hexdigest()[:12]
    styled_pixels, plain_pixels = (
        decoded(with_style.column("image")[0].as_py()),
        decoded(without.column("image")[0].as_py()),
    )
    assert not np.array_equal(styled_pixels[16:48, 16:48], plain_pixels[16:48, 16:48])
    assert np.array_equal(styled_pixels[:16], decoded(SOURCE)[:16])  # pasted back outside the mask


def test_an_image_encoder_kept_elsewhere_gives_the_same_bytes(sd_model, styled, adapter, tiny_models, tmp_path):
    import shutil

    weights_only = tmp_path / "adapter"
    weights_only.mkdir()
    shutil.copy(tiny_models["ip-adapter-sd"] / "ip_adapter.safetensors", weights_only)
    encoder = str(tiny_models["ip-adapter-sd"] / "image_encoder")
    (problem,) = vet_models([make_config(sd_model, {**adapter, "model": str(weights_only)})])
    assert "has no image_encoder/ folder beside its weights; give ip_adapter.image_encoder" in problem
    config = make_config(sd_model, {**adapter, "model": str(weights_only), "image_encoder": encoder})
    assert vet_models([config]) == []
    batch = make_batch([SOURCE], ids=["cat"])
    assert Img2Img(config, seed=4)(batch).column("image").to_pylist() == styled(batch).column("image").to_pylist()


def test_controlnet_img2img_takes_a_reference_too(tiny_models, sd_model, adapter):
    from operators.controlnet import ControlNetImg2Img, ControlNetImg2ImgConfig

    controlnets = [{"model": str(tiny_models["controlnet-canny"]), "preprocessor": "canny"}]
    config = make_config(sd_model, adapter, ControlNetImg2ImgConfig, kind="controlnet_img2img", controlnets=controlnets)
    operator = ControlNetImg2Img(config, seed=4)
    batch = make_batch([SOURCE], ids=["cat"])
    styled = operator(batch)
    assert (
        styled.column("controlnet_img2img")[0].as_py()["ip_adapter_image_hash"]
        == hashlib.sha256(REFERENCE).hexdigest()[:12]
    )
    operator.pipeline.set_ip_adapter_scale(0.0)  # the same pipeline, the reference switched off
    assert styled.column("image").to_pylist() != operator(batch).column("image").to_pylist()
