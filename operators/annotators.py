"""Control images computed from the image by a model: depth, semantic segmentation and pose, each a
`transformers` model loaded once per actor (from a local directory, an s3:// prefix or a Hub id with a
pinned revision, safetensors only, vetted as ControlNets are) and applied to one RGB image at a time.

The maps are what the matching ControlNets were trained on: depth as inverse depth (near is white)
scaled to 0-255 in three equal channels, as ControlNet's MiDaS annotator writes it; segmentation as
each pixel's ADE20K class painted in the ADE20K palette, as its UniFormer/OneFormer annotators write it;
pose as OpenPose's 18-point body skeleton on black, as its OpenPose annotator draws it.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from operators.models import ModelError, ModelReference, quiet_loading_bars, read_json, resolve_model

logger = logging.getLogger(__name__)

# ADE20K's 150 classes and the colour of each, in class-id order: the table of mmsegmentation's
# ADE20KDataset (open-mmlab/mmsegmentation, mmseg/datasets/ade.py), which ControlNet's segmentation
# annotator (lllyasviel/ControlNet, annotator/uniformer, a vendored mmseg) paints its maps with, and so
# the colours segmentation ControlNets were trained on. transformers' ADE20K models (SegFormer, UperNet)
# number their 150 labels in this order.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip
ADE20K_PALETTE = np.array(
    [
        [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
        [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
        [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82], [143, 255, 140], [204, 255, 4],
        [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
        [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
        [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
        [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7], [255, 122, 8], [0, 255, 20],
        [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
        [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0],
        [153, 255, 0], [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
        [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112], [0, 255, 133],
        [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
        [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0], [0, 255, 153],
        [255, 92, 0], [255, 0, 255], [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
        [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
        [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
        [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255],
        [163, 255, 0], [255, 235, 0], [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
        [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255],
        [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
        [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255],
        [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
        [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204], [41, 0, 255], [41, 255, 0],
        [173, 0, 255], [0, 245, 255], [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
        [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
    ],
    dtype=np.uint8,
)  # fmt: skip

# COCO's 17 keypoints, in the order ViTPose (and every COCO keypoint model) predicts them.
COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)  # fmt: skip
# OpenPose's 18 body points (nose, neck, right shoulder, elbow, wrist, left shoulder, elbow, wrist, right hip,
# knee, ankle, left hip, knee, ankle, right eye, left eye, right ear, left ear): the COCO keypoint each one
# is, None for the neck, which COCO lacks (drawn at the midpoint of the shoulders).
OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# The limbs (pairs of OpenPose points, 0-based here, 1-based there) and the colours (RGB) of the points
# and limbs: `limbSeq` and `colors` of `draw_bodypose` in ControlNet's OpenPose annotator
# (lllyasviel/ControlNet-v1-1-nightly, annotator/openpose/util.py, and the same tables in
# huggingface/controlnet_aux, src/controlnet_aux/open_pose/util.py, whose drawing order `draw_openpose`
# follows). Only the first 17 limbs are drawn: the last two (shoulder to ear) are in the table, not the maps.
OPENPOSE_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)  # fmt: skip
OPENPOSE_COLOURS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
# Keypoints scored at or below this are not drawn (nor the limbs that end in them): the cut DWPose's
# COCO-to-OpenPose conversion uses (huggingface/controlnet_aux, src/controlnet_aux/dwpose/wholebody.py,
# where the neck, too, is the shoulders' midpoint, kept when both shoulders pass).
POSE_SCORE_THRESHOLD = 0.3


class AnnotatorConfig(BaseModel):
    """A `transformers` model that computes a control image from the row's image."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        description="Annotator checkpoint in transformers' layout (config.json, model.safetensors and "
        "preprocessor_config.json, as save_pretrained writes them): a local directory, an s3:// prefix, or a "
        "Hub id. Depth: a DPT or Depth-Anything model (relative inverse depth, as Intel/dpt-hybrid-midas and "
        "depth-anything/Depth-Anything-V2-Small-hf give); segmentation: an ADE20K SegFormer or UperNet model "
        "(150 classes, as nvidia/segformer-b0-finetuned-ade-512-512 and openmmlab/upernet-convnext-small); pose: a "
        "ViTPose model on COCO's 17 keypoints (as usyd-community/vitpose-base-simple)."
    )
    revision: str | None = Field(None, description="Hub revision (required for Hub ids); recorded per row.")

    def reference(self, field: str) -> ModelReference:
        """The checkpoint for vetting before the job: a single model directory, as a ControlNet's."""
        return ModelReference(field, self.model, self.revision, None, "model")


