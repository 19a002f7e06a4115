"""Image-to-image generation with a diffusers pipeline held once per actor."""

from __future__ import annotations

import logging
import os
import time
from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.base import OperatorConfig, RowError, check_columns, derive_seed, replace_columns
from operators.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image, encode_image, fit_size, to_rgb
from operators.models import resolve_model

logger = logging.getLogger(__name__)

# Scheduler class names as diffusers exports them, with the sampler name AUTOMATIC1111 shows.
SCHEDULERS = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "DEISMultistepScheduler": "DEIS",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "EulerDiscreteScheduler": "Euler",
    "FlowMatchEulerDiscreteScheduler": "Euler",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "KDPM2DiscreteScheduler": "DPM2",
    "LCMScheduler": "LCM",
    "LMSDiscreteScheduler": "LMS",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
}


class SizePolicy(BaseModel):
    """How an input's dimensions become the generated image's dimensions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_side: int | None = Field(
        None, ge=8, description="Scale down (aspect kept) so the longest side is at most this."
    )
    multiple_of: int = Field(8, ge=1, description="Round each side to a multiple of this (the VAE's factor).")


class Img2ImgConfig(OperatorConfig):
    """Config of the `img2img` operator (diffusers `AutoPipelineForImage2Image`)."""

    kind: Literal["img2img"] = Field(description="Operator kind.")
    model: str = Field(
        description="Checkpoint: a local diffusers directory, an s3:// prefix, or a Hub id (owner/name)."
    )
    revision: str | None = Field(None, description="Hub commit or tag (required for Hub ids); recorded per row.")
    prompt: str | None = Field(None, description="Prompt used for every row.")
    prompt_column: str | None = Field(None, description="Column holding each row's prompt.")
    negative_prompt: str | None = Field(None, description="Negative prompt used for every row.")
    strength: float = Field(0.6, ge=0, le=1, description="How far the image is noised before denoising.")
    num_inference_steps: int = Field(30, ge=1, le=1000, description="Denoising steps at strength 1.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale.")
    scheduler: Literal[tuple(SCHEDULERS)] | None = Field(  # type: ignore[valid-type]
        None, description="Scheduler class name; default is the checkpoint's own."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Torch dtype of the weights; 'auto' is float16 on cuda, float32 on cpu."
    )
    size: SizePolicy = Field(default_factory=SizePolicy, description="Output size policy.")
    variants: int = Field(1, ge=1, description="Outputs per input row, each its own row and seed.")
    model_batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows per model call. Default: 1 on cpu, which makes every output's bytes independent of "
        "how rows were batched (batched kernels round differently per batch size); on cuda, every same-size "
        "row of a batch in one call, which keeps the GPU busy.",
    )

    @model_validator(mode="after")
    def _one_prompt_source(self) -> Img2ImgConfig:
        if (self.prompt is None) == (self.prompt_column is None):
            raise ValueError("give exactly one of prompt or prompt_column")
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(
                f"num_inference_steps x strength must give at least one denoising step, got "
                f"{self.num_inference_steps} x {self.strength} = {self.num_inference_steps * self.strength:g}"
            )
        return self

    def resolved_model_batch_size(self) -> int:
        """Rows per model call (see `model_batch_size`)."""
        if self.model_batch_size is not None:
            return self.model_batch_size
        return 1 if self.resolved_device() == "cpu" else self.batch_size * self.variants

    def resolved_dtype(self) -> str:
        """The torch dtype name the weights are loaded in."""
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.resolved_device() == "cuda" else "float32"


STAGE_TYPE = pa.struct(
    [
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("strength", pa.float64()),
        ("num_inference_steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("scheduler", pa.string()),
        ("dtype", pa.string()),
        ("device", pa.string()),
        ("decode_seconds", pa.float64()),
        ("model_seconds", pa.float64()),
        ("encode_seconds", pa.float64()),
    ]
)


def load_img2img_pipeline(path, dtype: str, device: str, scheduler: str | None):
    """Load an image-to-image pipeline from a local, vetted checkpoint directory."""
    import diffusers
    import torch

    pipeline = diffusers.AutoPipelineForImage2Image.from_pretrained(
        str(path), dtype=getattr(torch, dtype), use_safetensors=True, local_files_only=True
    )
    if scheduler is not None:
        pipeline.scheduler = getattr(diffusers, scheduler).from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def a1111_parameters(
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    strength: float,
) -> str:
    """Generation parameters in the text format AUTOMATIC1111's PNG Info reads."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(
        f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg_scale}, Seed: {seed}, "
        f"Size: {width}x{height}, Model: {model}, Denoising strength: {strength}"
    )
    return "\n".join(lines)


