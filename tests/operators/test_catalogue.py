"""diffusers' catalogue read from its source gives the answers the imported classes give, and vetting
never imports diffusers (nor torch) into the process that vets."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types

import pytest

from operators import catalogue

# The pipeline modules real checkpoints name as component libraries (SD 1.5 and unCLIP's
# stable_diffusion, DeepFloyd IF) and a few around them.
PIPELINE_MODULES = ("stable_diffusion", "deepfloyd_if", "stable_diffusion_xl", "controlnet", "kandinsky")


@pytest.fixture(scope="module")
def diffusers():
    import diffusers

    return diffusers


def test_pipeline_names_are_what_diffusers_exports(diffusers):
    exported = {name for name in dir(diffusers) if name.endswith("Pipeline")}
    assert catalogue.pipeline_names() == exported
    assert catalogue.is_pipeline("StableDiffusionImg2ImgPipeline")
    assert not catalogue.is_pipeline("MyCustomPipeline") and not catalogue.is_pipeline("AutoencoderKL")


def test_components_are_the_signature_keys_of_every_pipeline(diffusers):
    compared = 0
    for name in sorted(catalogue.pipeline_names()):
        pipeline_class = getattr(diffusers, name)
        if not (inspect.isclass(pipeline_class) and issubclass(pipeline_class, diffusers.DiffusionPipeline)):
            continue  # modular pipelines, and dummies standing in for a missing backend (onnx)
        if pipeline_class is diffusers.DiffusionPipeline:
            continue  # the base class: no constructor of its own, no components
        expected, _optional = pipeline_class._get_signature_keys(pipeline_class)
        assert catalogue.pipeline_components(name) == tuple(expected), name
        compared += 1
    assert compared > 200


def test_base_and_modular_pipelines_have_no_components_to_vet():
    assert catalogue.pipeline_components("ModularPipeline") is None
    assert catalogue.pipeline_components("DiffusionPipeline") is None
    assert catalogue.pipeline_components("NoSuchPipeline") is None


@pytest.mark.parametrize("library", PIPELINE_MODULES)
def test_pipeline_module_classes_are_what_the_module_exports(diffusers, library):
    from diffusers import pipelines

    module = getattr(pipelines, library)
    assert isinstance(module, types.ModuleType)
    defined = {
        name
        for name, paths in catalogue.pipeline_class_files().items()
        if any(catalogue.diffusers_root() / "pipelines" / library in path.parents for path in paths)
    }
    assert defined
    for name in sorted(defined):
        exported = getattr(module, name, None)
        if exported is None and ("Onnx" in name or "Flax" in name):
            # Hidden by a missing optional backend: vetting accepts it as diffusers code; loading it
            # then fails with diffusers' own message naming the backend.
            continue
        imported = isinstance(exported, type) and exported.__module__.startswith("diffusers.")
        assert catalogue.is_pipeline_module_class(library, name) == imported, name


@pytest.mark.parametrize(
    ("library", "name"),
    [
        ("stable_diffusion", "np"),
        ("stable_diffusion", "NoSuchChecker"),
        ("stable_diffusion", "CLIPTextModel"),  # imported there from transformers, not defined
        ("os", "system"),
        ("stable_diffusion.safety_checker", "StableDiffusionSafetyChecker"),
        ("../models", "UNet2DConditionModel"),
        ("paint_by_example", "PaintByExampleImageEncoder"),  # no such module in this diffusers
        ("kandinsky", "MCLIPConfig"),  # defined there, not exported
    ],
)
def test_names_a_pipeline_module_does_not_define_are_refused(library, name):
    assert not catalogue.is_pipeline_module_class(library, name)


def test_vetting_real_layouts_imports_neither_diffusers_nor_torch(tiny_models, real_layouts):
    paths = [
        str(path) for path in (*tiny_models.values(), *real_layouts.values()) if (path / "model_index.json").is_file()
    ]
    script = (
        "import json, sys\n"
        "from operators.models import check_model_files\n"
        "from pathlib import Path\n"
        f"for path in {paths!r}:\n"
        "    check_model_files(Path(path))\n"
        "print(json.dumps(sorted(m for m in ('diffusers', 'torch', 'transformers') if m in sys.modules)))\n"
    )
    assert json.loads(run_python(script).splitlines()[-1]) == []


def test_a_dry_run_with_a_controlnet_and_a_lora_imports_neither_diffusers_nor_torch(tiny_models, tmp_path):
    """What the driver of `restyle run` vets, `--dry-run` vets too: in the same light process."""
    from tests.conftest import png_bytes, write_image_parquet

    source = write_image_parquet(tmp_path / "in.parquet", [{"id": "a", "image": png_bytes()}])
    job = tmp_path / "job.yaml"
    job.write_text(
        f"source: {{uri: '{source}'}}\n"
        "operators:\n"
        f"  - {{kind: controlnet_img2img, model: '{tiny_models['sd-img2img']}', prompt: p,\n"
        f"     controlnets: [{{model: '{tiny_models['controlnet-canny']}', preprocessor: canny}}],\n"
        f"     loras: [{{model: '{tiny_models['lora-sd']}'}}]}}\n"
        f"sink: {{uri: '{tmp_path / 'out'}'}}\n"
    )
    script = (
        "import json, sys\n"
        "from jobs.cli import main\n"
        f"code = main(['run', {str(job)!r}, '--dry-run'])\n"
        "print(json.dumps([code, sorted(m for m in ('diffusers', 'torch', 'transformers') if m in sys.modules)]))\n"
    )
    output = run_python(script)
    assert json.loads(output.splitlines()[-1]) == [0, []], output


def run_python(script: str) -> str:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stderr + result.stdout
