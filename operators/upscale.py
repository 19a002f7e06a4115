"""Super-resolution: diffusers upscaling pipelines held once per actor, or classical OpenCV resizing.

Model methods (`sd_x4`, `latent_x2`, `ldm`) work on RGB. An input wider or taller than
`tile_size` is cut into overlapping tiles, each tile is upscaled on its own (its own seed, at
most `model_batch_size` tiles per model call), and the tiles are blended into the output with
linear weights across the overlaps, so a large input never needs more than a few tiles' worth of
model memory. Classical methods (`lanczos`, `bicubic`) resize the whole image in one OpenCV call,
load no model, never import torch, and keep each input's bit depth (16-bit stays 16-bit) and channels
(grayscale stays grayscale; other 8-bit modes become RGB).
"""

from __future__ import annotations

import hashlib
import math
import string
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, model_validator

from operators.acceleration import SPEED_FIELDS, SpeedSettings, check_speed_settings
from operators.base import Item, OperatorConfig
from operators.diffusion import (
    SCHEDULERS,
    DiffusersModelOperator,
    a1111_model_hash,
    a1111_parameters,
    generators,
    render_template,
    resolve_dtype,
)
from operators.images import eight_bit_rgb, input_array
from operators.models import ModelReference
from operators.rows import RowError

MODEL_METHODS = ("sd_x4", "latent_x2", "ldm")
CLASSICAL_METHODS = ("lanczos", "bicubic")
PROMPT_METHODS = ("sd_x4", "latent_x2")

# The methods each optional field applies to; a field given for another method is refused.
FIELD_METHODS = {
    "model": MODEL_METHODS,
    "revision": MODEL_METHODS,
    "variant": MODEL_METHODS,
    "model_batch_size": MODEL_METHODS,
    "num_inference_steps": MODEL_METHODS,
    "prompt": PROMPT_METHODS,
    "prompt_column": PROMPT_METHODS,
    "negative_prompt": PROMPT_METHODS,
    "guidance_scale": PROMPT_METHODS,
    "noise_level": ("sd_x4",),
    "eta": ("sd_x4", "ldm"),
    # The latent upscaler's loop reads Karras sigmas, so it keeps the checkpoint's Euler scheduler.
    "scheduler": ("sd_x4", "ldm"),
    "scale": CLASSICAL_METHODS,
}

# Each method's defaults for the fields that apply to it: the pipelines' own defaults.
METHOD_DEFAULTS = {
    "sd_x4": {"num_inference_steps": 75, "guidance_scale": 9.0, "noise_level": 20, "eta": 0.0},
    "latent_x2": {"num_inference_steps": 75, "guidance_scale": 9.0},
    "ldm": {"num_inference_steps": 100, "eta": 0.0},
    "lanczos": {"scale": 2.0},
    "bicubic": {"scale": 2.0},
}

# Schedulers each pipeline's denoising loop works with (the x4 upscaler takes any Karras scheduler;
# the LDM pipeline names its six).
METHOD_SCHEDULERS = {
    "sd_x4": tuple(name for name in SCHEDULERS if name not in ("FlowMatchEulerDiscreteScheduler", "LCMScheduler")),
    "ldm": (
        "DDIMScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
    ),
}

# The speed knobs' defaults: a classical method accepts only these.
SPEED_DEFAULTS = {name: field.default for name, field in SpeedSettings.model_fields.items()}

OPENCV_INTERPOLATION = {"lanczos": "INTER_LANCZOS4", "bicubic": "INTER_CUBIC"}

# The `Postprocess upscaler` each method is written as in the AUTOMATIC1111 parameters text.
A1111_UPSCALERS = {
    "lanczos": "Lanczos",
    "bicubic": "Bicubic",
    "sd_x4": "SD x4",
    "latent_x2": "SD latent x2",
    "ldm": "LDSR",
}