class Img2Img:
    """Ray Data actor: loads the pipeline once, then turns each batch of rows into output rows.

    Takes and returns `pyarrow.Table` batches. Needs `id` and `image` (encoded bytes); honours an
    incoming `status` (error rows pass through) and `variant_index`. Adds `variant_index`, `seed`,
    `status`, `error`, `image` (PNG bytes), `width`, `height` and a struct column named after the
    stage; every other column passes through untouched.
    """

    required_columns = ("id", "image")

    def __init__(
        self,
        config: Img2ImgConfig,
        seed: int = 0,
        offline: bool = True,
        model_storage_options: dict | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if offline:
            # Before diffusers and huggingface_hub are imported in this actor process.
            os.environ["HF_HUB_OFFLINE"] = "1"
        import torch

        self.config = config
        self.seed = seed
        self.max_image_pixels = max_image_pixels
        self.device = config.resolved_device()
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(config.num_cpus)))
        self.model = resolve_model(config.model, config.revision, offline, model_storage_options)
        self.pipeline = load_img2img_pipeline(self.model.path, config.resolved_dtype(), self.device, config.scheduler)
        scheduler_name = type(self.pipeline.scheduler).__name__
        self.scheduler_name = scheduler_name
        self.sampler_name = SCHEDULERS.get(scheduler_name, scheduler_name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        check_columns(f"img2img stage {self.config.stage_name!r}", batch, self.required_columns)
        config = self.config
        ids = batch.column("id").to_pylist()
        images = batch.column("image").to_pylist()
        statuses = batch.column("status").to_pylist() if "status" in batch.column_names else None
        errors = batch.column("error").to_pylist() if "error" in batch.column_names else None
        prompts = (
            batch.column(config.prompt_column).to_pylist()
            if config.prompt_column is not None and config.prompt_column in batch.column_names
            else None
        )
        previous_variants = batch.column("variant_index").to_pylist() if "variant_index" in batch.column_names else None

        rows = []  # one dict per output row
        for index, row_id in enumerate(ids):
            started = time.perf_counter()
            error = None
            prompt = config.prompt
            image = None
            if statuses is not None and statuses[index] == "error":
                error = errors[index] if errors is not None else "failed in an earlier stage"
            else:
                try:
                    if config.prompt_column is not None:
                        prompt = _row_prompt(prompts, index, config.prompt_column)
                    image = to_rgb(decode_image(images[index], self.max_image_pixels))
                    width, height = fit_size(*image.size, config.size.max_side, config.size.multiple_of)
                    if (width, height) != image.size:
                        image = image.resize((width, height), resample=3)  # bicubic
                except RowError as problem:
                    error = str(problem)
            decode_seconds = time.perf_counter() - started
            base_variant = previous_variants[index] * config.variants if previous_variants else 0
            for variant in range(config.variants):
                variant_index = base_variant + variant
                rows.append(
                    {
                        "source_index": index,
                        "variant_index": variant_index,
                        "seed": derive_seed(self.seed, row_id, variant_index),
                        "prompt": prompt,
                        "input": image,
                        "error": error,
                        "decode_seconds": decode_seconds,
                    }
                )

        by_size: dict[tuple[int, int], list[dict]] = {}
        for row in rows:
            if row["error"] is None:
                by_size.setdefault(row["input"].size, []).append(row)
        step = config.resolved_model_batch_size()
        for group in by_size.values():
            for start in range(0, len(group), step):
                self._generate(group[start : start + step])
        return self._output_table(batch, rows)

    def _generate(self, group: list[dict]) -> None:
        """Run the model once for rows of the same size; a failure becomes error rows."""
        import torch

        config = self.config
        started = time.perf_counter()
        arguments = {
            "prompt": [row["prompt"] for row in group],
            "image": [row["input"] for row in group],
            "strength": config.strength,
            "num_inference_steps": config.num_inference_steps,
            "guidance_scale": config.guidance_scale,
            "generator": [torch.Generator(device=self.device).manual_seed(row["seed"]) for row in group],
            "output_type": "pil",
        }
        # Only when set: some pipelines (Flux) take no negative prompt at all.
        if config.negative_prompt:
            arguments["negative_prompt"] = [config.negative_prompt] * len(group)
        try:
            outputs = self.pipeline(**arguments).images
        except Exception as error:  # one batch's model failure must not sink the job
            logger.warning("img2img model call failed for %d rows: %s", len(group), error)
            for row in group:
                row["error"] = f"model call failed for a batch of {len(group)} rows: {type(error).__name__}: {error}"
            return
        model_seconds = (time.perf_counter() - started) / len(group)
        for row, output in zip(group, outputs, strict=True):
            started = time.perf_counter()
            width, height = output.size
            row["output"] = encode_image(
                output,
                "png",
                a1111_parameters(
                    row["prompt"],
                    config.negative_prompt,
                    config.num_inference_steps,
                    self.sampler_name,
                    config.guidance_scale,
                    row["seed"],
                    width,
                    height,
                    config.model,
                    config.strength,
                ),
            )
            row["size"] = (width, height)
            row["model_seconds"] = model_seconds
            row["encode_seconds"] = time.perf_counter() - started

    def _output_table(self, batch: pa.Table, rows: list[dict]) -> pa.Table:
        config = self.config
        stage = [
            {
                "model": config.model,
                "model_revision": self.model.revision,
                "prompt": row["prompt"],
                "negative_prompt": config.negative_prompt,
                "strength": config.strength,
                "num_inference_steps": config.num_inference_steps,
                "guidance_scale": config.guidance_scale,
                "scheduler": self.scheduler_name,
                "dtype": config.resolved_dtype(),
                "device": self.device,
                "decode_seconds": row["decode_seconds"],
                "model_seconds": row.get("model_seconds"),
                "encode_seconds": row.get("encode_seconds"),
            }
            for row in rows
        ]
        ok = [row["error"] is None for row in rows]
        columns = {
            "variant_index": pa.array([row["variant_index"] for row in rows], pa.int32()),
            "seed": pa.array([row["seed"] for row in rows], pa.int64()),
            "status": pa.array(["ok" if good else "error" for good in ok], pa.string()),
            "error": pa.array([row["error"] for row in rows], pa.string()),
            "image": pa.array([row.get("output") for row in rows], pa.binary()),
            "width": pa.array([row.get("size", (None, None))[0] for row in rows], pa.int32()),
            "height": pa.array([row.get("size", (None, None))[1] for row in rows], pa.int32()),
            config.stage_name: pa.array(stage, STAGE_TYPE),
        }
        return replace_columns(batch.take([row["source_index"] for row in rows]), columns)


def _row_prompt(prompts: list | None, index: int, column: str) -> str:
    if prompts is None:
        raise RowError(f"prompt column {column!r} is not in the input")
    prompt = prompts[index]
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise RowError(f"prompt column {column!r} is empty for this row")
    return str(prompt)
