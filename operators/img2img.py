"""Image-to-image generation with a diffusers pipeline held once per actor."""

from __future__ import annotations

import logging
from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from operators.base import Item, Operator
from operators.diffusion import (
    SCHEDULERS,
    DiffusionConfig,
    SizePolicy,
    a1111_parameters,
    generators,
    group_items,
    load_loras,
    set_scheduler,
    variant_parameters,
)
from operators.images import decode_eight_bit_rgb, encode_image, fit_size
from operators.models import resolve_model

logger = logging.getLogger(__name__)


class Img2ImgConfig(DiffusionConfig):
    """Config of the `img2img` operator (diffusers `AutoPipelineForImage2Image`)."""

    kind: Literal["img2img"] = Field(description="Operator kind.")
    strength: float = Field(0.6, ge=0, le=1, description="How far the image is noised before denoising.")
    size: SizePolicy = Field(default_factory=SizePolicy, description="Output size policy.")

    @model_validator(mode="after")
    def _denoises_at_least_one_step(self) -> Img2ImgConfig:
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(
                f"num_inference_steps x strength must give at least one denoising step, got "
                f"{self.num_inference_steps} x {self.strength} = {self.num_inference_steps * self.strength:g}"
            )
        return self


# Per-row fields of an image-to-image stage column (img2img and controlnet_img2img).
GENERATION_FIELDS = [
    ("model", pa.string()),
    ("model_revision", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("strength", pa.float64()),
    ("num_inference_steps", pa.int32()),
    ("guidance_scale", pa.float64()),
    ("scheduler", pa.string()),
    ("loras", pa.string()),
    ("dtype", pa.string()),
    ("device", pa.string()),
]


def load_img2img_pipeline(path, dtype: str, device: str, controlnet=None):
    """Load an image-to-image pipeline (with ControlNets, if given) from a local, vetted checkpoint."""
    import diffusers
    import torch

    extra = {"controlnet": controlnet} if controlnet is not None else {}
    pipeline = diffusers.AutoPipelineForImage2Image.from_pretrained(
        str(path), dtype=getattr(torch, dtype), use_safetensors=True, local_files_only=True, **extra
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def decode_rgb(operator: Operator, data: bytes | None, size: SizePolicy):
    """Decode, convert to RGB and apply the size policy (aspect kept, sides a multiple of N)."""
    image = decode_eight_bit_rgb(data, operator.max_image_pixels)
    width, height = fit_size(*image.size, size.max_side, size.multiple_of)
    if (width, height) != image.size:
        image = image.resize((width, height), resample=3)  # bicubic
    return image


class Img2Img(Operator):
    """Ray Data actor for `img2img`: loads the pipeline once, then generates each row's variants."""

    stage_fields = GENERATION_FIELDS

    def setup(self) -> None:
        self.start_torch()
        config = self.config
        self.model = resolve_model(config.model, config.revision, self.offline, self.model_storage_options)
        self.pipeline = load_img2img_pipeline(self.model.path, config.resolved_dtype(), self.device)
        set_scheduler(self.pipeline, config.scheduler)
        self.loras = load_loras(self.pipeline, config.loras, self.offline, self.model_storage_options)
        self.scheduler_name = type(self.pipeline.scheduler).__name__

    def variants(self, row: dict) -> list[dict]:
        return variant_parameters(self.config, row)

    def prepare(self, data: bytes | None, row: dict):
        return decode_rgb(self, data, self.config.size)

    def process(self, items: list[Item]) -> None:
        calls = group_items(
            items,
            key=lambda item: (item.input.size, *(item.parameters[k] for k in CALL_PARAMETERS)),
            size=self.config.resolved_model_batch_size(),
        )
        for group in calls:
            self.generate(group, {"image": [item.input for item in group]})

    def generate(self, group: list[Item], inputs: dict) -> None:
        """One pipeline call for rows that share a size and call parameters; a failure becomes error rows."""
        parameters = group[0].parameters
        arguments = {
            "prompt": [item.parameters["prompt"] for item in group],
            "strength": parameters["strength"],
            "num_inference_steps": parameters["num_inference_steps"],
            "guidance_scale": parameters["guidance_scale"],
            "generator": generators([item.seed for item in group], self.device),
            "output_type": "pil",
            **inputs,
        }
        # Only when set: some pipelines (Flux) take no negative prompt at all.
        if parameters["negative_prompt"]:
            arguments["negative_prompt"] = [parameters["negative_prompt"]] * len(group)
        try:
            outputs = self.pipeline(**arguments).images
        except Exception as error:  # one call's failure must not sink the job
            logger.warning("%s: model call failed for %d rows: %s", self.stage_label, len(group), error)
            for item in group:
                item.error = f"model call failed for a batch of {len(group)} rows: {type(error).__name__}: {error}"
            return
        for item, output in zip(group, outputs, strict=True):
            item.size = output.size
            item.output = encode_image(output, "png", self.parameters_text(item))

    def parameters_text(self, item: Item) -> str:
        """The AUTOMATIC1111 `parameters` text of one output."""
        parameters = item.parameters
        return a1111_parameters(
            parameters["prompt"],
            parameters["negative_prompt"],
            parameters["num_inference_steps"],
            SCHEDULERS.get(self.scheduler_name, self.scheduler_name),
            parameters["guidance_scale"],
            item.seed,
            item.size[0],
            item.size[1],
            self.config.model,
            parameters["strength"],
            {"Lora": self.loras} if self.loras else None,
        )

    def record(self, item: Item) -> dict:
        parameters = item.parameters
        config = self.config
        return {
            "model": config.model,
            "model_revision": self.model.revision,
            "prompt": parameters.get("prompt"),
            "negative_prompt": parameters.get("negative_prompt"),
            "strength": parameters.get("strength", getattr(config, "strength", None)),
            "num_inference_steps": parameters.get("num_inference_steps", config.num_inference_steps),
            "guidance_scale": parameters.get("guidance_scale", config.guidance_scale),
            "scheduler": self.scheduler_name,
            "loras": self.loras,
            "dtype": config.resolved_dtype(),
            "device": self.device,
        }


CALL_PARAMETERS = ("strength", "num_inference_steps", "guidance_scale", "negative_prompt")
