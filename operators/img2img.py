"""Image-to-image generation with a diffusers pipeline held once per actor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, model_validator

from operators.base import Item, Operator
from operators.diffusion import (
    SCHEDULERS,
    DiffusionConfig,
    SizePolicy,
    a1111_lora_hashes,
    a1111_model_hash,
    a1111_parameters,
    generators,
    group_items,
    load_loras,
    lora_record,
    set_scheduler,
    variant_parameters,
    with_lora_tags,
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
    ("model_variant", pa.string()),
    # Whether the checkpoint's safety checker ran, and whether it flagged (and blacked out) this image.
    ("safety_checker", pa.bool_()),
    ("nsfw_content_detected", pa.bool_()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("strength", pa.float64()),
    ("num_inference_steps", pa.int32()),
    ("guidance_scale", pa.float64()),
    ("scheduler", pa.string()),
    ("loras", pa.string()),
    ("dtype", pa.string()),
    ("device", pa.string()),
    # Most rows per model call: batched kernels round differently per batch size.
    ("model_batch_size", pa.int32()),
]


def load_img2img_pipeline(
    path, dtype: str, device: str, controlnet=None, variant: str | None = None, safety_checker: bool | None = None
):
    """Load an image-to-image pipeline (with ControlNets, if given) from a local, vetted checkpoint.

    `variant` picks variant weight files; `safety_checker` None keeps the checkpoint's own (if any),
    False loads without it, True refuses a checkpoint that has none."""
    import diffusers
    import torch

    from operators.models import ships_safety_checker

    extra = {"controlnet": controlnet} if controlnet is not None else {}
    if safety_checker is False and ships_safety_checker(Path(path), safety_checker):
        extra.update(safety_checker=None, requires_safety_checker=False)
    elif safety_checker:
        ships_safety_checker(Path(path), safety_checker)  # refuses a checkpoint without one
    pipeline = diffusers.AutoPipelineForImage2Image.from_pretrained(
        str(path), dtype=getattr(torch, dtype), variant=variant, use_safetensors=True, local_files_only=True, **extra
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
        self.load_pipeline()

    def load_pipeline(self, controlnet=None) -> None:
        """Resolve and vet the checkpoint, load it (with `controlnet`, if given), its scheduler and LoRAs."""
        config = self.config
        self.model = resolve_model(
            config.model, config.revision, self.offline, self.model_storage_options, variant=config.variant
        )
        self.pipeline = load_img2img_pipeline(
            self.model.path,
            config.resolved_dtype(),
            self.device,
            controlnet=controlnet,
            variant=config.variant,
            safety_checker=config.safety_checker,
        )
        set_scheduler(self.pipeline, config.scheduler)
        self.loras = load_loras(self.pipeline, config.loras, self.offline, self.model_storage_options)
        self.scheduler_name = type(self.pipeline.scheduler).__name__
        self.safety_checker = getattr(self.pipeline, "safety_checker", None) is not None

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
            result = self.pipeline(**arguments)
        except Exception as error:  # one call's failure must not sink the job
            logger.warning("%s: model call failed for %d rows: %s", self.stage_label, len(group), error)
            for item in group:
                item.error = f"model call failed for a batch of {len(group)} rows: {type(error).__name__}: {error}"
            return
        flags = getattr(result, "nsfw_content_detected", None) if self.safety_checker else None
        for index, (item, output) in enumerate(zip(group, result.images, strict=True)):
            item.size = output.size
            item.output = encode_image(output, "png", self.parameters_text(item))
            item.record["nsfw_content_detected"] = bool(flags[index]) if flags is not None else None

    def parameters_text(self, item: Item) -> str:
        """The AUTOMATIC1111 `parameters` text of one output: LoRAs as `<lora:name:scale>` in the prompt
        and `Lora hashes`, as AUTOMATIC1111 writes them."""
        parameters = item.parameters
        prompt = with_lora_tags(parameters["prompt"], self.loras)
        return a1111_parameters(prompt, parameters["negative_prompt"], self.infotext_fields(item))

    def infotext_fields(self, item: Item) -> dict:
        """The `key: value` pairs of the `parameters` text, in AUTOMATIC1111's order."""
        parameters = item.parameters
        return {
            "Steps": parameters["num_inference_steps"],
            "Sampler": SCHEDULERS.get(self.scheduler_name, self.scheduler_name),
            "CFG scale": parameters["guidance_scale"],
            "Seed": item.seed,
            "Size": f"{item.size[0]}x{item.size[1]}",
            "Model hash": a1111_model_hash(self.model.revision),
            "Model": self.config.model,
            "Denoising strength": parameters["strength"],
            "Lora hashes": a1111_lora_hashes(self.loras),
        }

    def model_batch_size(self) -> int:
        """Most rows per model call."""
        return self.config.resolved_model_batch_size()

    def record(self, item: Item) -> dict:
        parameters = item.parameters
        config = self.config
        return {
            "model": config.model,
            "model_revision": self.model.revision,
            "model_variant": config.variant,
            "safety_checker": self.safety_checker,
            "nsfw_content_detected": item.record.get("nsfw_content_detected"),
            "prompt": parameters.get("prompt"),
            "negative_prompt": parameters.get("negative_prompt"),
            "strength": parameters.get("strength", getattr(config, "strength", None)),
            "num_inference_steps": parameters.get("num_inference_steps", config.num_inference_steps),
            "guidance_scale": parameters.get("guidance_scale", config.guidance_scale),
            "scheduler": self.scheduler_name,
            "loras": lora_record(self.loras),
            "dtype": config.resolved_dtype(),
            "device": self.device,
            "model_batch_size": self.model_batch_size(),
        }


CALL_PARAMETERS = ("strength", "num_inference_steps", "guidance_scale", "negative_prompt")
