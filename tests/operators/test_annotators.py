"""Control images computed from the image: the depth, segmentation and pose annotators on their tiny
offline models, the OpenPose drawing, the weight-free line drawing, and the ControlNet operator that runs
them, without Ray."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from operators.annotators import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    COCO_KEYPOINTS,
    OPENPOSE_COLOURS,
    AnnotatorConfig,
    depth_to_rgb,
    draw_openpose,
    load_annotator,
)
from operators.controlnet import ControlNetImg2Img, ControlNetImg2ImgConfig, ControlSource, control_image
from operators.models import ModelError, vet_models
from tests.conftest import make_batch


def photo(width: int = 64, height: int = 48) -> bytes:
    """A bright square on a dark gradient: structure for every annotator."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, :, 2] = np.linspace(0, 120, width, dtype=np.uint8)[None, :]
    array[12:36, 16:40] = (230, 200, 40)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def make_config(tiny_models, controlnet: dict, **overrides) -> ControlNetImg2ImgConfig:
    fields = {
        "kind": "controlnet_img2img",
        "model": str(tiny_models["sd-img2img"]),
        "prompt": "a room",
        "num_inference_steps": 2,
        "strength": 0.5,
        "controlnets": [{"model": str(tiny_models["controlnet-canny"]), **controlnet}],
    }
    fields.update(overrides)
    return ControlNetImg2ImgConfig(**fields)


def depth_source(tiny_models, **fields) -> dict:
    return {"preprocessor": "depth", "annotator": {"model": str(tiny_models["depth-dpt"])}, **fields}


@pytest.fixture(scope="module")
def depth_operator(tiny_models) -> ControlNetImg2Img:
    return ControlNetImg2Img(make_config(tiny_models, depth_source(tiny_models, save_as="depth_map")), seed=5)


def test_depth_map_is_gray_rgb_scaled_to_the_full_range(tiny_models):
    annotator = load_annotator("depth", AnnotatorConfig(model=str(tiny_models["depth-dpt"])), True, {}, "cpu")
    depth = annotator(rgb(photo()))
    assert depth.shape == (48, 64, 3) and depth.dtype == np.uint8
    assert (depth[:, :, 0] == depth[:, :, 1]).all() and (depth[:, :, 0] == depth[:, :, 2]).all()
    assert (depth.min(), depth.max()) == (0, 255)
    assert annotator.module == "depth_midas" and annotator.label.startswith(f"{tiny_models['depth-dpt']}@sha256:")


def test_depth_scaling_is_exact_and_a_flat_map_is_black():
    scaled = depth_to_rgb(np.array([[1.0, 2.0], [3.0, 5.0]]))
    assert scaled[:, :, 0].tolist() == [[0, 64], [128, 255]]  # (x - 1) * 255 / 4, rounded
    assert not depth_to_rgb(np.full((2, 3), 7.0)).any()


def test_segmentation_map_paints_ade20k_classes_in_their_palette_colours(tiny_models):
    annotator = load_annotator(
        "segmentation", AnnotatorConfig(model=str(tiny_models["seg-segformer"])), True, {}, "cpu"
    )
    image = rgb(photo())
    painted = annotator(image)
    assert painted.shape == (48, 64, 3) and painted.dtype == np.uint8
    classes = annotator.classes(image)
    assert classes.shape == (48, 64) and 0 <= classes.min() and classes.max() < len(ADE20K_CLASSES)
    assert np.array_equal(painted, ADE20K_PALETTE[classes])
    palette = {tuple(colour) for colour in ADE20K_PALETTE.tolist()}
    assert {tuple(colour) for colour in painted.reshape(-1, 3).tolist()} <= palette
    assert annotator.module == "seg_ofade20k"


def test_ade20k_table_has_150_classes_and_colours():
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[12], ADE20K_CLASSES[149]) == ("wall", "person", "flag")
    assert ADE20K_PALETTE[0].tolist() == [120, 120, 120] and ADE20K_PALETTE[149].tolist() == [92, 0, 255]


