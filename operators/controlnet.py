"""ControlNet image-to-image: the row's image is the init image, the control image is computed per
row by a preprocessor or read from a column. SD 1.x/2.x and SDXL checkpoints go through the same
operator (`AutoPipelineForImage2Image` with `controlnet=` picks the matching pipeline)."""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.annotators import AnnotatorConfig
from operators.base import Item
from operators.diffusion import GENERATION_FIELDS, a1111_model_hash
from operators.images import eight_bit_rgb
from operators.img2img import Img2Img, Img2ImgConfig, decode_rgb
from operators.models import ModelReference, resolve_model
from operators.rows import RESERVED_COLUMNS, RowError, cell_bytes

logger = logging.getLogger(__name__)

# Preprocessors that run a model (`operators.annotators`) on the model's actor, not in the prepare step.
MODEL_PREPROCESSORS = ("depth", "segmentation", "pose")


class ControlSource(BaseModel):
    """One ControlNet, its conditioning scale and where its control image comes from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(description="ControlNet checkpoint: a local directory, an s3:// prefix, or a Hub id.")
    revision: str | None = Field(None, description="Hub revision (required for Hub ids).")
    variant: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]+$",
        description="Weight variant to load, e.g. 'fp16' for `diffusion_pytorch_model.fp16.safetensors`; "
        "default: the plain weights.",
    )
    conditioning_scale: float = Field(1.0, ge=0, description="Weight of this ControlNet's residuals.")
    preprocessor: (
        Literal["canny", "grayscale", "sobel", "laplacian", "lineart", "depth", "segmentation", "pose"] | None
    ) = Field(
        None,
        description="Compute the control image from the row's image with this: canny, grayscale, sobel, "
        "laplacian and lineart need no weights; depth, segmentation and pose (OpenPose skeletons) run the "
        "`annotator` model on the model's actor.",
    )
    annotator: AnnotatorConfig | None = Field(
        None,
        description="The model of the depth, segmentation and pose preprocessors (required for those, only for those).",
    )
    save_as: str | None = Field(
        None,
        description="Also write this control image (PNG bytes) into an output column of this name, so a later run "
        "can read it with `column:` instead of computing it again.",
    )
    column: str | None = Field(
        None, description="Read the control image from this column (encoded bytes or {bytes, path}): depth, pose..."
    )
    low_threshold: int = Field(100, ge=0, le=255, description="Canny lower hysteresis threshold.", strict=True)
    high_threshold: int = Field(200, ge=0, le=255, description="Canny upper hysteresis threshold.", strict=True)

    @model_validator(mode="after")
    def _one_control_source(self) -> ControlSource:
        if (self.preprocessor is None) == (self.column is None):
            raise ValueError("give exactly one of preprocessor or column")
        if self.preprocessor in MODEL_PREPROCESSORS and self.annotator is None:
            raise ValueError(f"preprocessor {self.preprocessor} needs an annotator: {{model: DIRECTORY}}")
        if self.preprocessor not in MODEL_PREPROCESSORS and self.annotator is not None:
            raise ValueError(
                f"annotator is only for the depth, segmentation and pose preprocessors, got it with "
                f"{f'preprocessor {self.preprocessor}' if self.preprocessor else f'column {self.column}'}"
            )
        if self.save_as is not None and self.column is not None:
            raise ValueError(f"save_as writes a computed control image; column {self.column} is read, not computed")
        if self.save_as is not None and (not self.save_as.isidentifier() or self.save_as in RESERVED_COLUMNS):
            raise ValueError(
                f"save_as must be an identifier other than {', '.join(RESERVED_COLUMNS)}, got {self.save_as!r}"
            )
        if self.low_threshold >= self.high_threshold:
            raise ValueError(
                f"low_threshold must be below high_threshold, got {self.low_threshold} >= {self.high_threshold}"
            )
        return self

    def describe(self) -> str:
        """How the control image is made, for the stage column."""
        if self.column is not None:
            source = f"column:{self.column}"
        elif self.preprocessor == "canny":
            source = f"canny({self.low_threshold},{self.high_threshold})"
        elif self.annotator is not None:
            source = f"{self.preprocessor}({self.annotator.model})"
        else:
            source = str(self.preprocessor)
        return f"{self.model}[{source}]x{self.conditioning_scale:g}"


class ControlledConfig:
    """What a config whose conditions are `ControlSource`s declares from them (ControlNets, T2I-Adapters,
    listed in its `control_field`): their columns, the maps it saves, OpenCV for the preprocessors, and
    their checkpoints and annotators for vetting. Put before the config's base class."""

    control_field: ClassVar[str]

    def control_sources(self) -> list[ControlSource]:
        return getattr(self, self.control_field)

    def input_columns(self) -> set[str]:
        return super().input_columns() | {source.column for source in self.control_sources() if source.column}

    def written_columns(self) -> set[str]:
        return {source.save_as for source in self.control_sources() if source.save_as}

    def output_libraries(self) -> tuple[str, ...]:
        preprocessed = any(source.preprocessor is not None for source in self.control_sources())
        return super().output_libraries() + (("opencv",) if preprocessed else ())

    def model_references(self) -> list[ModelReference]:
        return super().model_references() + control_references(self.control_field, self.control_sources())


