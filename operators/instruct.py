"""Instruction editing: the prompt says what to change ("make it snow") and an InstructPix2Pix
checkpoint edits the row's image (diffusers `StableDiffusionInstructPix2PixPipeline`). The image is
not noised and partly denoised as in img2img: it conditions every denoising step, weighted by
`image_guidance_scale` against the instruction's `guidance_scale`."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from operators.base import Item
from operators.diffusion import GENERATION_FIELDS, DiffusersOperator, DiffusionConfig, SizePolicy, variant_parameters
from operators.img2img import decode_rgb
from operators.models import ModelError

logger = logging.getLogger(__name__)

# The UNet of an InstructPix2Pix checkpoint sees the noisy latents and the image's latents, 4 + 4.
INSTRUCT_UNET_CHANNELS = 8


class InstructEditConfig(DiffusionConfig):
    """Config of the `instruct_edit` operator (diffusers `StableDiffusionInstructPix2PixPipeline`):
    `prompt` (or `prompt_column`, `sweep.prompt`) is the edit instruction."""

    kind: Literal["instruct_edit"] = Field(description="Operator kind.")
    image_guidance_scale: float = Field(
        1.5,
        description="How closely the output follows the input image (diffusers' `image_guidance_scale`, "
        "AUTOMATIC1111's 'Image CFG scale'); >= 1, guidance is on when guidance_scale > 1.",
    )
    size: SizePolicy = Field(default_factory=SizePolicy, description="Output size policy.")

    @field_validator("image_guidance_scale")
    @classmethod
    def _guides(cls, value: float) -> float:
        # diffusers' InstructPix2Pix guides only when image_guidance_scale >= 1 (and guidance_scale > 1):
        # below 1 it would silently drop the instruction's guidance too.
        if value < 1:
            raise ValueError(
                "must be >= 1 (below 1 diffusers' InstructPix2Pix switches all guidance off; for no guidance "
                "set guidance_scale to 1)"
            )
        return value

    def call_defaults(self) -> dict:
        return {**super().call_defaults(), "image_guidance_scale": self.image_guidance_scale}


def instruct_fields() -> list[tuple[str, pa.DataType]]:
    """Img2img's stage fields without `strength` (the image is not noised), with `image_guidance_scale`
    after `guidance_scale`."""
    fields = []
    for name, kind in GENERATION_FIELDS:
        if name != "strength":
            fields.append((name, kind))
        if name == "guidance_scale":
            fields.append(("image_guidance_scale", pa.float64()))
    return fields


class InstructEdit(DiffusersOperator):
    """`instruct_edit`: loads an InstructPix2Pix pipeline once per actor, then edits each row's
    variants by its instruction."""

    config_class = InstructEditConfig
    pipeline_class = "StableDiffusionInstructPix2PixPipeline"
    stage_fields = instruct_fields()
    call_parameters = ("num_inference_steps", "guidance_scale", "image_guidance_scale")

    def setup(self) -> None:
        super().setup()
        channels = self.pipeline.unet.config.in_channels
        if channels != INSTRUCT_UNET_CHANNELS:
            raise ModelError(
                f"model {self.config.model}: instruct_edit needs an InstructPix2Pix checkpoint (a UNet with "
                f"{INSTRUCT_UNET_CHANNELS} input channels, as timbrooks/instruct-pix2pix), got one with {channels}"
            )

    def variants(self, row: dict) -> list[dict]:
        return variant_parameters(self.config, row)

    def prepare(self, image, row: dict) -> np.ndarray:
        return np.asarray(decode_rgb(self, image, self.config.size))

    def infotext_fields(self, item: Item) -> dict:
        """The diffusers pairs with `Image CFG scale` after `CFG scale`, as AUTOMATIC1111 writes it for
        an instruct-pix2pix model."""
        fields = {}
        for key, value in super().infotext_fields(item).items():
            fields[key] = value
            if key == "CFG scale":
                fields["Image CFG scale"] = item.parameters["image_guidance_scale"]
        return fields