def coco_pose(**points: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """17 COCO keypoints and scores: the named ones at (x, y, score), the rest at the origin, scored 0."""
    keypoints, scores = np.zeros((len(COCO_KEYPOINTS), 2)), np.zeros(len(COCO_KEYPOINTS))
    for name, (x, y, score) in points.items():
        keypoints[COCO_KEYPOINTS.index(name)], scores[COCO_KEYPOINTS.index(name)] = (x, y), score
    return keypoints, scores


def limb(colour_index: int) -> tuple[int, ...]:
    """A limb's colour: its table colour at 60%, as draw_bodypose dims the limbs."""
    return tuple(int(channel * 0.6) for channel in OPENPOSE_COLOURS[colour_index])


def test_openpose_drawing_uses_controlnets_limbs_and_colours_and_skips_unsure_points():
    keypoints, scores = coco_pose(
        nose=(30, 8, 0.9),
        left_shoulder=(40, 20, 0.8),
        right_shoulder=(20, 20, 0.8),
        left_elbow=(50, 40, 0.9),
        right_elbow=(10, 40, 0.1),  # below the threshold: neither it nor its limb is drawn
    )
    drawn = draw_openpose(keypoints, scores, (48, 64))
    assert drawn.shape == (48, 64, 3) and drawn.dtype == np.uint8

    def pixel(x: int, y: int) -> tuple[int, ...]:
        return tuple(drawn[y, x].tolist())

    # Points in their OpenPose colours: nose 0, neck 1 (the shoulders' midpoint), right shoulder 2,
    # left shoulder 5, left elbow 6.
    assert pixel(30, 8) == OPENPOSE_COLOURS[0] and pixel(30, 20) == OPENPOSE_COLOURS[1]
    assert pixel(20, 20) == OPENPOSE_COLOURS[2] and pixel(40, 20) == OPENPOSE_COLOURS[5]
    assert pixel(50, 40) == OPENPOSE_COLOURS[6]
    # Limbs at their midpoints: neck-right shoulder 0, neck-left shoulder 1, left shoulder-elbow 4, neck-nose 12.
    assert (pixel(25, 20), pixel(35, 20), pixel(45, 30), pixel(30, 14)) == (limb(0), limb(1), limb(4), limb(12))
    assert limb(1) == (153, 51, 0)
    assert pixel(10, 40) == pixel(15, 30) == (0, 0, 0)  # the unsure right elbow and its limb
    expected = {(0, 0, 0), limb(0), limb(1), limb(4), limb(12)} | {OPENPOSE_COLOURS[i] for i in (0, 1, 2, 5, 6)}
    assert {tuple(colour) for colour in drawn.reshape(-1, 3).tolist()} == expected
    # A right shoulder scored at the threshold is left out: no neck, and nothing that ends in it.
    keypoints, scores = coco_pose(left_shoulder=(40, 20, 0.8), right_shoulder=(20, 20, 0.3), nose=(30, 8, 0.9))
    alone = draw_openpose(keypoints, scores, (48, 64))
    assert {tuple(colour) for colour in alone.reshape(-1, 3).tolist()} == {
        (0, 0, 0), OPENPOSE_COLOURS[0], OPENPOSE_COLOURS[5]
    }  # fmt: skip
    assert not draw_openpose(*coco_pose(), (8, 8)).any()


def test_pose_map_is_the_openpose_drawing_of_the_models_keypoints(tiny_models):
    annotator = load_annotator("pose", AnnotatorConfig(model=str(tiny_models["pose-vitpose"])), True, {}, "cpu")
    image = rgb(photo())
    drawn = annotator(image)
    assert drawn.shape == (48, 64, 3) and drawn.dtype == np.uint8 and drawn.any()
    keypoints, scores = annotator.keypoints(image)
    assert keypoints.shape == (17, 2) and scores.shape == (17,)
    assert np.array_equal(drawn, draw_openpose(keypoints, scores, (48, 64)))
    assert annotator.module == "openpose" and annotator.label.startswith(f"{tiny_models['pose-vitpose']}@sha256:")


def test_pose_controlnet_records_openpose_and_its_annotator(tiny_models):
    pose = {"preprocessor": "pose", "annotator": {"model": str(tiny_models["pose-vitpose"])}, "save_as": "pose_map"}
    config = make_config(tiny_models, pose)
    assert vet_models([config]) == []
    operator = ControlNetImg2Img(config, seed=5)
    row = operator(make_batch([photo()])).to_pylist()[0]
    assert row["status"] == "ok", row["error"]
    annotator = operator.annotators[0]
    prepared = operator.prepare(photo(), {})["image"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["pose_map"]))), annotator(Image.fromarray(prepared)))
    stage = row["controlnet_img2img"]
    assert stage["annotators"] == f"0={tiny_models['pose-vitpose']}@{annotator.revision}"
    assert stage["controlnets"] == f"{tiny_models['controlnet-canny']}[pose({tiny_models['pose-vitpose']})]x1"
    text = Image.open(io.BytesIO(row["image"])).text["parameters"]
    assert 'ControlNet 0: "Module: openpose, Model: controlnet-canny [' in text


