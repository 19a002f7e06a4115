"""Every example in configs/ dry-runs through the CLI and runs end to end on the tiny models."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from jobs.config import validate_config
from jobs.pipeline import run_job
from jobs.sources import inspect_source

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from jobs.demo import make_demo_data, make_medical_demo_data

    directory = tmp_path_factory.mktemp("demo")
    make_demo_data(directory)
    make_medical_demo_data(directory)
    return directory


def localize(value, replacements: dict[str, str]):
    """Point the example's repository-relative paths at this test's models, data and outputs."""
    if isinstance(value, dict):
        return {key: localize(item, replacements) for key, item in value.items()}
    if isinstance(value, list):
        return [localize(item, replacements) for item in value]
    if isinstance(value, str):
        for prefix, target in replacements.items():
            if value.startswith(prefix):
                return target + value[len(prefix) :]
    return value


def example(path: Path, tiny_models, demo_dir: Path, out_dir: Path) -> dict:
    models_dir = next(iter(tiny_models.values())).parent
    data = yaml.safe_load(path.read_text())
    return localize(
        data, {".cache/models/": f"{models_dir}/", ".cache/demo/": f"{demo_dir}/", "outputs/": f"{out_dir}/"}
    )


def test_there_is_an_example_per_use():
    names = {path.stem for path in CONFIGS}
    assert {"img2img_augment", "controlnet_canny", "upscale_x4", "standardize", "chain", "demo"} <= names
    assert {"inpaint_mask_column", "outpaint"} <= names
    assert {"controlnet_depth", "controlnet_segmentation"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_example_dry_runs(path, tiny_models, demo_dir, tmp_path, capsys, monkeypatch):
    import jobs.pipeline

    monkeypatch.setattr(jobs.pipeline, "start_ray", lambda config: pytest.fail("dry run started Ray"))
    localized = tmp_path / path.name
    localized.write_text(yaml.safe_dump(example(path, tiny_models, demo_dir, tmp_path / "out")))
    assert main(["run", str(localized), "--dry-run"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "stage 0" in out and "rows expected" in out


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_example_runs_end_to_end(path, ray_session, tiny_models, demo_dir, tmp_path):
    data = example(path, tiny_models, demo_dir, tmp_path / "out")
    data["source"]["limit"] = 3  # a few rows keep the suite fast; each still crosses every stage
    for operator in data["operators"]:
        if "num_inference_steps" in operator:
            operator["num_inference_steps"] = 4
    config = validate_config(data, source_name=path.name)
    summary = run_job(config).summary
    assert summary["rows_in"] == min(3, inspect_source(config.source.model_copy(update={"limit": None})).row_count)
    assert summary["rows_out"] == summary["rows_expected"] > 0
    assert summary["missing"] == summary["duplicated"] == summary["unexpected"] == 0
    assert summary["error"] == 0, pq.read_table(Path(config.sink.uri) / "data").column("error").to_pylist()
    assert summary["ok"] + summary.get("rejected", 0) == summary["rows_out"]
    rows = pq.read_table(Path(config.sink.uri) / "data").to_pylist()
    CHECKS.get(path.stem, lambda rows: None)(rows)


def check_augment(rows):
    assert sorted({row["variant_index"] for row in rows}) == list(range(8))
    prompts = {row["img2img"]["prompt"] for row in rows if row["id"] == "astronaut"}
    assert prompts == {
        "an astronaut portrait, oil painting",
        "an astronaut portrait, oil painting, studio lighting, high detail",
    }
    assert {row["img2img"]["loras"].rsplit(":", 1)[1] for row in rows} == {"0.8"}


def check_controlnet(rows):
    assert all("[canny(100,200)]x1" in row["controlnet_img2img"]["controlnets"] for row in rows)
    assert all(row["ssim"] is not None for row in rows)


def check_upscale(rows):
    for row in rows:
        assert row["upscale"]["scale"] == 4 and row["width"] == 4 * row["upscale"]["input_width"]
        assert row["upscale"]["tiles"] >= 1


def check_standardize(rows):
    import io

    from PIL import Image

    for row in rows:
        image = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert image.mode == "I;16" and image.size == (128, 128)
        assert row["standardize"]["output_dtype"] == "uint16"
        assert row["histogram_distance"] is not None and row["ssim"] is not None


def check_chain(rows):
    assert {row["variant_index"] for row in rows} == {0, 1}
    for row in rows:
        assert row["standardize"]["output_dtype"] == "uint8"
        assert row["img2img"]["strength"] == 0.5
        assert (row["upscale"]["input_width"], row["width"], row["height"]) == (64, 256, 256)


def check_controlnet_depth(rows):
    import io

    import numpy as np
    from PIL import Image

    for row in rows:
        depth = np.asarray(Image.open(io.BytesIO(row["depth_map"])))
        assert depth.shape == (row["height"], row["width"], 3) and (depth.min(), depth.max()) == (0, 255)
        assert row["depth_pass"]["annotators"].startswith("0=") and row["refine_pass"]["annotators"] is None
        assert row["refine_pass"]["controlnets"].endswith("[column:depth_map]x0.8")


def check_controlnet_segmentation(rows):
    import io

    import numpy as np
    from PIL import Image

    from operators.annotators import ADE20K_PALETTE

    palette = {tuple(colour) for colour in ADE20K_PALETTE.tolist()}
    for row in rows:
        painted = np.asarray(Image.open(io.BytesIO(row["segmentation_map"])))
        assert {tuple(colour) for colour in painted.reshape(-1, 3).tolist()} <= palette
        assert "seg-segformer@sha256:" in row["controlnet_img2img"]["annotators"]


CHECKS = {
    "controlnet_depth": check_controlnet_depth,
    "controlnet_segmentation": check_controlnet_segmentation,
    "img2img_augment": check_augment,
    "controlnet_canny": check_controlnet,
    "upscale_x4": check_upscale,
    "standardize": check_standardize,
    "chain": check_chain,
}