class UpscaleConfig(SpeedSettings, OperatorConfig):
    """Config of the `upscale` operator: one super-resolved output per input row.

    Fields that do not apply to the chosen method are refused; those that do and are left out take
    the method's default (the pipeline's own).
    """

    kind: Literal["upscale"] = Field(description="Operator kind.")
    method: Literal["sd_x4", "latent_x2", "ldm", "lanczos", "bicubic"] = Field(
        description="'sd_x4': StableDiffusionUpscalePipeline (4x, prompted); 'latent_x2': "
        "StableDiffusionLatentUpscalePipeline (2x, prompted); 'ldm': LDMSuperResolutionPipeline (4x, "
        "unprompted); 'lanczos' / 'bicubic': OpenCV resize by `scale`, no model."
    )
    model: str | None = Field(
        None,
        description="Checkpoint of a model method: a local diffusers directory, an s3:// prefix, or a Hub id "
        "(owner/name). Required for sd_x4, latent_x2 and ldm; refused for lanczos and bicubic.",
    )
    revision: str | None = Field(None, description="Hub commit or tag (required for Hub ids); recorded per row.")
    variant: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]+$",
        description="Weight variant of a model method, e.g. 'fp16' (diffusers' `variant`); default: the plain weights.",
    )
    scale: float | None = Field(
        None, gt=1, le=16, description="Resize factor of lanczos and bicubic (default 2); model methods have their own."
    )
    prompt: str | None = Field(
        None,
        description="Prompt of sd_x4 and latent_x2 for every row; a template may use {column} of the row. "
        "Default: the empty prompt.",
    )
    prompt_column: str | None = Field(None, description="Column holding each row's prompt (sd_x4 and latent_x2).")
    negative_prompt: str | None = Field(
        None, description="Negative prompt of sd_x4 and latent_x2 (a template may use {column})."
    )
    noise_level: int | None = Field(
        None,
        ge=0,
        le=350,
        description="Noise added to the low-resolution input by sd_x4 (default 20); at most the checkpoint's "
        "max_noise_level (350 for the released model).",
        strict=True,
    )
    num_inference_steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Denoising steps of a model method (default: 75 sd_x4/latent_x2, 100 ldm).",
        strict=True,
    )
    guidance_scale: float | None = Field(
        None, ge=0, description="Classifier-free guidance scale of sd_x4 and latent_x2 (default 9.0)."
    )
    eta: float | None = Field(
        None, ge=0, le=1, description="DDIM eta of sd_x4 and ldm (default 0.0); ignored by non-DDIM schedulers."
    )
    scheduler: Literal[tuple(SCHEDULERS)] | None = Field(  # type: ignore[valid-type]
        None, description="Scheduler class name for sd_x4 or ldm; default is the checkpoint's own."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Torch dtype of a model method's weights; 'auto' is float16 on cuda, float32 on cpu."
    )
    tile_size: int = Field(
        512,
        ge=8,
        description="Model methods: input pixels per tile side; a larger input is upscaled tile by tile.",
        strict=True,
    )
    tile_overlap: int = Field(
        32,
        ge=0,
        description="Model methods: input pixels neighbouring tiles share; less than tile_size / 2.",
        strict=True,
    )
    model_batch_size: int | None = Field(
        None,
        ge=1,
        description="Tiles per model call (of one row, or of consecutive untiled rows of one size). Default: 1 "
        "on cpu, which makes every output's bytes independent of batching; 4 on cuda.",
        strict=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data):
        if isinstance(data, dict) and data.get("method") in METHOD_DEFAULTS:
            data = dict(data)
            for name, value in METHOD_DEFAULTS[data["method"]].items():
                if data.get(name) is None:
                    data[name] = value
            if data["method"] in PROMPT_METHODS and data.get("prompt") is None and data.get("prompt_column") is None:
                data["prompt"] = ""
        return data

    @model_validator(mode="after")
    def _fields_fit_method(self) -> UpscaleConfig:
        method = self.method
        for name, methods in FIELD_METHODS.items():
            value = getattr(self, name)
            if value is not None and method not in methods:
                raise ValueError(
                    f"{name} does not apply to method {method!r}, got {value!r}; it is used by {', '.join(methods)}"
                )
        if method in MODEL_METHODS and self.model is None:
            raise ValueError(f"model is required for method {method!r}: a diffusers checkpoint to upscale with")
        if self.prompt is not None and self.prompt_column is not None:
            raise ValueError("give at most one of prompt or prompt_column")
        if self.scheduler is not None and self.scheduler not in METHOD_SCHEDULERS[method]:
            raise ValueError(
                f"scheduler {self.scheduler!r} does not work with method {method!r}; accepted: "
                f"{', '.join(METHOD_SCHEDULERS[method])}"
            )
        if method in CLASSICAL_METHODS:
            changed = [name for name in SpeedSettings.model_fields if getattr(self, name) != SPEED_DEFAULTS[name]]
            if changed:
                raise ValueError(
                    f"{changed[0]} does not apply to method {method!r}, got {getattr(self, changed[0])!r}; it is "
                    f"used by {', '.join(MODEL_METHODS)}"
                )
        else:
            check_speed_settings(self)
        if 2 * self.tile_overlap >= self.tile_size:
            raise ValueError(
                f"tile_overlap must be less than tile_size / 2 = {self.tile_size / 2:g}, got {self.tile_overlap}"
            )
        return self

    def resolved_dtype(self) -> str | None:
        """The torch dtype name a model method's weights are loaded in (None for classical methods)."""
        if self.method not in MODEL_METHODS:
            return None
        return resolve_dtype(self.dtype, self.resolved_device())

    def resolved_model_batch_size(self) -> int:
        """Tiles per model call (see `model_batch_size`)."""
        if self.model_batch_size is not None:
            return self.model_batch_size
        return 1 if self.resolved_device() == "cpu" else 4

    def model_references(self) -> list[ModelReference]:
        """The checkpoint of a model method, for vetting before the job runs."""
        if self.model is None:
            return []
        return [ModelReference("model", self.model, self.revision, self.variant, "pipeline")]

    def loads_model(self) -> bool:
        """Only the model methods load one; the classical ones are one OpenCV call."""
        return self.method not in CLASSICAL_METHODS

    def output_libraries(self) -> tuple[str, ...]:
        """Libraries whose versions can change the upscaled bytes."""
        if self.method in CLASSICAL_METHODS:
            return ("numpy", "opencv", "pillow")
        return ("torch", "diffusers", "transformers", "numpy", "pillow")

    def input_columns(self) -> set[str]:
        """Columns the prompt templates and `prompt_column` refer to."""
        templates = [self.prompt, self.negative_prompt]
        return {
            name for template in templates if template for _, name, _, _ in string.Formatter().parse(template) if name
        } | ({self.prompt_column} if self.prompt_column else set())