class ControlNetImg2ImgConfig(ControlledConfig, Img2ImgConfig):
    """Config of the `controlnet_img2img` operator."""

    control_field: ClassVar[str] = "controlnets"
    kind: Literal["controlnet_img2img"] = Field(description="Operator kind.")  # type: ignore[assignment]
    controlnets: list[ControlSource] = Field(min_length=1, description="ControlNets applied together.")
    control_guidance_start: float = Field(0.0, ge=0, le=1, description="Fraction of steps where control starts.")
    control_guidance_end: float = Field(1.0, ge=0, le=1, description="Fraction of steps where control stops.")

    @model_validator(mode="after")
    def _guidance_window(self) -> ControlNetImg2ImgConfig:
        if self.control_guidance_start >= self.control_guidance_end:
            raise ValueError(
                "control_guidance_start must be below control_guidance_end, got "
                f"{self.control_guidance_start} >= {self.control_guidance_end}"
            )
        check_saved_columns(self.controlnets, self.stage_name)
        return self


def check_saved_columns(sources: list[ControlSource], stage_name: str) -> None:
    """Refuse `save_as` columns that repeat each other or the stage's own column."""
    saved = [source.save_as for source in sources if source.save_as]
    if len(set(saved)) < len(saved) or stage_name in saved:
        raise ValueError(f"save_as columns must differ from each other and from the stage name, got {saved}")


def control_references(field_name: str, sources: list[ControlSource]) -> list[ModelReference]:
    """The checkpoints of a list of condition sources (ControlNets or adapters, and their annotators)
    at `field_name`, for vetting."""
    return [
        ModelReference(f"{field_name}[{index}].model", source.model, source.revision, source.variant, "model")
        for index, source in enumerate(sources)
    ] + [
        source.annotator.reference(f"{field_name}[{index}].annotator.model")
        for index, source in enumerate(sources)
        if source.annotator is not None
    ]


def control_image(image: Image.Image, source: ControlSource) -> Image.Image:
    """Compute a control image from an RGB image with a weight-free preprocessor."""
    import cv2

    gray = np.asarray(image.convert("L"))
    if source.preprocessor == "canny":
        edges = cv2.Canny(gray, source.low_threshold, source.high_threshold)
    elif source.preprocessor == "sobel":
        x = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
        y = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
        edges = _to_uint8(np.hypot(x, y))
    elif source.preprocessor == "laplacian":
        edges = _to_uint8(np.abs(cv2.Laplacian(gray, cv2.CV_32F, ksize=3)))
    elif source.preprocessor == "lineart":
        edges = line_drawing(np.asarray(image))
    else:
        edges = gray
    return Image.fromarray(edges).convert("RGB")


def line_drawing(rgb: np.ndarray, sigma: float = 6.0, threshold: float = 8.0) -> np.ndarray:
    """White lines on black from an RGB image, without weights: how far each pixel is darker than its
    Gaussian-blurred surroundings (the darkest channel's difference), scaled so the median line is mid
    gray. This is sd-webui-controlnet's `lineart_standard` preprocessor (at the image's own size), whose
    maps lineart ControlNets accept."""
    import cv2

    pixels = rgb.astype(np.float32)
    blurred = cv2.GaussianBlur(pixels, (0, 0), sigma)
    intensity = np.min(blurred - pixels, axis=2).clip(0, 255)
    lines = intensity[intensity > threshold]
    intensity /= max(16.0, float(np.median(lines)) if lines.size else 0.0)
    return (intensity * 127).clip(0, 255).astype(np.uint8)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    peak = float(values.max())
    return np.zeros(values.shape, np.uint8) if peak == 0 else np.round(values * (255.0 / peak)).astype(np.uint8)


