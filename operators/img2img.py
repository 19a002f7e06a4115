"""Image-to-image generation with a diffusers pipeline held once per actor."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from operators.base import Operator
from operators.diffusion import GENERATION_FIELDS, DiffusersOperator, DiffusionConfig, SizePolicy, variant_parameters
from operators.images import eight_bit_rgb, fit_size

logger = logging.getLogger(__name__)


class Img2ImgConfig(DiffusionConfig):
    """Config of the `img2img` operator (diffusers `AutoPipelineForImage2Image`)."""

    kind: Literal["img2img"] = Field(description="Operator kind.")
    strength: float = Field(0.6, ge=0, le=1, description="How far the image is noised before denoising.")
    size: SizePolicy = Field(default_factory=SizePolicy, description="Output size policy.")

    def call_defaults(self) -> dict:
        return {**super().call_defaults(), "strength": self.strength}

    def model_references(self) -> list:
        """The checkpoint, vetted also for the size multiple (SD3 and Flux need 16), and LoRAs."""
        model, *others = super().model_references()
        return [dataclasses.replace(model, multiple_of=self.size.multiple_of), *others]

    @model_validator(mode="after")
    def _denoises_at_least_one_step(self) -> Img2ImgConfig:
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(
                f"num_inference_steps x strength must give at least one denoising step, got "
                f"{self.num_inference_steps} x {self.strength} = {self.num_inference_steps * self.strength:g}"
            )
        return self


def decode_rgb(operator: Operator, data, size: SizePolicy):
    """Decode (or take the stage before's pixels), convert to RGB and apply the size policy (aspect
    kept, sides a multiple of N)."""
    image = eight_bit_rgb(data, operator.max_image_pixels)
    width, height = fit_size(*image.size, size.max_side, size.multiple_of)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=3)  # bicubic
    return image


class Img2Img(DiffusersOperator):
    """`img2img`: loads the pipeline once per actor, then generates each row's variants."""

    config_class = Img2ImgConfig
    stage_fields = GENERATION_FIELDS

    def variants(self, row: dict) -> list[dict]:
        return variant_parameters(self.config, row)

    def prepare(self, image, row: dict) -> np.ndarray:
        return np.asarray(decode_rgb(self, image, self.config.size))

    def call_inputs(self, members: list) -> dict:
        inputs = super().call_inputs(members)
        # SD3's and Flux's pipelines make 1024x1024 images unless given a size; SD's take the input's.
        if "height" in inspect.signature(self.pipeline).parameters:
            height, width = self.input_image(members[0]).shape[:2]
            inputs.update(height=height, width=width)
        return inputs
