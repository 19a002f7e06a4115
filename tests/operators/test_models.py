"""Checkpoint vetting: safetensors only, no code from outside diffusers and transformers."""

from __future__ import annotations

import json
import shutil

import pytest

from operators.models import ModelError, check_model_files, is_hub_id, model_fingerprint, resolve_model


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
    with pytest.raises(ModelError, match="neither a local directory, an s3:// prefix nor a Hub id"):
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