class Annotator:
    """A model that maps an RGB image to an RGB control image of the same size; loaded once per actor."""

    auto_class: ClassVar[str]
    # The sd-webui-controlnet preprocessor ("Module") whose maps this annotator's match.
    a1111_module: ClassVar[str]

    def __init__(self, config: AnnotatorConfig, offline: bool, storage_options: dict, device: str):
        import torch
        import transformers

        quiet_loading_bars()
        resolved = resolve_model(config.model, config.revision, offline, storage_options, pipeline=False)
        path = resolved.path
        settings = read_json(path / "config.json")
        if not isinstance(settings, dict) or "auto_map" in settings:
            raise ModelError(f"annotator {config.model}: config.json names custom code (auto_map); it is not loaded")
        if not (path / "preprocessor_config.json").is_file():
            raise ModelError(
                f"annotator {config.model} has no preprocessor_config.json; save its image processor beside the model"
            )
        self.config = config
        self.revision = resolved.revision
        self.device = device
        self.model_type = settings.get("model_type")
        self.processor = transformers.AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        model_class = getattr(transformers, self.auto_class)
        self.model = model_class.from_pretrained(
            str(path), use_safetensors=True, local_files_only=True, dtype=torch.float32
        )
        self.model.to(device).eval()
        self.check()

    def check(self) -> None:
        """Refuse a model whose output this annotator cannot turn into the map its ControlNets expect."""

    @property
    def module(self) -> str:
        """The sd-webui-controlnet preprocessor name of this annotator's maps."""
        return self.a1111_module

    @property
    def label(self) -> str:
        """The model and its revision, as the stage column records them."""
        return f"{self.config.model}@{self.revision}"

    def __call__(self, image: Image.Image) -> np.ndarray:
        """The control image of one RGB image: uint8, height x width x 3."""
        import torch

        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        return self.to_map(outputs, (image.height, image.width))

    def to_map(self, outputs, size: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError


class DepthAnnotator(Annotator):
    """Depth (`AutoModelForDepthEstimation`: DPT, Depth-Anything): the predicted relative inverse
    depth at the image's size, min-max scaled to 0-255 (near white), in three equal channels."""

    auto_class = "AutoModelForDepthEstimation"
    a1111_module = "depth_midas"

    @property
    def module(self) -> str:
        return "depth_anything" if str(self.model_type).startswith("depth_anything") else self.a1111_module

    def to_map(self, outputs, size: tuple[int, int]) -> np.ndarray:
        depth = self.processor.post_process_depth_estimation(outputs, target_sizes=[size])[0]["predicted_depth"]
        return depth_to_rgb(depth.float().cpu().numpy())


class SegmentationAnnotator(Annotator):
    """Semantic segmentation (`AutoModelForSemanticSegmentation`: SegFormer, UperNet) on ADE20K's 150
    classes: each pixel's most likely class at the image's size, painted in the ADE20K palette."""

    auto_class = "AutoModelForSemanticSegmentation"
    a1111_module = "seg_ofade20k"

    def check(self) -> None:
        labels = self.model.config.num_labels
        if labels != len(ADE20K_CLASSES):
            raise ModelError(
                f"annotator {self.config.model} predicts {labels} classes; segmentation ControlNets expect ADE20K's "
                f"{len(ADE20K_CLASSES)}: use an ADE20K model"
            )

    def classes(self, image: Image.Image) -> np.ndarray:
        """Each pixel's ADE20K class id (0-149), height x width."""
        import torch

        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        return self.class_ids(outputs, (image.height, image.width))

    def class_ids(self, outputs, size: tuple[int, int]) -> np.ndarray:
        classes = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[size])[0]
        return classes.cpu().numpy().astype(np.int64)

    def to_map(self, outputs, size: tuple[int, int]) -> np.ndarray:
        return ADE20K_PALETTE[self.class_ids(outputs, size)]


