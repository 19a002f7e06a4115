"""The img2img operator called directly on a few rows, without Ray."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from operators.diffusion import SCHEDULERS
from operators.img2img import Img2Img, Img2ImgConfig
from operators.rows import derive_seed
from tests.conftest import make_batch, png_bytes


def make_config(model, **overrides) -> Img2ImgConfig:
    fields = {"kind": "img2img", "model": str(model), "prompt": "a watercolor", "num_inference_steps": 2}
    fields.update(overrides)
    return Img2ImgConfig(**fields)


@pytest.fixture(scope="module")
def operator(sd_model) -> Img2Img:
    return Img2Img(make_config(sd_model, negative_prompt="blurry"), seed=11)


def test_outputs_have_documented_columns_and_pass_through_the_rest(operator):
    batch = make_batch([png_bytes(64, 48), png_bytes(40, 40)], caption=pa.array(["x", "y"]))
    out = operator(batch)
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
        "img2img",
    ]
    assert out.column("status").to_pylist() == ["ok", "ok"]
    assert out.column("caption").to_pylist() == ["x", "y"]
    assert out.column("seed").to_pylist() == [derive_seed(11, "row-0", 0), derive_seed(11, "row-1", 0)]
    assert (out.column("width").to_pylist(), out.column("height").to_pylist()) == ([64, 40], [48, 40])
    stage = out.column("img2img").to_pylist()[0]
    assert stage["prompt"] == "a watercolor" and stage["negative_prompt"] == "blurry"
    assert stage["num_inference_steps"] == 2 and stage["device"] == "cpu" and stage["dtype"] == "float32"
    assert stage["model_revision"].startswith("sha256:")
    image = Image.open(io.BytesIO(out.column("image").to_pylist()[0]))
    assert image.format == "PNG" and image.size == (64, 48) and image.mode == "RGB"


def test_png_carries_a1111_parameters(operator):
    out = operator(make_batch([png_bytes(64, 64)], ids=["cat"]))
    text = Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"]
    seed = derive_seed(11, "cat", 0)
    lines = text.split("\n")
    assert lines[0] == "a watercolor"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith(
        f"Steps: 2, Sampler: {SCHEDULERS[operator.scheduler_name]}, CFG scale: 7.5, Seed: {seed}, Size: 64x64, "
    )
    assert lines[2].endswith("Denoising strength: 0.6")


def test_bytes_do_not_depend_on_batching_or_row_order(operator):
    images = [png_bytes(64, 48, (10 * i, 90, 200 - 10 * i)) for i in range(4)]
    together = operator(make_batch(images))
    apart = [operator(make_batch([images[i]], ids=[f"row-{i}"])) for i in reversed(range(4))]
    apart_bytes = {table.column("id")[0].as_py(): table.column("image")[0].as_py() for table in apart}
    assert together.column("image").to_pylist() == [apart_bytes[f"row-{i}"] for i in range(4)]


def test_variants_fan_out_with_their_own_seeds(sd_model):
    operator = Img2Img(make_config(sd_model, variants=3), seed=5)
    out = operator(make_batch([png_bytes(), png_bytes()], ids=["a", "b"]))
    assert list(zip(out.column("id").to_pylist(), out.column("variant_index").to_pylist())) == [
        ("a", 0),
        ("a", 1),
        ("a", 2),
        ("b", 0),
        ("b", 1),
        ("b", 2),
    ]
    assert out.column("seed").to_pylist()[:3] == [derive_seed(5, "a", v) for v in range(3)]
    assert len(set(out.column("image").to_pylist())) == 6


def test_bad_rows_become_error_rows_and_good_rows_survive(operator):
    truncated = png_bytes(64, 64)[:60]
    sixteen_bit = io.BytesIO()
    Image.new("I;16", (32, 32), 40000).save(sixteen_bit, format="PNG")
    batch = make_batch([png_bytes(), b"", b"not an image at all", truncated, sixteen_bit.getvalue(), None])
    batch = batch.set_column(2, "status", pa.array(["ok"] * 5 + ["error"]))
    batch = batch.set_column(3, "error", pa.array([None] * 5 + ["image is null in this row"]))
    out = operator(batch)
    assert out.column("status").to_pylist() == ["ok", "error", "error", "error", "error", "error"]
    errors = out.column("error").to_pylist()
    assert "image is empty" in errors[1]
    assert "cannot decode image" in errors[2]
    assert "cannot decode image" in errors[3]
    assert "mode I;16" in errors[4] and "crush" in errors[4]
    assert errors[5] == "image is null in this row"
    assert out.column("image").to_pylist()[1:] == [None] * 5


def test_oversized_image_is_refused_before_decoding(sd_model):
    operator = Img2Img(make_config(sd_model), max_image_pixels=64 * 64 - 1)
    out = operator(make_batch([png_bytes(64, 64), png_bytes(32, 32)]))
    assert out.column("status").to_pylist() == ["error", "ok"]
    assert "64x64 = 4096 pixels, over the limit of 4095" in out.column("error")[0].as_py()


def test_prompt_from_column_and_missing_prompt(sd_model):
    operator = Img2Img(make_config(sd_model, prompt=None, prompt_column="caption"))
    out = operator(make_batch([png_bytes()] * 3, caption=pa.array(["a fox", None, "  "])))
    assert out.column("status").to_pylist() == ["ok", "error", "error"]
    assert out.column("img2img").to_pylist()[0]["prompt"] == "a fox"
    assert out.column("error")[1].as_py() == "prompt column 'caption' is empty for this row"


def test_model_failure_in_one_call_becomes_error_rows(sd_model, monkeypatch):
    operator = Img2Img(make_config(sd_model), seed=1)
    real = operator.pipeline

    def fail_on_second_size(**kwargs):
        if kwargs["image"][0].size == (32, 32):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(**kwargs)

    monkeypatch.setattr(operator, "pipeline", fail_on_second_size)
    out = operator(make_batch([png_bytes(64, 64), png_bytes(32, 32)]))
    assert out.column("status").to_pylist() == ["ok", "error"]
    assert "RuntimeError: CUDA out of memory (simulated)" in out.column("error")[1].as_py()


def test_size_policy_keeps_aspect_and_multiple_of_8(sd_model):
    operator = Img2Img(make_config(sd_model, size={"max_side": 64}))
    out = operator(make_batch([png_bytes(203, 101)]))
    assert (out.column("width")[0].as_py(), out.column("height")[0].as_py()) == (64, 32)


def test_missing_columns_name_operator_and_columns(operator):
    with pytest.raises(KeyError, match=r"img2img stage 'img2img' needs columns \['image'\]; the batch has \['id'\]"):
        operator(pa.table({"id": ["a"]}))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"strength": 1.4}, "less than or equal to 1"),
        ({"prompt": None}, "give exactly one of prompt, prompt_column or sweep.prompt"),
        ({"prompt_column": "caption"}, "give exactly one of prompt, prompt_column or sweep.prompt"),
        ({"scheduler": "FancyScheduler"}, "EulerDiscreteScheduler"),
        ({"name": "status"}, "name must be an identifier other than"),
        ({"num_inference_steps": 1, "strength": 0.6}, r"at least one denoising step, got 1 x 0.6 = 0.6"),
    ],
)
def test_config_rejects_bad_values(overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        make_config("m", **overrides)


def test_negative_prompt_is_passed_only_when_set(sd_model, monkeypatch):
    operator = Img2Img(make_config(sd_model), seed=1)
    calls = []
    real = operator.pipeline

    def record(**kwargs):
        calls.append(sorted(kwargs))
        return real(**kwargs)

    monkeypatch.setattr(operator, "pipeline", record)
    operator(make_batch([png_bytes()]))
    assert "negative_prompt" not in calls[0]
    assert calls[0] == [
        "generator",
        "guidance_scale",
        "image",
        "num_inference_steps",
        "output_type",
        "prompt",
        "strength",
    ]


def test_sweep_product_expands_variants_with_templates(sd_model):
    config = make_config(
        sd_model,
        prompt=None,
        variants=2,
        sweep={"prompt": ["an MRI slice, {modality} style", "a {modality} scan"], "strength": [0.5, 1.0]},
    )
    assert config.variant_count() == 8
    out = Img2Img(config, seed=9)(make_batch([png_bytes()], ids=["p1"], modality=pa.array(["T1"])))
    stages = out.column("img2img").to_pylist()
    assert out.column("variant_index").to_pylist() == list(range(8))
    assert [(s["prompt"], s["strength"]) for s in stages[::2]] == [
        ("an MRI slice, T1 style", 0.5),
        ("an MRI slice, T1 style", 1.0),
        ("a T1 scan", 0.5),
        ("a T1 scan", 1.0),
    ]
    assert out.column("seed").to_pylist() == [derive_seed(9, "p1", v) for v in range(8)]
    assert len(set(out.column("image").to_pylist())) == 8


def test_sweep_zip_with_explicit_seeds(sd_model):
    config = make_config(sd_model, sweep={"mode": "zip", "guidance_scale": [1.0, 9.0], "seed": [1234, 99]})
    out = Img2Img(config, seed=9)(make_batch([png_bytes()], ids=["a"]))
    assert out.column("seed").to_pylist() == [1234, 99]
    assert [s["guidance_scale"] for s in out.column("img2img").to_pylist()] == [1.0, 9.0]
    assert "Seed: 1234," in Image.open(io.BytesIO(out.column("image")[0].as_py())).text["parameters"]


def test_template_naming_a_missing_column_is_an_error_row_for_every_variant(sd_model):
    operator = Img2Img(make_config(sd_model, prompt="a {modality} scan", variants=3))
    out = operator(make_batch([png_bytes()], ids=["a"]))
    assert out.column("status").to_pylist() == ["error"] * 3
    assert out.column("variant_index").to_pylist() == [0, 1, 2]
    assert "prompt template 'a {modality} scan' needs column 'modality'" in out.column("error")[0].as_py()


@pytest.mark.parametrize(
    ("sweep", "fragment"),
    [
        ({}, "a sweep needs at least one list"),
        ({"mode": "zip", "strength": [0.5], "seed": [1, 2]}, "sweep.mode zip needs lists of one length"),
        ({"strength": [1.5]}, r"sweep.strength values must be in \[0, 1\], got 1.5"),
        ({"prompt": ["x"]}, "give exactly one of prompt, prompt_column or sweep.prompt"),
    ],
)
def test_sweep_validation(sweep, fragment):
    with pytest.raises(ValidationError, match=fragment):
        make_config("m", sweep=sweep)


def test_variants_and_sweep_seeds_are_exclusive():
    with pytest.raises(ValidationError, match="variants must be 1 when sweep.seed gives the seeds"):
        make_config("m", variants=2, sweep={"seed": [1, 2]})


def test_lora_adapter_is_loaded_once_and_changes_the_output(tiny_models, sd_model):
    lora = {"model": str(tiny_models["lora-sd"]), "weight_name": "pytorch_lora_weights.safetensors", "scale": 1.0}
    plain = Img2Img(make_config(sd_model), seed=2)(make_batch([png_bytes()], ids=["a"]))
    styled = Img2Img(make_config(sd_model, loras=[lora]), seed=2)(make_batch([png_bytes()], ids=["a"]))
    assert plain.column("image").to_pylist() != styled.column("image").to_pylist()
    record = styled.column("img2img")[0].as_py()
    assert record["loras"] == f"{tiny_models['lora-sd']}/pytorch_lora_weights.safetensors:1"
    # As AUTOMATIC1111 writes a LoRA: a tag in the prompt, and its hash (sha256 of the tensor data
    # after the safetensors header, 12 digits) under the adapter's name in `Lora hashes`.
    data = (tiny_models["lora-sd"] / "pytorch_lora_weights.safetensors").read_bytes()
    short_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()[:12]
    lines = Image.open(io.BytesIO(styled.column("image")[0].as_py())).text["parameters"].split("\n")
    assert lines[0] == "a watercolor <lora:lora-sd:1.0>"
    assert lines[1].endswith(f', Lora hashes: "lora-sd: {short_hash}"')


def test_lora_must_be_safetensors(sd_model, tmp_path):
    pickle_lora = tmp_path / "style.bin"
    pickle_lora.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="is not a .safetensors file; only safetensors weights are loaded"):
        Img2Img(make_config(sd_model, loras=[{"model": str(pickle_lora)}]))
