"""Inpainting: repaint the masked part of each image (`AutoPipelineForInpainting`, which picks the SD
1.x/2.x or SDXL inpainting pipeline from the checkpoint; an inpainting checkpoint's 9-channel UNet and
a plain checkpoint both work). The mask (white = repaint) comes from a column or from a rule applied
per row; it is dilated and blurred as AUTOMATIC1111's `Mask blur` does, and the untouched pixels are
pasted back so that everything outside the mask is the source's own bytes."""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.annotators import ADE20K_CLASSES, AnnotatorConfig
from operators.base import Item
from operators.diffusion import GENERATION_FIELDS
from operators.images import decode_image, decoded_eight_bit_rgb, eight_bit_rgb, fit_size, to_rgb
from operators.img2img import Img2Img, Img2ImgConfig
from operators.rows import RowError, cell_bytes

logger = logging.getLogger(__name__)


class Rectangle(BaseModel):
    """A rectangle to repaint, in pixels or in fractions of the image's sides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    left: float = Field(ge=0, description="Left edge.")
    top: float = Field(ge=0, description="Top edge.")
    width: float = Field(gt=0, description="Width.")
    height: float = Field(gt=0, description="Height.")
    units: Literal["pixels", "fraction"] = Field("pixels", description="'fraction': of the image's width/height.")

    @model_validator(mode="after")
    def _inside_the_image(self) -> Rectangle:
        if self.units == "fraction" and (self.left + self.width > 1 or self.top + self.height > 1):
            raise ValueError(
                f"a fraction rectangle must lie inside the image: left + width = {self.left + self.width:g}, "
                f"top + height = {self.top + self.height:g}; each at most 1"
            )
        return self

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels, clipped to a `width` x `height` image."""
        scale = (width, height) if self.units == "fraction" else (1, 1)
        left, top = round(self.left * scale[0]), round(self.top * scale[1])
        right, bottom = round((self.left + self.width) * scale[0]), round((self.top + self.height) * scale[1])
        return min(left, width), min(top, height), min(right, width), min(bottom, height)


class ColorKey(BaseModel):
    """Repaint the pixels of one colour (within a tolerance per channel)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    color: tuple[int, int, int] = Field(description="RGB colour, each 0-255.")
    tolerance: int = Field(0, ge=0, le=255, description="Largest difference per channel still counted.", strict=True)

    @model_validator(mode="after")
    def _eight_bit(self) -> ColorKey:
        if any(not 0 <= value <= 255 for value in self.color):
            raise ValueError(f"color must be three values in 0-255, got {list(self.color)}")
        return self


class SegmentationMask(BaseModel):
    """Repaint the pixels a segmentation model (`operators.annotators`) assigns to the named classes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    annotator: AnnotatorConfig = Field(description="An ADE20K segmentation model (SegFormer, UperNet).")
    classes: list[str] = Field(min_length=1, description="ADE20K class names to repaint, e.g. ['sky', 'person'].")

    @model_validator(mode="after")
    def _known_classes(self) -> SegmentationMask:
        unknown = [name for name in self.classes if name not in ADE20K_CLASSES]
        if unknown:
            raise ValueError(
                f"segmentation.classes {unknown} are no ADE20K classes; accepted: the 150 ADE20K names, such as "
                f"{', '.join(ADE20K_CLASSES[:8])}, ... (operators.annotators.ADE20K_CLASSES)"
            )
        return self

    def class_ids(self) -> list[int]:
        """The classes' ADE20K ids."""
        return [ADE20K_CLASSES.index(name) for name in self.classes]