def test_a_pose_annotator_must_predict_coco_keypoints(tmp_path):
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    backbone = VitPoseBackboneConfig(
        image_size=[16, 16], patch_size=[8, 8], hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
        mlp_ratio=1, out_indices=[1],
    )  # fmt: skip
    VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=2)).save_pretrained(tmp_path)
    VitPoseImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="predicts 2 keypoints; the pose annotator draws COCO's 17"):
        load_annotator("pose", AnnotatorConfig(model=str(tmp_path)), True, {}, "cpu")


def test_lineart_draws_white_lines_on_black_without_weights():
    drawing = np.full((48, 64, 3), 255, np.uint8)
    drawing[10:12, 8:56] = drawing[36:38, 8:56] = drawing[10:38, 8:10] = drawing[10:38, 54:56] = 0  # a black box
    lines = np.asarray(control_image(Image.fromarray(drawing), ControlSource(model="m", preprocessor="lineart")))
    assert lines.shape == (48, 64, 3) and lines.dtype == np.uint8
    assert lines[10:12, 8:56].min() >= 120 and lines[36:38, 20:40].min() >= 120  # lines: about mid gray
    assert not lines[20:28, 20:44].any() and not lines[44:, :].any()  # white paper stays black


def test_depth_controlnet_uses_and_saves_the_annotators_map(depth_operator, tiny_models):
    out = depth_operator(make_batch([photo()]))
    row = out.to_pylist()[0]
    assert row["status"] == "ok", row["error"]
    prepared = depth_operator.prepare(photo(), {})["image"]
    expected = depth_operator.annotators[0](Image.fromarray(prepared))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["depth_map"]))), expected)
    stage = row["controlnet_img2img"]
    assert stage["annotators"] == f"0={tiny_models['depth-dpt']}@{depth_operator.annotators[0].revision}"
    assert stage["controlnets"] == f"{tiny_models['controlnet-canny']}[depth({tiny_models['depth-dpt']})]x1"
    text = Image.open(io.BytesIO(row["image"])).text["parameters"]
    assert 'ControlNet 0: "Module: depth_midas, Model: controlnet-canny [' in text


def test_saved_map_feeds_a_second_run_through_column(depth_operator, tiny_models):
    first = depth_operator(make_batch([photo()], ids=["a"])).to_pylist()[0]
    reuse = ControlNetImg2Img(make_config(tiny_models, {"column": "depth_map"}), seed=5)
    second = reuse(make_batch([photo()], ids=["a"], depth_map=pa.array([first["depth_map"]], pa.binary())))
    row = second.to_pylist()[0]
    assert row["status"] == "ok" and row["seed"] == first["seed"]
    # The same control image, seed and parameters: the same pixels as computing the map again.
    assert np.array_equal(np.asarray(rgb(row["image"])), np.asarray(rgb(first["image"])))
    assert row["controlnet_img2img"]["annotators"] is None


def test_an_annotator_that_fails_on_one_image_fails_that_row_only(depth_operator, monkeypatch):
    annotator = depth_operator.annotators[0]

    class Fails:
        config, label, module = annotator.config, annotator.label, annotator.module

        def __call__(self, image):
            if image.width == 32:
                raise RuntimeError("out of range")
            return annotator(image)

    monkeypatch.setattr(depth_operator, "annotators", [Fails()])
    out = depth_operator(make_batch([photo(), photo(32, 32)], ids=["good", "bad"]))
    assert out.column("status").to_pylist() == ["ok", "error"]
    assert out.column("error")[1].as_py() == (
        f"annotator {annotator.config.model} failed on this row: RuntimeError: out of range"
    )
    assert out.column("depth_map").to_pylist()[1] is None and out.column("depth_map")[0].as_py()


@pytest.mark.parametrize(
    ("controlnet", "overrides", "fragment"),
    [
        ({"preprocessor": "depth"}, {}, "preprocessor depth needs an annotator"),
        ({"preprocessor": "segmentation"}, {}, "preprocessor segmentation needs an annotator"),
        ({"preprocessor": "pose"}, {}, "preprocessor pose needs an annotator"),
        ({"preprocessor": "lineart", "annotator": {"model": "d"}}, {}, "only for the depth, segmentation and pose"),
        ({"column": "c", "annotator": {"model": "d"}}, {}, "got it with column c"),
        ({"column": "c", "save_as": "m"}, {}, "column c is read, not computed"),
        ({"preprocessor": "canny", "save_as": "image"}, {}, "save_as must be an identifier other than"),
        ({"preprocessor": "canny", "save_as": "controlnet_img2img"}, {}, "differ from each other and from the stage"),
        ({"preprocessor": "depth", "annotator": {"model": "d", "weights": "x"}}, {}, "Extra inputs are not permitted"),
    ],
)
def test_config_refuses_bad_annotator_settings(tiny_models, controlnet, overrides, fragment):
    with pytest.raises(ValidationError, match=fragment):
        make_config(tiny_models, controlnet, **overrides)


