"""ControlNet image-to-image: the row's image is the init image, the control image is computed per
row by a preprocessor or read from a column. SD 1.x/2.x and SDXL checkpoints go through the same
operator (`AutoPipelineForImage2Image` with `controlnet=` picks the matching pipeline)."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.base import Item
from operators.diffusion import GENERATION_FIELDS, a1111_model_hash
from operators.images import eight_bit_rgb
from operators.img2img import Img2Img, Img2ImgConfig, decode_rgb
from operators.models import ModelReference, resolve_model
from operators.rows import RowError

logger = logging.getLogger(__name__)


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
    preprocessor: Literal["canny", "grayscale", "sobel", "laplacian"] | None = Field(
        None, description="Compute the control image from the row's image with this (no weights needed)."
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
        else:
            source = str(self.preprocessor)
        return f"{self.model}[{source}]x{self.conditioning_scale:g}"


class ControlNetImg2ImgConfig(Img2ImgConfig):
    """Config of the `controlnet_img2img` operator."""

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
        return self

    def input_columns(self) -> set[str]:
        return super().input_columns() | {net.column for net in self.controlnets if net.column}

    def output_libraries(self) -> tuple[str, ...]:
        preprocessed = any(net.preprocessor is not None for net in self.controlnets)
        return super().output_libraries() + (("opencv",) if preprocessed else ())

    def model_references(self) -> list[ModelReference]:
        return super().model_references() + [
            ModelReference(f"controlnets[{index}].model", net.model, net.revision, net.variant, "model")
            for index, net in enumerate(self.controlnets)
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
    else:
        edges = gray
    return Image.fromarray(edges).convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    peak = float(values.max())
    return np.zeros(values.shape, np.uint8) if peak == 0 else np.round(values * (255.0 / peak)).astype(np.uint8)


def load_controlnets(sources: list[ControlSource], dtype: str, offline: bool, storage_options: dict):
    """Load each ControlNet (safetensors only); returns the models and their resolved revisions."""
    import diffusers
    import torch

    models, revisions = [], []
    for source in sources:
        resolved = resolve_model(
            source.model, source.revision, offline, storage_options, pipeline=False, variant=source.variant
        )
        models.append(
            diffusers.ControlNetModel.from_pretrained(
                str(resolved.path),
                dtype=getattr(torch, dtype),
                variant=source.variant,
                use_safetensors=True,
                local_files_only=True,
            )
        )
        revisions.append(resolved.revision)
    return models, revisions


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
    ]

    def components(self) -> dict:
        config = self.config
        controlnets, revisions = load_controlnets(
            config.controlnets, config.resolved_dtype(), self.offline, self.model_storage_options
        )
        self.controlnet_revisions = ",".join(revisions)
        return {"controlnet": controlnets[0] if len(controlnets) == 1 else controlnets}

    def prepare(self, data, row: dict) -> dict[str, np.ndarray]:
        image = decode_rgb(self, data, self.config.size)
        prepared = {"image": np.asarray(image)}
        for index, source in enumerate(self.config.controlnets):
            if source.column is None:
                prepared[f"control_{index}"] = np.asarray(control_image(image, source))
                continue
            value = row.get(source.column)
            if isinstance(value, dict):
                value = value.get("bytes")
            try:
                control = eight_bit_rgb(value, self.max_image_pixels)
            except RowError as problem:
                raise RowError(f"control image in column {source.column!r}: {problem}") from None
            control = control if control.size == image.size else control.resize(image.size, resample=3)
            prepared[f"control_{index}"] = np.asarray(control)
        return prepared

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
            **{
                f"ControlNet {index}": self.a1111_unit(net, revision)
                for index, (net, revision) in enumerate(zip(self.config.controlnets, revisions, strict=True))
            },
        }

    def a1111_unit(self, net: ControlSource, revision: str) -> str:
        """One ControlNet unit as sd-webui-controlnet serialises it: `Field: value` pairs whose values
        hold no comma or colon (the whole unit is quoted when written)."""
        name = "".join(char for char in net.model.rstrip("/").rsplit("/", 1)[-1] if char not in ",:")
        short_hash = a1111_model_hash(revision, digits=8)
        fields = {
            "Module": net.preprocessor or "none",
            "Model": f"{name} [{short_hash}]" if short_hash else name,
            "Weight": net.conditioning_scale,
        }
        if net.preprocessor == "canny":
            fields.update({"Threshold A": net.low_threshold, "Threshold B": net.high_threshold})
        fields.update(
            {"Guidance Start": self.config.control_guidance_start, "Guidance End": self.config.control_guidance_end}
        )
        return ", ".join(f"{key}: {value}" for key, value in fields.items())

    def record(self, item: Item) -> dict:
        record = super().record(item)
        record.update(
            controlnets="; ".join(net.describe() for net in self.config.controlnets),
            controlnet_revisions=self.controlnet_revisions,
            control_guidance_start=self.config.control_guidance_start,
            control_guidance_end=self.config.control_guidance_end,
        )
        return record