class MaskConfig(BaseModel):
    """Where each row's mask comes from (exactly one of `column`, `rectangle`, `color_key`, `alpha`)
    and how it is shaped. White (or the selected pixels) is repainted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    column: str | None = Field(None, description="Column of encoded mask images (or {bytes, path}); white = repaint.")
    rectangle: Rectangle | None = Field(None, description="The same rectangle in every row.")
    color_key: ColorKey | None = Field(None, description="The pixels of one colour.")
    alpha: bool = Field(False, description="The transparent pixels of an RGBA (or LA, or P) input.")
    segmentation: SegmentationMask | None = Field(
        None, description="The pixels of these ADE20K classes, segmented on the model's actor."
    )
    alpha_threshold: int = Field(128, ge=1, le=255, description="Alpha below this counts as transparent.", strict=True)
    invert: bool = Field(False, description="Repaint what the mask leaves instead (A1111's 'Inpaint not masked').")
    dilation: int = Field(0, ge=0, le=256, description="Grow the mask by this many pixels first.", strict=True)
    blur: int = Field(4, ge=0, le=256, description="Gaussian blur radius in pixels (A1111's 'Mask blur').", strict=True)

    @model_validator(mode="after")
    def _one_source(self) -> MaskConfig:
        given = [name for name in ("column", "rectangle", "color_key") if getattr(self, name) is not None]
        given += ["alpha"] if self.alpha else []
        given += ["segmentation"] if self.segmentation is not None else []
        if len(given) != 1:
            raise ValueError(
                "give exactly one mask source of column, rectangle, color_key, alpha, segmentation; got "
                f"{given or 'none'}"
            )
        return self

    def describe(self) -> str:
        """The mask source, as recorded per row and in the parameters text."""
        if self.column is not None:
            source = f"column:{self.column}"
        elif self.rectangle is not None:
            box = self.rectangle
            source = f"rectangle:{box.left:g},{box.top:g},{box.width:g}x{box.height:g} {box.units}"
        elif self.color_key is not None:
            red, green, blue = self.color_key.color
            source = f"color:#{red:02x}{green:02x}{blue:02x}~{self.color_key.tolerance}"
        elif self.segmentation is not None:
            source = f"segmentation:{'+'.join(self.segmentation.classes)}({self.segmentation.annotator.model})"
        else:
            source = f"alpha<{self.alpha_threshold}"
        return f"{source}{' inverted' if self.invert else ''}"


class MaskedConfig(Img2ImgConfig):
    """What inpainting and outpainting share: the region's treatment and the paste-back."""

    strength: float = Field(1.0, ge=0, le=1, description="How far the masked region is noised (1: repainted anew).")
    padding_mask_crop: int | None = Field(
        None,
        ge=0,
        strict=True,
        description="Inpaint only the masked region, cropped with this padding and worked at full resolution "
        "(diffusers' `padding_mask_crop`, A1111's 'Only masked'); one row per model call.",
    )
    paste_back: bool = Field(
        True, description="Paste the source's pixels back outside the mask, so they are byte-identical to the source."
    )


class InpaintConfig(MaskedConfig):
    """Config of the `inpaint` operator."""

    kind: Literal["inpaint"] = Field(description="Operator kind.")  # type: ignore[assignment]
    mask: MaskConfig = Field(description="Where each row's mask comes from and how it is shaped.")

    def input_columns(self) -> set[str]:
        return super().input_columns() | ({self.mask.column} if self.mask.column else set())

    def model_references(self) -> list:
        segmentation = self.mask.segmentation
        extra = [segmentation.annotator.reference("mask.segmentation.annotator.model")] if segmentation else []
        return super().model_references() + extra


def rule_mask(config: MaskConfig, image: Image.Image) -> np.ndarray:
    """The uint8 mask (255 = repaint) a rule gives for one decoded image (in its own mode)."""
    width, height = image.size
    mask = np.zeros((height, width), np.uint8)
    if config.rectangle is not None:
        left, top, right, bottom = config.rectangle.box(width, height)
        mask[top:bottom, left:right] = 255
    elif config.color_key is not None:
        pixels = np.asarray(to_rgb(image) if image.mode != "RGB" else image).astype(np.int16)
        difference = np.abs(pixels - np.array(config.color_key.color, np.int16)).max(axis=2)
        mask[difference <= config.color_key.tolerance] = 255
    else:
        if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
            raise RowError(f"mask alpha: the image (mode {image.mode}) has no alpha channel")
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
        mask[alpha < config.alpha_threshold] = 255
    return mask


def column_mask(config: MaskConfig, value, size: tuple[int, int], max_pixels: int) -> tuple[np.ndarray, str | None]:
    """A mask from the row's mask column, at the image's `size`; a mask of another size with the same
    aspect is resized (and the note says so), one of another aspect is refused."""
    value = cell_bytes(value)
    if value is None:
        raise RowError(f"mask column {config.column!r} is null in this row")
    try:
        mask = decode_image(value, max_pixels).convert("L")
    except RowError as problem:
        raise RowError(f"mask in column {config.column!r}: {problem}") from None
    note = None
    if mask.size != size:
        (width, height), (mask_width, mask_height) = size, mask.size
        if abs(mask_width * height - mask_height * width) > max(width, height):  # more than rounding apart
            raise RowError(
                f"mask in column {config.column!r} is {mask_width}x{mask_height} and the image {width}x{height}: "
                "the aspect differs (give a mask of the image's size or aspect)"
            )
        mask = mask.resize(size, resample=Image.NEAREST)
        note = f"mask resized from {mask_width}x{mask_height}"
    return np.where(np.asarray(mask) > 127, 255, 0).astype(np.uint8), note