# sd-webui-controlnet's preprocessor ("Module") names for the preprocessors whose names differ there.
A1111_MODULES = {
    "lineart": "lineart_standard",
    "depth": "depth_midas",
    "segmentation": "seg_ofade20k",
    "pose": "openpose",
}


def a1111_control_unit(
    source: ControlSource, revision: str, guidance_start: float, guidance_end: float, module: str | None = None
) -> str:
    """One ControlNet unit as sd-webui-controlnet serialises it (T2I-Adapters too, which it runs as
    ControlNet units): `Field: value` pairs whose values hold no comma or colon (the whole unit is
    quoted when written)."""
    name = "".join(char for char in source.model.rstrip("/").rsplit("/", 1)[-1] if char not in ",:")
    short_hash = a1111_model_hash(revision, digits=8)
    fields = {
        "Module": module or A1111_MODULES.get(source.preprocessor or "", source.preprocessor or "none"),
        "Model": f"{name} [{short_hash}]" if short_hash else name,
        "Weight": source.conditioning_scale,
    }
    if source.preprocessor == "canny":
        fields.update({"Threshold A": source.low_threshold, "Threshold B": source.high_threshold})
    fields.update({"Guidance Start": guidance_start, "Guidance End": guidance_end})
    return ", ".join(f"{key}: {value}" for key, value in fields.items())


def load_controlnets(
    sources: list[ControlSource], dtype: str, offline: bool, storage_options: dict, model_class: str = "ControlNetModel"
):
    """Load each ControlNet (or each model of another diffusers `model_class`, such as `T2IAdapter`),
    safetensors only; returns the models and their resolved revisions."""
    import diffusers
    import torch

    models, revisions = [], []
    for source in sources:
        resolved = resolve_model(
            source.model, source.revision, offline, storage_options, pipeline=False, variant=source.variant
        )
        models.append(
            getattr(diffusers, model_class).from_pretrained(
                str(resolved.path),
                dtype=getattr(torch, dtype),
                variant=source.variant,
                use_safetensors=True,
                local_files_only=True,
            )
        )
        revisions.append(resolved.revision)
    return models, revisions


def control_inputs(operator, data, row: dict, sources: list[ControlSource], size) -> dict[str, np.ndarray]:
    """One row's prepared inputs: the RGB image after the size policy as "image", and each source's
    control image, computed or read from its column and resized to the image, as "control_N"."""
    image = decode_rgb(operator, data, size)
    prepared = {"image": np.asarray(image)}
    for index, source in enumerate(sources):
        if source.preprocessor in MODEL_PREPROCESSORS:
            continue  # computed on the model's actor, which holds the annotator (`annotate`)
        if source.column is None:
            prepared[f"control_{index}"] = np.asarray(control_image(image, source))
            continue
        try:
            control = eight_bit_rgb(cell_bytes(row.get(source.column)), operator.max_image_pixels)
        except RowError as problem:
            raise RowError(f"control image in column {source.column!r}: {problem}") from None
        control = control if control.size == image.size else control.resize(image.size, resample=3)
        prepared[f"control_{index}"] = np.asarray(control)
    return prepared


def load_annotators(operator, sources: list[ControlSource]) -> list:
    """Each source's annotator (`operators.annotators`), loaded once per actor; None for the others."""
    from operators.annotators import load_annotator

    return [
        load_annotator(
            source.preprocessor, source.annotator, operator.offline, operator.model_storage_options, operator.device
        )
        if source.annotator is not None
        else None
        for source in sources
    ]


def annotate(items: list[Item], annotators: list) -> None:
    """Add each row's model-made control images ("control_N") to its prepared inputs, once per input
    row (its variants share them). An annotator that fails on a row makes that row's error."""
    if not any(annotators):
        return
    rows: dict[int, list[Item]] = {}
    for item in items:
        rows.setdefault(item.source_index, []).append(item)
    for members in rows.values():
        inputs = members[0].input
        inputs = dict(inputs) if isinstance(inputs, dict) else {"image": inputs}
        image = Image.fromarray(inputs["image"])
        try:
            for index, annotator in enumerate(annotators):
                if annotator is not None:
                    inputs[f"control_{index}"] = annotator(image)
        except Exception as error:  # one image's failure must not sink the batch
            message = f"annotator {annotator.config.model} failed on this row: {type(error).__name__}: {error}"
            logger.warning("%s (row %s)", message, members[0].row_id)
            for item in members:
                item.error = message
            continue
        for item in members:
            item.input = inputs


