"""Outpainting: extend each image by given pixels (or to an aspect ratio) on chosen sides, fill the new
border (edge-extend, blur or noise, as AUTOMATIC1111's outpainting scripts offer) and inpaint it with
a mask feathered into the border; the original region is pasted back byte for byte."""

from __future__ import annotations

import re
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter
from pydantic import Field, model_validator

from operators.images import eight_bit_rgb
from operators.inpaint import Inpaint, MaskedConfig
from operators.rows import RowError, derive_seed

SIDES = ("left", "right", "top", "bottom")
_RATIO = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")


class OutpaintConfig(MaskedConfig):
    """Config of the `outpaint` operator: pixels per side, or an aspect ratio to reach."""

    kind: Literal["outpaint"] = Field(description="Operator kind.")  # type: ignore[assignment]
    left: int = Field(0, ge=0, le=8192, description="Pixels added on the left.", strict=True)
    right: int = Field(0, ge=0, le=8192, description="Pixels added on the right.", strict=True)
    top: int = Field(0, ge=0, le=8192, description="Pixels added at the top.", strict=True)
    bottom: int = Field(0, ge=0, le=8192, description="Pixels added at the bottom.", strict=True)
    aspect_ratio: str | None = Field(
        None, description="Extend each image to this width:height, e.g. '16:9', instead of fixed pixels."
    )
    sides: list[Literal["left", "right", "top", "bottom"]] | None = Field(
        None, min_length=1, description="With aspect_ratio: the sides that grow (default: both of the growing axis)."
    )
    fill: Literal["edge", "blur", "noise"] = Field(
        "edge",
        description="What the new border holds before it is inpainted: the edge pixels repeated, blurred, or noise.",
    )
    feather: int = Field(
        16,
        ge=0,
        le=1024,
        description="Pixels over which the mask rises from the original edge into the border.",
        strict=True,
    )

    @model_validator(mode="after")
    def _one_extension(self) -> OutpaintConfig:
        pixels = any(getattr(self, side) for side in SIDES)
        if pixels == (self.aspect_ratio is not None):
            raise ValueError("give pixels on at least one of left, right, top, bottom, or an aspect_ratio (not both)")
        if self.aspect_ratio is not None and not _RATIO.match(self.aspect_ratio):
            raise ValueError(
                f"aspect_ratio must be WIDTH:HEIGHT in whole numbers, e.g. '16:9', got {self.aspect_ratio!r}"
            )
        if self.sides is not None and self.aspect_ratio is None:
            raise ValueError("sides applies with aspect_ratio only; with pixels, give each side's pixels")
        return self

    def describe(self) -> str:
        """The extension rule, as recorded per row and in the parameters text."""
        if self.aspect_ratio is not None:
            rule = f"to {self.aspect_ratio}" + (f" on {'+'.join(self.sides)}" if self.sides else "")
        else:
            rule = " ".join(f"{side} {getattr(self, side)}" for side in SIDES if getattr(self, side))
        return f"outpaint {rule}, fill {self.fill}, feather {self.feather}"


def extension(config: OutpaintConfig, width: int, height: int) -> dict[str, int]:
    """The pixels added on each side of a `width` x `height` image."""
    if config.aspect_ratio is None:
        return {side: getattr(config, side) for side in SIDES}
    ratio_width, ratio_height = (int(part) for part in config.aspect_ratio.split(":"))
    added = dict.fromkeys(SIDES, 0)
    if width * ratio_height < height * ratio_width:  # too narrow: grow the width
        axis, grow = ("left", "right"), round(height * ratio_width / ratio_height) - width
    else:
        axis, grow = ("top", "bottom"), round(width * ratio_height / ratio_width) - height
    growing = [side for side in (config.sides or axis) if side in axis]
    if grow > 0 and not growing:
        raise RowError(
            f"aspect_ratio {config.aspect_ratio} needs this {width}x{height} image to grow on {' or '.join(axis)}, "
            f"and sides are {config.sides}"
        )
    for index, side in enumerate(growing):
        added[side] = grow // len(growing) + (1 if index < grow % len(growing) else 0)
    return added


def filled_canvas(source: np.ndarray, added: dict[str, int], fill: str, seed: int) -> np.ndarray:
    """The source on a larger canvas whose new border holds the fill."""
    import cv2

    canvas = cv2.copyMakeBorder(
        np.ascontiguousarray(source), added["top"], added["bottom"], added["left"], added["right"], cv2.BORDER_REPLICATE
    )
    if fill == "blur":
        radius = max(4, max(added.values()) // 4)
        canvas = np.asarray(Image.fromarray(canvas).filter(ImageFilter.GaussianBlur(radius))).copy()
    elif fill == "noise":
        canvas = np.random.default_rng(seed).integers(0, 256, canvas.shape, dtype=np.uint8)
    height, width = source.shape[:2]
    canvas[added["top"] : added["top"] + height, added["left"] : added["left"] + width] = source
    return canvas


def feathered_mask(shape: tuple[int, int], added: dict[str, int], feather: int) -> np.ndarray:
    """255 in the border, 0 on the original region, rising over `feather` pixels from its edge."""
    height, width = shape
    top, left = added["top"], added["left"]
    bottom, right = height - added["bottom"], width - added["right"]
    rows, columns = np.arange(height)[:, None], np.arange(width)[None, :]
    distance = np.maximum(
        np.maximum(top - rows, rows - (bottom - 1)).clip(min=0),
        np.maximum(left - columns, columns - (right - 1)).clip(min=0),
    )
    if feather == 0:
        return np.where(distance > 0, 255, 0).astype(np.uint8)
    return np.minimum(255, np.round(distance * 255.0 / feather)).astype(np.uint8)


class Outpaint(Inpaint):
    """`outpaint`: the new border of each image is inpainted; the original region is kept as it was."""

    config_class = OutpaintConfig

    def masked_input(self, data, row: dict) -> tuple[np.ndarray, np.ndarray, str | None]:
        source = np.asarray(eight_bit_rgb(data, self.max_image_pixels))
        height, width = source.shape[:2]
        added = extension(self.config, width, height)
        canvas = filled_canvas(source, added, self.config.fill, derive_seed(self.seed, str(row.get("id")), 0))
        if canvas.shape[0] * canvas.shape[1] > self.max_image_pixels:
            raise RowError(
                f"outpainted to {canvas.shape[1]}x{canvas.shape[0]}, over the limit of {self.max_image_pixels} pixels "
                "(source.max_image_pixels)"
            )
        note = (
            "extended "
            + ", ".join(f"{side} {added[side]}" for side in SIDES)
            + f" to {canvas.shape[1]}x{canvas.shape[0]}"
        )
        return canvas, feathered_mask(canvas.shape[:2], added, self.config.feather), note

    def mask_config(self):
        return None  # the feathered border is the mask, as it is

    def mask_description(self) -> str:
        return self.config.describe()
