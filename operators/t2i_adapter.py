"""T2I-Adapter generation: lightweight adapters steer an SD 1.x/2.x or SDXL checkpoint with condition
images (edges, depth, sketches) computed per row by a preprocessor or read from a column, as the
ControlNet operator's are (diffusers `StableDiffusionAdapterPipeline` and
`StableDiffusionXLAdapterPipeline`, picked from the checkpoint).

diffusers' adapter pipelines are text-to-image only: the row's image gives the condition images and
the output size (after the size policy), but is neither noised nor kept. Each output is generated
from the prompt and the conditions alone."""

from __future__ import annotations

import inspect
import logging
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, model_validator

from operators.base import Item
from operators.controlnet import (
    ControlledConfig,
    ControlSource,
    a1111_control_unit,
    annotate,
    check_saved_columns,
    control_inputs,
    load_annotators,
    load_controlnets,
    saved_controls,
)
from operators.diffusion import GENERATION_FIELDS, DiffusersOperator, DiffusionConfig, SizePolicy, variant_parameters
from operators.models import ModelError, read_json

logger = logging.getLogger(__name__)

# The latent channels of the UNets the adapter pipelines drive (an inpainting UNet takes 9).
TEXT_TO_IMAGE_UNET_CHANNELS = 4


class AdapterSource(ControlSource):
    """One T2I-Adapter, its conditioning scale and where its condition image comes from."""

    model: str = Field(
        description="T2I-Adapter checkpoint, a diffusers `T2IAdapter` directory (config.json and "
        "diffusion_pytorch_model.safetensors, as TencentARC/t2iadapter_canny_sd15v2 ships): a local "
        "directory, an s3:// prefix, or a Hub id."
    )
    conditioning_scale: float = Field(
        1.0, ge=0, description="Weight of this adapter's features (diffusers' `adapter_conditioning_scale`)."
    )


class T2IAdapterText2ImageConfig(ControlledConfig, DiffusionConfig):
    """Config of the `t2i_adapter` operator: text-to-image steered by T2I-Adapters."""

    control_field: ClassVar[str] = "adapters"
    kind: Literal["t2i_adapter"] = Field(description="Operator kind.")
    adapters: list[AdapterSource] = Field(min_length=1, description="T2I-Adapters applied together.")
    adapter_conditioning_factor: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Fraction of the denoising steps, from the first, in which the adapters steer. SDXL "
        "checkpoints only: diffusers' SD 1.x/2.x adapter pipeline applies them at every step.",
    )
    size: SizePolicy = Field(
        default_factory=lambda: SizePolicy(multiple_of=64),
        description="Output size policy. Sides must be multiples of the adapters' total downscale factor "
        "(64 for SD 1.x/2.x adapters, 32 for SDXL ones), hence the default multiple_of 64.",
    )

    @model_validator(mode="after")
    def _distinct_saved_columns(self) -> T2IAdapterText2ImageConfig:
        check_saved_columns(self.adapters, self.stage_name)
        return self