# Per-row fields of the upscale stage column.
UPSCALE_FIELDS = [
    ("method", pa.string()),
    ("model", pa.string()),
    ("model_revision", pa.string()),
    ("model_variant", pa.string()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("noise_level", pa.int32()),
    ("num_inference_steps", pa.int32()),
    ("guidance_scale", pa.float64()),
    ("eta", pa.float64()),
    ("scheduler", pa.string()),
    ("scale", pa.float64()),
    ("input_width", pa.int32()),
    ("input_height", pa.int32()),
    ("tiles", pa.int32()),
    ("tile_size", pa.int32()),
    ("tile_overlap", pa.int32()),
    ("dtype", pa.string()),
    ("device", pa.string()),
    # Most tiles per model call (model methods): batched kernels round differently per batch size.
    ("model_batch_size", pa.int32()),
    # Speed knobs of model methods (null for classical methods).
    *SPEED_FIELDS,
]


# --------------------------------------------------------------------------
# Tiling and blending (pure numpy)
# --------------------------------------------------------------------------


def axis_starts(length: int, tile_size: int, overlap: int) -> list[int]:
    """Tile starts along one axis: a stride of tile_size - overlap, the last tile flush with the end.
    One tile (the whole axis) when it fits."""
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    count = math.ceil((length - overlap) / stride)
    return sorted({min(index * stride, length - tile_size) for index in range(count)})


def tile_boxes(width: int, height: int, tile_size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) boxes of the tiles covering an image, row by row. Every tile is
    tile_size on a side that exceeds tile_size, else spans that side; neighbours share at least `overlap`."""
    columns = axis_starts(width, tile_size, overlap)
    rows = axis_starts(height, tile_size, overlap)
    tile_width, tile_height = min(width, tile_size), min(height, tile_size)
    return [(left, top, left + tile_width, top + tile_height) for top in rows for left in columns]


def axis_weights(starts: list[int], size: int, scale: int) -> list[np.ndarray]:
    """Per-tile blending weights along one output axis: 1 inside, linear ramps across the overlap with
    each neighbour, normalised so the weights of the tiles covering any pixel sum to 1."""
    length = (starts[-1] + size) * scale
    ramps = []
    for index, start in enumerate(starts):
        positions = np.arange(size * scale, dtype=np.float64) + 0.5
        weight = np.ones(size * scale, dtype=np.float64)
        if index > 0:
            shared = (starts[index - 1] + size - start) * scale
            weight = np.minimum(weight, positions / shared)
        if index < len(starts) - 1:
            shared = (start + size - starts[index + 1]) * scale
            weight = np.minimum(weight, (size * scale - positions) / shared)
        ramps.append(weight)
    total = np.zeros(length, dtype=np.float64)
    for start, weight in zip(starts, ramps, strict=True):
        total[start * scale : start * scale + size * scale] += weight
    return [
        (weight / total[start * scale : start * scale + size * scale]).astype(np.float32)
        for start, weight in zip(starts, ramps, strict=True)
    ]


class TiledCanvas:
    """The output of one tiled upscale: tiles are added in any order, each weighted by the product
    of its (separable, normalised) axis weights, so the finished canvas has no seams."""

    def __init__(self, width: int, height: int, tile_size: int, overlap: int, scale: int, channels: int = 3):
        self.scale = scale
        self.columns = axis_starts(width, tile_size, overlap)
        self.rows = axis_starts(height, tile_size, overlap)
        self.tile_width, self.tile_height = min(width, tile_size), min(height, tile_size)
        self.boxes = tile_boxes(width, height, tile_size, overlap)
        self.column_weights = axis_weights(self.columns, self.tile_width, scale)
        self.row_weights = axis_weights(self.rows, self.tile_height, scale)
        self.pixels = np.zeros((height * scale, width * scale, channels), dtype=np.float32)
        self.added: set[int] = set()

    @property
    def complete(self) -> bool:
        """Whether every tile has been added."""
        return len(self.added) == len(self.boxes)

    def add(self, index: int, tile: np.ndarray) -> None:
        """Blend in tile `index` (float, HxWxC, the box's size times `scale`)."""
        row, column = divmod(index, len(self.columns))
        left, top = self.columns[column] * self.scale, self.rows[row] * self.scale
        height, width = self.tile_height * self.scale, self.tile_width * self.scale
        if tile.shape[:2] != (height, width):
            raise ValueError(f"tile {index} is {tile.shape[1]}x{tile.shape[0]}, expected {width}x{height}")
        weight = self.row_weights[row][:, None, None] * self.column_weights[column][None, :, None]
        self.pixels[top : top + height, left : left + width] += tile * weight
        self.added.add(index)

    def to_uint8(self) -> np.ndarray:
        """The blended image as 8-bit samples, rounded as diffusers rounds its PIL outputs."""
        return np.clip(np.round(self.pixels * 255), 0, 255).astype(np.uint8)


def pad_to_multiple(pixels: np.ndarray, multiple: int, minimum: int = 0) -> np.ndarray:
    """Mirror-pad an HxWxC tile at its bottom and right so each side is a multiple of `multiple` and
    at least `minimum`; the upscaled padding is cropped off afterwards."""
    height, width = pixels.shape[:2]
    target_height = max(minimum, math.ceil(height / multiple) * multiple)
    target_width = max(minimum, math.ceil(width / multiple) * multiple)
    if (target_height, target_width) == (height, width):
        return pixels
    return np.pad(pixels, ((0, target_height - height), (0, target_width - width), (0, 0)), mode="reflect")


def tile_seed(seed: int, tile_index: int) -> int:
    """The seed of one tile: the row's seed for the first (so an untiled row's seed reproduces it),
    a hash of (row seed, tile index) for the others."""
    if tile_index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}\x1ftile\x1f{tile_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


# --------------------------------------------------------------------------
# Model geometry
# --------------------------------------------------------------------------


# The diffusers pipeline class of each model method, loaded by `operators.diffusion.load_pipeline`.
PIPELINE_CLASSES = {
    "sd_x4": "StableDiffusionUpscalePipeline",
    "latent_x2": "StableDiffusionLatentUpscalePipeline",
    "ldm": "LDMSuperResolutionPipeline",
}


def downsampling_factor(block_out_channels) -> int:
    """How much a UNet, VAE or VQ model built from these blocks shrinks (or grows) a side."""
    return 2 ** (len(block_out_channels) - 1)


def tile_geometry(method: str, pipeline) -> tuple[int, int, int]:
    """(scale, multiple, minimum) of a loaded pipeline: its upscale factor, what each input side
    must be a multiple of, and the smallest input side its UNet can take."""
    unet = downsampling_factor(pipeline.unet.config.block_out_channels)
    if method == "sd_x4":
        # Latents at input resolution; the VAE decodes them `vae_scale_factor` times larger.
        vae = pipeline.vae_scale_factor
        return vae, math.lcm(vae, unet), 0
    if method == "latent_x2":
        # The VAE encodes the input, the UNet denoises at twice that latent size. Its k-blocks pad
        # by reflection, which needs at least 2x2 latents at the deepest level.
        vae = pipeline.vae_scale_factor
        multiple = math.lcm(vae, max(1, vae * unet // 2))
        return 2, multiple, vae * unet
    # ldm: the UNet denoises at input resolution; the VQ decoder alone upscales.
    return downsampling_factor(pipeline.vqvae.config.block_out_channels), unet, 0


# --------------------------------------------------------------------------
# The operator
# --------------------------------------------------------------------------


@dataclass
class _Row:
    """One row being upscaled by a model: its item and the canvas its tiles land on."""

    item: Item
    canvas: TiledCanvas | None


@dataclass
class _Tile:
    """One tile on its way to the model: padded input pixels, where it goes, and its seed."""

    row: _Row
    index: int
    pixels: np.ndarray  # padded input tile, HxWx3 uint8
    width: int  # unpadded input size
    height: int
    seed: int


class Upscale(DiffusersModelOperator):
    """`upscale`: a model method loads its pipeline once per actor through the diffusers base (set-up,
    speed knobs, timed calls with out-of-memory backoff, failed calls as error rows, each distinct
    prompt encoded once) and upscales each row, tiling inputs larger than `tile_size`; a classical
    method loads nothing and resizes each row in one OpenCV call."""

    config_class = UpscaleConfig
    stage_fields = UPSCALE_FIELDS
    call_unit = "tiles"

    @property
    def pipeline_class(self) -> str:  # type: ignore[override]
        """The method's pipeline class."""
        return PIPELINE_CLASSES[self.config.method]

    def setup(self) -> None:
        config = self.config
        self.pipeline = None
        self.model = None
        self.scheduler_name = None
        if config.method in CLASSICAL_METHODS:
            import cv2

            cv2.setNumThreads(max(1, int(config.num_cpus)))
            return
        super().setup()
        if config.noise_level is not None and config.noise_level > self.pipeline.config.max_noise_level:
            raise ValueError(
                f"noise_level must be at most {self.pipeline.config.max_noise_level} for model {config.model}, "
                f"got {config.noise_level}"
            )
        self.model_scale, self.tile_multiple, self.tile_minimum = tile_geometry(config.method, self.pipeline)

    def variants(self, row: dict) -> list[dict]:
        config = self.config
        if config.method not in PROMPT_METHODS:
            return [{}]
        if config.prompt_column is not None:
            prompt = row.get(config.prompt_column)
            if prompt is None or not str(prompt).strip():
                raise RowError(f"prompt column {config.prompt_column!r} is empty for this row")
            prompt = str(prompt)
        else:
            prompt = render_template(config.prompt, row)
        negative = render_template(config.negative_prompt, row) if config.negative_prompt else None
        return [{"prompt": prompt, "negative_prompt": negative}]

    def prepare(self, image, row: dict) -> np.ndarray:
        if self.config.method in MODEL_METHODS:
            return np.asarray(eight_bit_rgb(image, self.max_image_pixels))
        # Grayscale stays grayscale and 16-bit stays 16-bit; other 8-bit modes become RGB.
        return input_array(image, self.max_image_pixels)

    def process(self, items: list[Item]) -> None:
        if self.pipeline is None:
            for item in items:
                self.resize(item)
        else:
            self.upscale_with_model(items)

    def resize(self, item: Item) -> None:
        """Classical methods: one OpenCV resize of the whole image, in its own bit depth."""
        import cv2

        pixels = item.input
        height, width = pixels.shape[:2]
        size = (round(width * self.config.scale), round(height * self.config.scale))
        interpolation = getattr(cv2, OPENCV_INTERPOLATION[self.config.method])
        try:
            output = cv2.resize(pixels, size, interpolation=interpolation)
        except cv2.error as error:
            item.error = f"resize to {size[0]}x{size[1]} failed: {error}"
            return
        item.record = {"scale": size[0] / width, "tiles": 1}
        item.output = output

    def upscale_with_model(self, items: list[Item]) -> None:
        """Upscale rows tile by tile; consecutive tiles of one size share a model call."""
        pending: list[_Tile] = []
        limit = self.config.resolved_model_batch_size()
        for item in items:
            height, width = item.input.shape[:2]
            canvas = TiledCanvas(width, height, self.config.tile_size, self.config.tile_overlap, self.model_scale)
            row = _Row(item, canvas)
            for index, (left, top, right, bottom) in enumerate(row.canvas.boxes):
                crop = item.input[top:bottom, left:right]
                tile = _Tile(
                    row,
                    index,
                    pad_to_multiple(crop, self.tile_multiple, self.tile_minimum),
                    right - left,
                    bottom - top,
                    tile_seed(item.seed, index),
                )
                if pending and (len(pending) == limit or pending[0].pixels.shape != tile.pixels.shape):
                    self.run_tiles(pending)
                    pending = []
                pending.append(tile)
        if pending:
            self.run_tiles(pending)

    def run_tiles(self, tiles: list[_Tile]) -> None:
        """One model call (`call_model`) for tiles of one size; a failure becomes error rows for the rows
        involved."""
        tiles = [tile for tile in tiles if tile.row.item.error is None]
        if not tiles:
            return
        rows = list({id(tile.row): tile.row for tile in tiles}.values())
        outputs = self.call_model(tiles, self.upscale_tiles, [row.item for row in rows])
        if outputs is None:
            for row in rows:
                row.canvas = None
            return
        for tile, output in zip(tiles, outputs, strict=True):
            row = tile.row
            row.canvas.add(tile.index, output[: tile.height * self.model_scale, : tile.width * self.model_scale])
            if row.canvas.complete:
                self.finish(row)

    def upscale_tiles(self, tiles: list[_Tile]) -> list[np.ndarray]:
        """One pipeline call: the upscaled tiles, each an HxWx3 float array in [0, 1] of the tile's
        (padded) size times the model's scale."""
        outputs = self.run_pipeline(tiles)
        expected = (tiles[0].pixels.shape[0] * self.model_scale, tiles[0].pixels.shape[1] * self.model_scale)
        if outputs.shape[1:3] != expected:
            raise ValueError(
                f"the pipeline returned {outputs.shape[2]}x{outputs.shape[1]} tiles, expected "
                f"{expected[1]}x{expected[0]} (x{self.model_scale})"
            )
        return list(outputs)

    def run_pipeline(self, tiles: list[_Tile]) -> np.ndarray:
        """The pipeline's output for tiles of one size, as an NxHxWx3 float array in [0, 1]."""
        import torch

        config = self.config
        seeds = [tile.seed for tile in tiles]
        arguments = {
            "num_inference_steps": config.num_inference_steps,
            "generator": generators(seeds, self.device),
            "output_type": "np",
        }
        if config.method in PROMPT_METHODS:
            parameters = [tile.row.item.parameters for tile in tiles]
            prompts = [values["prompt"] for values in parameters]
            if config.method == "latent_x2" and config.guidance_scale == 0:
                # The latent upscaler's own rule for an unguided call, which it skips when given embeddings.
                prompts = [""] * len(prompts)
            arguments.update(self.prompt_arguments(prompts, [values["negative_prompt"] for values in parameters]))
            arguments["guidance_scale"] = config.guidance_scale
            arguments["image"] = [Image.fromarray(tile.pixels) for tile in tiles]
        else:
            # A tensor in [-1, 1] rather than PIL images: the pipeline would resize PIL inputs to a
            # multiple of 32 and takes only one of them per call.
            batch = np.stack([tile.pixels for tile in tiles]).astype(np.float32) / 127.5 - 1.0
            arguments["image"] = torch.from_numpy(batch).permute(0, 3, 1, 2)
        if config.method == "sd_x4":
            arguments["noise_level"] = config.noise_level
        if config.eta is not None:
            arguments["eta"] = config.eta
        # The LDM pipeline passes no generator to its scheduler's step, so ancestral and eta > 0
        # sampling draw from torch's global generator: seed it per call, and restore it after.
        with torch.random.fork_rng(devices=[] if self.device == "cpu" else None):
            torch.manual_seed(seeds[0])
            return np.asarray(self.pipeline(**arguments).images, dtype=np.float32)

    def finish(self, row: _Row) -> None:
        """Encode a row whose tiles are all in, and let its canvas go."""
        item, canvas = row.item, row.canvas
        row.canvas = None
        height, width = item.input.shape[:2]
        output = canvas.to_uint8()
        item.record.update(scale=output.shape[1] / width, tiles=len(canvas.boxes))
        item.output = output

    def parameters_text(self, item: Item) -> str:
        """The AUTOMATIC1111 `parameters` text of one output. Classical methods write what
        AUTOMATIC1111's extras tab writes (`Postprocess upscale by`, `Postprocess upscaler`) and the
        size; model methods write a generation's fields as well."""
        config = self.config
        upscale = {
            "Postprocess upscale by": config.scale if config.method in CLASSICAL_METHODS else self.model_scale,
            "Postprocess upscaler": A1111_UPSCALERS[config.method],
        }
        if config.method in CLASSICAL_METHODS:
            return a1111_parameters("", None, {**upscale, "Size": f"{item.size[0]}x{item.size[1]}"})
        fields = {
            "Steps": config.num_inference_steps,
            "Sampler": SCHEDULERS.get(self.scheduler_name, self.scheduler_name),
            # The LDM pipeline runs unguided, which AUTOMATIC1111 writes as CFG scale 1.
            "CFG scale": config.guidance_scale if config.guidance_scale is not None else 1.0,
            "Seed": item.seed,
            "Size": f"{item.size[0]}x{item.size[1]}",
            "Model hash": a1111_model_hash(self.model.revision),
            "Model": config.model,
            **upscale,
            "Noise level": config.noise_level,
            "Eta": config.eta,
        }
        if item.record["tiles"] > 1:
            fields.update(
                {"Tiles": item.record["tiles"], "Tile size": config.tile_size, "Tile overlap": config.tile_overlap}
            )
        return a1111_parameters(item.parameters.get("prompt", ""), item.parameters.get("negative_prompt"), fields)

    def record(self, item: Item) -> dict:
        config = self.config
        tiled = config.method in MODEL_METHODS
        shape = item.input.shape if isinstance(item.input, np.ndarray) else None
        return {
            "method": config.method,
            "model": config.model,
            "model_revision": self.model.revision if self.model else None,
            "model_variant": config.variant,
            "prompt": item.parameters.get("prompt"),
            "negative_prompt": item.parameters.get("negative_prompt"),
            "noise_level": config.noise_level,
            "num_inference_steps": config.num_inference_steps,
            "guidance_scale": config.guidance_scale,
            "eta": config.eta,
            "scheduler": self.scheduler_name,
            "scale": item.record.get("scale"),
            "input_width": shape[1] if shape else None,
            "input_height": shape[0] if shape else None,
            "tiles": item.record.get("tiles"),
            "tile_size": config.tile_size if tiled else None,
            "tile_overlap": config.tile_overlap if tiled else None,
            "dtype": config.resolved_dtype(),
            "device": self.device if tiled else None,
            "model_batch_size": config.resolved_model_batch_size() if tiled else None,
            **(self.speed_fields(item) if tiled else {}),
        }