def saved_controls(items: list[Item], sources: list[ControlSource]) -> dict[str, pa.Array]:
    """The `save_as` columns: each row's control image as PNG bytes (null where there is none)."""
    from operators.images import encode_array

    columns = {}
    for index, source in enumerate(sources):
        if source.save_as is None:
            continue
        values = []
        for item in items:
            control = item.input.get(f"control_{index}") if isinstance(item.input, dict) else None
            values.append(encode_array(control) if control is not None else None)
        columns[source.save_as] = pa.array(values, pa.binary())
    return columns


class ControlNetImg2Img(Img2Img):
    """Ray Data actor for `controlnet_img2img`: img2img whose denoising is steered by ControlNets.

    Builds on `Img2Img` (same variants, grouping, error handling and parameters text); adds the
    control images and ControlNet arguments.
    """

    config_class = ControlNetImg2ImgConfig
    stage_fields = [
        *GENERATION_FIELDS,
        ("controlnets", pa.string()),
        ("controlnet_revisions", pa.string()),
        ("control_guidance_start", pa.float64()),
        ("control_guidance_end", pa.float64()),
        # The depth, segmentation and pose annotators that made control images: 'N=model@revision' per ControlNet.
        ("annotators", pa.string()),
    ]

    def components(self) -> dict:
        config = self.config
        self.annotators = load_annotators(self, config.controlnets)
        controlnets, revisions = load_controlnets(
            config.controlnets, config.resolved_dtype(), self.offline, self.model_storage_options
        )
        self.controlnet_revisions = ",".join(revisions)
        return {"controlnet": controlnets[0] if len(controlnets) == 1 else controlnets}

    def process(self, items: list[Item]) -> None:
        """Annotate (depth, segmentation, pose) on this actor, then generate the rows annotation did not fail."""
        annotate(items, self.annotators)
        super().process([item for item in items if item.error is None])

    def output_columns(self, items: list[Item]) -> dict[str, pa.Array]:
        return saved_controls(items, self.config.controlnets)

    def prepare(self, data, row: dict) -> dict[str, np.ndarray]:
        return control_inputs(self, data, row, self.config.controlnets, self.config.size)

    def call_inputs(self, members: list[Item]) -> dict:
        """The image and ControlNet arguments of one model call."""
        config = self.config
        nets = len(config.controlnets)
        controls = [[Image.fromarray(item.input[f"control_{n}"]) for n in range(nets)] for item in members]
        return {
            "image": [Image.fromarray(item.input["image"]) for item in members],
            "control_image": [control[0] for control in controls] if nets == 1 else controls[0],
            "controlnet_conditioning_scale": (
                config.controlnets[0].conditioning_scale
                if nets == 1
                else [net.conditioning_scale for net in config.controlnets]
            ),
            "control_guidance_start": config.control_guidance_start,
            "control_guidance_end": config.control_guidance_end,
        }

    def model_batch_size(self) -> int:
        # diffusers takes one control image per ControlNet per call when several are stacked.
        return 1 if len(self.config.controlnets) > 1 else self.config.resolved_model_batch_size()

    def infotext_fields(self, item: Item) -> dict:
        """Img2img's pairs plus one `ControlNet N` unit per ControlNet, as the sd-webui-controlnet
        extension writes them."""
        revisions = self.controlnet_revisions.split(",")
        return {
            **super().infotext_fields(item),
            **{f"ControlNet {index}": self.a1111_unit(index, revision) for index, revision in enumerate(revisions)},
        }

    def a1111_unit(self, index: int, revision: str) -> str:
        """ControlNet `index`'s unit as sd-webui-controlnet serialises it."""
        annotator = self.annotators[index]
        return a1111_control_unit(
            self.config.controlnets[index],
            revision,
            self.config.control_guidance_start,
            self.config.control_guidance_end,
            annotator.module if annotator is not None else None,
        )

    def record(self, item: Item) -> dict:
        record = super().record(item)
        record.update(
            controlnets="; ".join(net.describe() for net in self.config.controlnets),
            controlnet_revisions=self.controlnet_revisions,
            control_guidance_start=self.config.control_guidance_start,
            control_guidance_end=self.config.control_guidance_end,
            annotators="; ".join(
                f"{index}={annotator.label}" for index, annotator in enumerate(self.annotators) if annotator
            )
            or None,
        )
        return record