class PoseAnnotator(Annotator):
    """Pose (`VitPoseForPoseEstimation`: ViTPose, ViTPose+) on COCO's 17 keypoints, drawn as OpenPose's
    18-point body (`draw_openpose`). ViTPose is top-down: it finds the keypoints of one person in a given
    box, and without a person detector the box is the whole image, so each image gets one skeleton (the
    most prominent person; a crowd is not separated)."""

    auto_class = "VitPoseForPoseEstimation"
    a1111_module = "openpose"

    def check(self) -> None:
        labels = self.model.config.num_labels
        if labels != len(COCO_KEYPOINTS):
            raise ModelError(
                f"annotator {self.config.model} predicts {labels} keypoints; the pose annotator draws COCO's "
                f"{len(COCO_KEYPOINTS)}: use a COCO ViTPose model"
            )

    def keypoints(self, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """The person's 17 COCO keypoints in the image's pixels (17 x 2, x then y) and their scores."""
        import torch

        boxes = [[[0.0, 0.0, float(image.width), float(image.height)]]]  # COCO [x, y, width, height]
        inputs = self.processor(images=image, boxes=boxes, return_tensors="pt").to(self.device)
        if self.model.config.backbone_config.num_experts > 1:  # ViTPose+: expert 0 is the COCO head
            inputs["dataset_index"] = torch.zeros(1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        person = self.processor.post_process_pose_estimation(outputs, boxes=boxes)[0][0]
        return person["keypoints"].float().cpu().numpy(), person["scores"].float().cpu().numpy()

    def __call__(self, image: Image.Image) -> np.ndarray:
        keypoints, scores = self.keypoints(image)
        return draw_openpose(keypoints, scores, (image.height, image.width))


def draw_openpose(
    keypoints: np.ndarray, scores: np.ndarray, size: tuple[int, int], threshold: float = POSE_SCORE_THRESHOLD
) -> np.ndarray:
    """COCO keypoints (17 x 2 pixel coordinates and their scores) drawn as ControlNet's OpenPose annotator
    draws a body (`draw_bodypose`), on a black canvas of `size` (height, width): the 17 limbs as filled
    ellipses 4 pixels thick in their colours at 60%, then each point as a disc of radius 4 in its full
    colour. The neck is the midpoint of the shoulders, drawn when both are; points scored at or below
    `threshold` (or not finite) are left out with their limbs."""
    import cv2

    visible = (np.asarray(scores) > threshold) & np.isfinite(keypoints).all(axis=1)
    points: list[tuple[float, float] | None] = []
    for coco in OPENPOSE_FROM_COCO:
        if coco is None:
            left, right = COCO_KEYPOINTS.index("left_shoulder"), COCO_KEYPOINTS.index("right_shoulder")
            both = visible[left] and visible[right]
            points.append(tuple((keypoints[left] + keypoints[right]) / 2) if both else None)
        else:
            points.append(tuple(keypoints[coco]) if visible[coco] else None)
    canvas = np.zeros((*size, 3), np.uint8)
    for (start, end), colour in zip(OPENPOSE_LIMBS[:17], OPENPOSE_COLOURS, strict=False):
        if points[start] is None or points[end] is None:
            continue
        (x1, y1), (x2, y2) = points[start], points[end]
        length = ((x1 - x2) ** 2 + (y1 - y2) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
        centre = (int((x1 + x2) / 2), int((y1 + y2) / 2))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, colour)
    canvas = (canvas * 0.6).astype(np.uint8)
    for point, colour in zip(points, OPENPOSE_COLOURS, strict=True):
        if point is not None:
            cv2.circle(canvas, (int(point[0]), int(point[1])), 4, colour, thickness=-1)
    return canvas


def depth_to_rgb(depth: np.ndarray) -> np.ndarray:
    """A depth map scaled to 0-255 (its minimum black, its maximum white; a flat map is black) and
    repeated in three channels."""
    depth = depth.astype(np.float64)
    low, high = float(depth.min()), float(depth.max())
    scaled = np.zeros(depth.shape) if high <= low else (depth - low) * (255.0 / (high - low))
    gray = np.round(scaled).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


ANNOTATORS: dict[str, type[Annotator]] = {
    "depth": DepthAnnotator,
    "segmentation": SegmentationAnnotator,
    "pose": PoseAnnotator,
}


def load_annotator(kind: str, config: AnnotatorConfig, offline: bool, storage_options: dict, device: str) -> Annotator:
    """The annotator of `kind` ('depth', 'segmentation' or 'pose'), loaded from `config`'s checkpoint."""
    return ANNOTATORS[kind](config, offline, storage_options, device)