def shape_mask(mask: np.ndarray, config: MaskConfig) -> np.ndarray:
    """Invert, dilate, then blur a 0/255 mask as the config says."""
    import cv2

    if config.invert:
        mask = 255 - mask
    if config.dilation:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * config.dilation + 1,) * 2)
        mask = cv2.dilate(mask, kernel)
    if config.blur:
        mask = np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(config.blur)))
    return mask


def paste_back(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The generated pixels where the mask is white, the source's where it is black, and a blend of both
    (weighted by the mask, rounded) in between: where the mask is 0 the source's bytes are kept as they are."""
    if generated.shape != source.shape:
        generated = np.asarray(Image.fromarray(generated).resize(source.shape[1::-1], resample=Image.BICUBIC))
    weight = mask.astype(np.uint32)[..., None]
    blended = (generated.astype(np.uint32) * weight + source.astype(np.uint32) * (255 - weight) + 127) // 255
    return blended.astype(np.uint8)


class Inpaint(Img2Img):
    """`inpaint`: repaints each row's masked region; rows whose mask is empty pass through unchanged."""

    config_class = InpaintConfig
    pipeline_class = "AutoPipelineForInpainting"
    stage_fields = [
        *GENERATION_FIELDS,
        ("mask", pa.string()),
        ("mask_blur", pa.int32()),
        ("mask_dilation", pa.int32()),
        ("mask_pixels", pa.int64()),
        ("mask_note", pa.string()),
        ("padding_mask_crop", pa.int32()),
        ("paste_back", pa.bool_()),
    ]

    def masked_input(self, data, row: dict) -> tuple[np.ndarray, np.ndarray, str | None]:
        """(source RGB pixels, 0/255 mask, note) of one row, both at the source's size."""
        mask_config = self.config.mask
        if mask_config.alpha or mask_config.color_key is not None:
            if isinstance(data, np.ndarray):
                raise RowError("mask alpha and color_key need encoded input, not the pixels of a stage before")
            image = decode_image(data, self.max_image_pixels)
            return np.asarray(decoded_eight_bit_rgb(image, data)), rule_mask(mask_config, image), None
        source = eight_bit_rgb(data, self.max_image_pixels)
        if mask_config.segmentation is not None:
            return np.asarray(source), None, None  # segmented on the model's actor (`segment`)
        if mask_config.column is not None:
            mask, note = column_mask(mask_config, row.get(mask_config.column), source.size, self.max_image_pixels)
            return np.asarray(source), mask, note
        return np.asarray(source), rule_mask(mask_config, source), None

    def mask_config(self) -> MaskConfig | None:
        """The mask shaping of this operator (None: the mask is used as `masked_input` makes it)."""
        return self.config.mask

    def components(self) -> dict:
        """The segmentation model of a `mask.segmentation` source, loaded once per actor."""
        from operators.annotators import load_annotator

        shaping = self.mask_config()
        segmentation = shaping.segmentation if shaping is not None else None
        self.segmenter = (
            load_annotator(
                "segmentation", segmentation.annotator, self.offline, self.model_storage_options, self.device
            )
            if segmentation is not None
            else None
        )
        return super().components()

    def prepare(self, data, row: dict) -> dict:
        source, mask, note = self.masked_input(data, row)
        if mask is None:  # a segmentation mask, made on the model's actor (`segment`)
            height, width = source.shape[:2]
            size = fit_size(width, height, self.config.size.max_side, self.config.size.multiple_of)
            image = Image.fromarray(source)
            image = image if size == (width, height) else image.resize(size, resample=Image.BICUBIC)
            return {"image": np.asarray(image), "source": source, "note": note}
        shaping = self.mask_config()
        selected = int(np.count_nonzero(mask))
        if shaping is not None:
            mask = shape_mask(mask, shaping)
        height, width = source.shape[:2]
        size = fit_size(width, height, self.config.size.max_side, self.config.size.multiple_of)
        image, model_mask = Image.fromarray(source), Image.fromarray(mask)
        if size != (width, height):
            image, model_mask = image.resize(size, resample=Image.BICUBIC), model_mask.resize(size, Image.BILINEAR)
        return {
            "image": np.asarray(image),
            "model_mask": np.asarray(model_mask),
            "source": source,
            "mask": mask,
            "selected": str(selected),
            "note": note,
        }

    def segment(self, items: list[Item]) -> None:
        """The masks of a `mask.segmentation` source, once per input row (its variants share them): the
        named classes' pixels at the source's size, counted, shaped and sized for the model as `prepare`
        does for the other sources. A segmentation that fails makes that row's error."""
        if self.segmenter is None:
            return
        shaping = self.config.mask
        rows: dict[int, list[Item]] = {}
        for item in items:
            rows.setdefault(item.source_index, []).append(item)
        for members in rows.values():
            inputs = members[0].input
            try:
                classes = self.segmenter.classes(Image.fromarray(inputs["source"]))
            except Exception as error:  # one image's failure must not sink the batch
                message = (
                    f"mask segmentation: annotator {shaping.segmentation.annotator.model} failed on this row: "
                    f"{type(error).__name__}: {error}"
                )
                logger.warning("%s (row %s)", message, members[0].row_id)
                for item in members:
                    item.error = message
                continue
            mask = np.where(np.isin(classes, shaping.segmentation.class_ids()), 255, 0).astype(np.uint8)
            inputs["selected"] = str(int(np.count_nonzero(mask)))
            inputs["mask"] = mask = shape_mask(mask, shaping)
            height, width = inputs["image"].shape[:2]
            model_mask = Image.fromarray(mask)
            if model_mask.size != (width, height):
                model_mask = model_mask.resize((width, height), Image.BILINEAR)
            inputs["model_mask"] = np.asarray(model_mask)

    def process(self, items: list[Item]) -> None:
        self.segment(items)
        items = [item for item in items if item.error is None]
        super().process([item for item in items if item.input["selected"] != "0"])
        for item in items:
            item.record["mask_pixels"] = int(item.input["selected"])
            item.record["mask_note"] = item.input["note"]
            if item.input["selected"] == "0":  # nothing to repaint
                item.output = item.input["source"]
                item.record["mask_note"] = "empty mask: passed through unchanged"
            elif item.output is not None and self.config.paste_back:
                item.output = paste_back(item.output, item.input["source"], item.input["mask"])

    def call_inputs(self, members: list[Item]) -> dict:
        images = [Image.fromarray(item.input["image"]) for item in members]
        masks = [Image.fromarray(item.input["model_mask"]) for item in members]
        width, height = images[0].size
        arguments = {"height": height, "width": width}
        if self.config.padding_mask_crop is not None:  # diffusers crops one image and mask per call
            return {
                **arguments,
                "image": images[0],
                "mask_image": masks[0],
                "padding_mask_crop": self.config.padding_mask_crop,
            }
        return {**arguments, "image": images, "mask_image": masks}

    def model_batch_size(self) -> int:
        return 1 if self.config.padding_mask_crop is not None else super().model_batch_size()

    def infotext_fields(self, item: Item) -> dict:
        """Img2img's pairs plus AUTOMATIC1111's inpainting ones."""
        config = self.config
        shaping = self.mask_config()
        return {
            **super().infotext_fields(item),
            "Mask blur": shaping.blur if shaping is not None else None,
            "Inpaint area": "Only masked" if config.padding_mask_crop is not None else "Whole picture",
            "Masked area padding": config.padding_mask_crop,
            "Mask": self.mask_description(),
        }

    def mask_description(self) -> str:
        description = self.config.mask.describe()
        if self.segmenter is not None:  # name the segmentation model's revision too
            return description.replace(f"({self.segmenter.config.model})", f"({self.segmenter.label})")
        return description

    def record(self, item: Item) -> dict:
        record = super().record(item)
        shaping = self.mask_config()
        record.update(
            mask=self.mask_description(),
            mask_blur=shaping.blur if shaping is not None else None,
            mask_dilation=shaping.dilation if shaping is not None else None,
            mask_pixels=item.record.get("mask_pixels"),
            mask_note=item.record.get("mask_note"),
            padding_mask_crop=self.config.padding_mask_crop,
            paste_back=self.config.paste_back,
        )
        return record
