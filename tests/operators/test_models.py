"""Checkpoint vetting: safetensors only (variants and shards understood), no code from outside diffusers
(its pipeline modules included) and transformers, malformed files as one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from operators.models import (
    ModelError,
    check_model_files,
    is_hub_id,
    model_fingerprint,
    resolve_model,
    vet_models,
    weight_variant,
)


@pytest.fixture
def model_copy(sd_model, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(sd_model, target)
    return target


def test_local_model_resolves_to_content_hash(model_copy):
    resolved = resolve_model(str(model_copy))
    assert resolved.path == model_copy and resolved.revision.startswith("sha256:")
    assert resolved.revision == model_fingerprint(model_copy)
    (model_copy / "unet" / "config.json").write_text("{}")
    assert model_fingerprint(model_copy) != resolved.revision


def test_a_fingerprint_is_kept_until_a_file_changes(model_copy, tmp_path, monkeypatch):
    """A real checkpoint is gigabytes: its hash is kept on the node with each file's size and
    modification time, and computed again only when one of them (or the set of files) changes."""
    from operators import models

    hashed = []
    hash_files = models._hash_files
    monkeypatch.setattr(models, "_hash_files", lambda path, files: hashed.append(path) or hash_files(path, files))
    cache = tmp_path / "cache"
    first = model_fingerprint(model_copy, cache)
    assert model_fingerprint(model_copy, cache) == first and len(hashed) == 1
    config = model_copy / "unet" / "config.json"
    config.write_text(config.read_text().replace("{", "{ ", 1))  # same content, other size
    second = model_fingerprint(model_copy, cache)
    assert second != first and len(hashed) == 2
    (model_copy / "extra.txt").write_text("x")
    assert model_fingerprint(model_copy, cache) != second and len(hashed) == 3
    (model_copy / "extra.txt").unlink()
    assert model_fingerprint(model_copy, cache) == second and len(hashed) == 4  # the same bytes, hashed again
    unwritable = tmp_path / "a-file"  # a cache that cannot be made: hashed each time, no error
    unwritable.write_text("")
    assert model_fingerprint(model_copy, unwritable) == model_fingerprint(model_copy, unwritable) == second
    assert len(hashed) == 6


def test_pickle_only_weights_are_refused(model_copy):
    for weights in (model_copy / "unet").glob("*.safetensors"):
        weights.rename(weights.with_name("diffusion_pytorch_model.bin"))
    with pytest.raises(ModelError, match=r"unet holds only pickle weights .*only .safetensors weights are loaded"):
        check_model_files(model_copy)


def test_custom_code_component_is_refused_and_never_imported(model_copy, tmp_path):
    marker = tmp_path / "ran"
    (model_copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    index = json.loads((model_copy / "model_index.json").read_text())
    index["unet"] = ["evil", "EvilUNet"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"component 'unet' names code from 'evil'; only diffusers, transformers"):
        resolve_model(str(model_copy))
    assert not marker.exists()


def test_hub_ids_need_a_revision_and_offline_never_downloads():
    assert is_hub_id("stabilityai/sd-turbo") and not is_hub_id("s3://b/m") and not is_hub_id("a/b/c")
    with pytest.raises(ModelError, match="is a Hub id; pin it with a revision"):
        resolve_model("stabilityai/sd-turbo")
    with pytest.raises(ModelError, match="offline mode is on"):
        resolve_model("stabilityai/sd-turbo", revision="main", offline=True)


def test_missing_directory_is_explained(tmp_path):
    with pytest.raises(ModelError, match="does not exist: no local directory .*neither an s3:// prefix nor a Hub id"):
        resolve_model(str(tmp_path / "a" / "b" / "c"))
    with pytest.raises(ModelError, match="has no model_index.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("class_name", [["my_pipeline", "MyPipeline"], "MyCustomPipeline", "os.system"])
def test_custom_pipeline_class_is_refused(model_copy, class_name):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["_class_name"] = class_name
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="is not a diffusers pipeline; custom pipeline code is not loaded"):
        check_model_files(model_copy)


@pytest.mark.parametrize(
    "spec",
    [
        ["stable_diffusion", "StableDiffusionSafetyChecker"],
        ["transformers", "CLIPFeatureExtractor"],
        ["transformers", "CLIPImageProcessor"],
    ],
)
def test_components_from_diffusers_pipeline_modules_are_accepted(model_copy, spec):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["safety_checker"] = spec
    (model_copy / "model_index.json").write_text(json.dumps(index))
    check_model_files(model_copy)


@pytest.mark.parametrize(
    "spec",
    [
        ["os", "system"],
        ["stable_diffusion.safety_checker", "StableDiffusionSafetyChecker"],
        ["stable_diffusion", "np"],
        ["stable_diffusion", "NoSuchChecker"],
        ["diffusers.pipelines", "StableDiffusionSafetyChecker"],
    ],
)
def test_other_libraries_are_refused_with_one_line(model_copy, spec):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["safety_checker"] = spec
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"component 'safety_checker' names code from .*no remote or custom code"):
        check_model_files(model_copy)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "model_index.json is not valid JSON: "),
        ("\xff\xfe", "model_index.json is not valid JSON: "),
        ("[]", "model_index.json must hold a JSON object, got list"),
        ('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel", "x"]}', "'unet'"),
        ('{"_class_name": "StableDiffusionPipeline", "vae": "AutoencoderKL"}', "component 'vae' must be [library"),
        ('{"_class_name": "StableDiffusionPipeline", "vae": [1, 2]}', "component 'vae' must be [library, class]"),
    ],
)
def test_malformed_model_index_is_one_line_naming_the_file(model_copy, text, fragment):
    (model_copy / "model_index.json").write_text(text, encoding="latin-1")
    with pytest.raises(ModelError) as caught:
        check_model_files(model_copy)
    message = str(caught.value)
    assert str(model_copy / "model_index.json") in message and fragment in message and "\n" not in message


@pytest.mark.parametrize(
    ("name", "variant"),
    [
        ("model.safetensors", None),
        ("model.fp16.safetensors", "fp16"),
        ("diffusion_pytorch_model.fp16.safetensors", "fp16"),
        ("diffusion_pytorch_model-00001-of-00002.safetensors", None),
        ("diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "fp16"),
        ("diffusion_pytorch_model-00001-of-00002.fp16.safetensors", "fp16"),
        ("pytorch_model.ema.bin", "ema"),
    ],
)
def test_weight_variant_names(name, variant):
    assert weight_variant(name) == variant


def test_variant_weights_only_as_pickle_are_refused(model_copy):
    unet = model_copy / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.safetensors", unet / "diffusion_pytorch_model.fp16.bin")
    check_model_files(model_copy)  # the plain weights are still safetensors
    with pytest.raises(ModelError, match=r"unet holds only pickle fp16 weights \(diffusion_pytorch_model.fp16.bin\)"):
        check_model_files(model_copy, variant="fp16")


def test_variant_shards_and_their_index_are_understood(model_copy):
    unet = model_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(
        unet / "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"
    )
    index = {
        "metadata": {},
        "weight_map": {"conv_in.weight": "diffusion_pytorch_model.fp16-00001-of-00001.safetensors"},
    }
    (unet / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps(index))
    check_model_files(model_copy, variant="fp16")
    (unet / "diffusion_pytorch_model.fp16-00001-of-00001.safetensors").unlink()
    with pytest.raises(ModelError, match=r"index.fp16.json names shard .*, which is missing"):
        check_model_files(model_copy, variant="fp16")


@pytest.mark.parametrize(
    ("weight_map", "fragment"),
    [
        ({"w": "../../outside.safetensors"}, "shards must be .safetensors files beside it"),
        ({"w": "diffusion_pytorch_model-00001-of-00002.bin"}, "shards must be .safetensors files beside it"),
        ({}, "must hold a JSON object with a non-empty weight_map"),
    ],
)
def test_broken_shard_index_is_refused(model_copy, weight_map, fragment):
    index_path = model_copy / "unet" / "diffusion_pytorch_model.safetensors.index.json"
    index_path.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelError, match=re.escape(fragment)):
        check_model_files(model_copy)


def test_hub_ids_are_owner_slash_name_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("runwayml/stable-diffusion-v1-5") and is_hub_id("models/sd")
    for uri in ("./models", "../m/x", "~/m", "/m/x", "a//b", "a/b/c", "-a/b", "a/b.", "a--b/c", "a..b/c", "x"):
        assert not is_hub_id(uri), uri
    (tmp_path / "models" / "sd").mkdir(parents=True)
    assert not is_hub_id("models/sd")


def test_vet_models_names_each_field_and_skips_what_only_actors_can_check(tiny_models, tmp_path):
    from operators.controlnet import ControlNetImg2ImgConfig

    config = ControlNetImg2ImgConfig(
        kind="controlnet_img2img",
        model=str(tiny_models["sd-img2img"]),
        prompt="p",
        variant="fp16",
        loras=[{"model": "s3://bucket/lora"}, {"model": str(tmp_path / "x.ckpt")}],
        controlnets=[{"model": "owner/controlnet", "preprocessor": "canny"}],
    )
    assert vet_models([config]) == [
        f"operators[0].model: {tiny_models['sd-img2img']} has no weight files of variant 'fp16' (such as "
        "unet/*.fp16.safetensors)",
        f"operators[0].loras[1]: LoRA '{tmp_path / 'x.ckpt'}' does not exist: no local file or directory "
        f"{tmp_path / 'x.ckpt'}, and it is neither an s3:// prefix nor a Hub id (owner/name)",
        "operators[0].controlnets[0].model: model 'owner/controlnet' is no local directory, so it is a Hub id; pin it "
        "with a revision (commit sha or tag)",
    ]


def test_component_with_only_variant_weights_needs_the_variant(model_copy):
    unet = model_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ModelError, match=r"unet has only variant weights .*; set variant to one of \['fp16'\]"):
        check_model_files(model_copy)
    check_model_files(model_copy, variant="fp16")