class T2IAdapterText2Image(DiffusersOperator):
    """Ray Data actor for `t2i_adapter`: loads the adapters and the checkpoint's adapter pipeline once,
    then generates each row's variants from the prompt and the row's condition images."""

    config_class = T2IAdapterText2ImageConfig
    stage_fields = [
        *(field for field in GENERATION_FIELDS if field[0] != "strength"),  # nothing is noised
        ("adapters", pa.string()),
        ("adapter_revisions", pa.string()),
        ("adapter_conditioning_factor", pa.float64()),
        # The depth, segmentation and pose annotators that made condition images: 'N=model@revision' per adapter.
        ("annotators", pa.string()),
    ]
    call_parameters = ("num_inference_steps", "guidance_scale")

    @property
    def pipeline_class(self) -> str:  # type: ignore[override]
        """The adapter pipeline of the checkpoint's family (its model_index.json `_class_name`)."""
        index = read_json(self.model.path / "model_index.json")
        family = str(index.get("_class_name")) if isinstance(index, dict) else ""
        if family.startswith("StableDiffusionXL"):
            return "StableDiffusionXLAdapterPipeline"
        if family.startswith("StableDiffusion") and not family.startswith("StableDiffusion3"):
            return "StableDiffusionAdapterPipeline"
        raise ModelError(
            f"model {self.config.model}: t2i_adapter runs SD 1.x/2.x and SDXL checkpoints (diffusers' adapter "
            f"pipelines), got a {family}"
        )

    def components(self) -> dict:
        import diffusers

        config = self.config
        self.annotators = load_annotators(self, config.adapters)
        adapters, revisions = load_controlnets(
            config.adapters, config.resolved_dtype(), self.offline, self.model_storage_options, "T2IAdapter"
        )
        self.adapter_revisions = ",".join(revisions)
        self.adapter_channels = [adapter.config.in_channels for adapter in adapters]
        for source, adapter, channels in zip(config.adapters, adapters, self.adapter_channels, strict=True):
            if channels not in (1, 3):
                raise ModelError(f"adapter {source.model} takes {channels} input channels; accepted: 1 or 3")
            factor = adapter.total_downscale_factor
            if factor != adapters[0].total_downscale_factor:
                raise ModelError(
                    f"adapters {config.adapters[0].model} and {source.model} downscale by "
                    f"{adapters[0].total_downscale_factor} and {factor}; adapters applied together must match"
                )
            if config.size.multiple_of % factor:
                raise ModelError(
                    f"size.multiple_of is {config.size.multiple_of}, but adapter {source.model} needs image sides "
                    f"that are multiples of {factor}; set size.multiple_of to {factor}"
                )
        return {"adapter": adapters[0] if len(adapters) == 1 else diffusers.MultiAdapter(adapters)}

    def setup(self) -> None:
        super().setup()
        config = self.config
        channels = self.pipeline.unet.config.in_channels
        if channels != TEXT_TO_IMAGE_UNET_CHANNELS:
            raise ModelError(
                f"model {config.model}: t2i_adapter needs a text-to-image checkpoint (a UNet with "
                f"{TEXT_TO_IMAGE_UNET_CHANNELS} input channels), got one with {channels}"
            )
        self.takes_factor = "adapter_conditioning_factor" in inspect.signature(self.pipeline).parameters
        if not self.takes_factor and config.adapter_conditioning_factor != 1:
            raise ModelError(
                f"adapter_conditioning_factor is {config.adapter_conditioning_factor:g}, but {config.model} loads as "
                f"{self.pipeline_name}, which applies adapters at every step; set it to 1 or use an SDXL checkpoint"
            )

    def variants(self, row: dict) -> list[dict]:
        return variant_parameters(self.config, row)

    def prepare(self, data, row: dict) -> dict[str, np.ndarray]:
        return control_inputs(self, data, row, self.config.adapters, self.config.size)

    def process(self, items: list[Item]) -> None:
        """Annotate (depth, segmentation, pose) on this actor, then generate the rows annotation did not fail."""
        annotate(items, self.annotators)
        super().process([item for item in items if item.error is None])

    def output_columns(self, items: list[Item]) -> dict[str, pa.Array]:
        return saved_controls(items, self.config.adapters)

    def condition(self, item: Item, index: int) -> Image.Image:
        """A row's condition image for adapter `index`: grayscale for one-channel adapters (canny, sketch)."""
        image = Image.fromarray(item.input[f"control_{index}"])
        return image.convert("L" if self.adapter_channels[index] == 1 else "RGB")

    def call_inputs(self, members: list[Item]) -> dict:
        """The condition images (one list per adapter when several), scales and output size of one call."""
        adapters = self.config.adapters
        conditions = [[self.condition(item, index) for item in members] for index in range(len(adapters))]
        height, width = self.input_image(members[0]).shape[:2]
        inputs = {
            "image": conditions[0] if len(adapters) == 1 else conditions,
            "adapter_conditioning_scale": (
                adapters[0].conditioning_scale if len(adapters) == 1 else [a.conditioning_scale for a in adapters]
            ),
            "height": height,
            "width": width,
        }
        if self.takes_factor:
            inputs["adapter_conditioning_factor"] = self.config.adapter_conditioning_factor
        return inputs

    def infotext_fields(self, item: Item) -> dict:
        """The diffusers pairs plus one `ControlNet N` unit per adapter: sd-webui-controlnet runs
        T2I-Adapters as ControlNet units, the adapter steering from the first step for the factor."""
        revisions = self.adapter_revisions.split(",")
        factor = self.config.adapter_conditioning_factor
        modules = [annotator.module if annotator is not None else None for annotator in self.annotators]
        return {
            **super().infotext_fields(item),
            **{
                f"ControlNet {index}": a1111_control_unit(adapter, revision, 0.0, factor, module)
                for index, (adapter, revision, module) in enumerate(
                    zip(self.config.adapters, revisions, modules, strict=True)
                )
            },
        }

    def record(self, item: Item) -> dict:
        record = super().record(item)
        record.update(
            adapters="; ".join(adapter.describe() for adapter in self.config.adapters),
            adapter_revisions=self.adapter_revisions,
            adapter_conditioning_factor=self.config.adapter_conditioning_factor,
            annotators="; ".join(
                f"{index}={annotator.label}" for index, annotator in enumerate(self.annotators) if annotator
            )
            or None,
        )
        return record