def test_annotators_are_vetted_before_the_job(tiny_models, tmp_path):
    segmentation = {"preprocessor": "segmentation", "annotator": {"model": str(tiny_models["seg-segformer"])}}
    assert (
        vet_models([make_config(tiny_models, depth_source(tiny_models)), make_config(tiny_models, segmentation)]) == []
    )
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.bin").write_bytes(b"pickle")
    problems = vet_models([make_config(tiny_models, {"preprocessor": "depth", "annotator": {"model": str(tmp_path)}})])
    assert problems == [f"operators[0].controlnets[0].annotator.model: {tmp_path} holds only pickle weights "
                        "(model.bin); only .safetensors weights are loaded"]  # fmt: skip
    hub = make_config(tiny_models, {"preprocessor": "depth", "annotator": {"model": "Intel/dpt-hybrid-midas"}})
    assert "pin it with a revision" in vet_models([hub])[0]


def test_a_segmentation_annotator_must_predict_ade20k_classes(tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[7], strides=[4],
        num_attention_heads=[1], mlp_ratios=[2], decoder_hidden_size=8, num_labels=2,
    )  # fmt: skip
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path, safe_serialization=True)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="predicts 2 classes; segmentation ControlNets expect ADE20K's 150"):
        load_annotator("segmentation", AnnotatorConfig(model=str(tmp_path)), True, {}, "cpu")


def inpaint_config(tiny_models, classes: list[str]):
    from operators.inpaint import InpaintConfig

    segmentation = {"annotator": {"model": str(tiny_models["seg-segformer"])}, "classes": classes}
    return InpaintConfig(
        kind="inpaint",
        model=str(tiny_models["sd-img2img"]),
        prompt="a red door",
        num_inference_steps=2,
        mask={"segmentation": segmentation, "blur": 0},
    )


def test_inpaint_repaints_the_pixels_of_a_segmentation_class(tiny_models):
    from operators.inpaint import Inpaint

    image = rgb(photo())
    segmenter = load_annotator(
        "segmentation", AnnotatorConfig(model=str(tiny_models["seg-segformer"])), True, {}, "cpu"
    )
    classes = segmenter.classes(image)
    ids, counts = np.unique(classes, return_counts=True)
    chosen = int(ids[np.argmax(counts)])  # the class the tiny model sees most (random weights)
    absent = next(index for index in range(len(ADE20K_CLASSES)) if index not in ids)
    operator = Inpaint(inpaint_config(tiny_models, [ADE20K_CLASSES[chosen], ADE20K_CLASSES[absent]]), seed=3)
    out = operator(make_batch([photo()])).to_pylist()[0]
    assert out["status"] == "ok", out["error"]
    record = out["inpaint"]
    assert record["mask_pixels"] == int(counts.max())
    assert record["mask"] == (f"segmentation:{ADE20K_CLASSES[chosen]}+{ADE20K_CLASSES[absent]}({segmenter.label})")
    output, source = np.asarray(rgb(out["image"])), np.asarray(image)
    outside = classes != chosen
    assert np.array_equal(output[outside], source[outside])  # pasted back byte for byte
    assert not np.array_equal(output[~outside], source[~outside])
    empty = Inpaint(inpaint_config(tiny_models, [ADE20K_CLASSES[absent]]), seed=3)(make_batch([photo()]))
    row = empty.to_pylist()[0]
    assert row["status"] == "ok" and row["inpaint"]["mask_note"] == "empty mask: passed through unchanged"
    assert np.array_equal(np.asarray(rgb(row["image"])), source)


def test_inpaint_segmentation_refuses_unknown_classes_and_is_vetted(tiny_models):
    with pytest.raises(ValidationError, match=r"segmentation.classes \['persons'\] are no ADE20K classes"):
        inpaint_config(tiny_models, ["person", "persons"])
    config = inpaint_config(tiny_models, ["sky"])
    assert config.model_references()[-1].field == "mask.segmentation.annotator.model"
    assert vet_models([config]) == []


def test_loading_an_annotator_turns_the_loading_bars_off(tiny_models, monkeypatch):
    """An annotator turns them off itself, whichever operator loads it and whenever in its set-up."""
    from transformers.utils import logging as transformers_logging

    monkeypatch.setattr(transformers_logging, "_tqdm_active", True)
    load_annotator("depth", AnnotatorConfig(model=str(tiny_models["depth-dpt"])), True, {}, "cpu")
    assert not transformers_logging.is_progress_bar_enabled()
