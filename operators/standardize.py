"""Style standardization without a model: clip, normalize, match histograms, CLAHE, resize.

For bulk jobs where the look must become uniform but the structure must not change (medical
imaging among them). Each row is decoded by `decode_array` into uint8 or uint16, (H, W) or
(H, W, 3), and stays an integer array of that bit depth through every step: a 16-bit scan is never
squeezed through 8 bits unless `output_dtype` asks for it. Intensity steps are look-up tables over
the dtype's values, so they are exact and cheap; CLAHE and resizing are OpenCV's, which keep
uint16. Steps run in the order given, then `output_mode` and `output_dtype` convert the result,
which is written as PNG.

Histogram matching follows `skimage.exposure.match_histograms` (cumulative distributions mapped
by linear interpolation) against a reference kept as pixel counts at 16-bit resolution, pooled
over every reference image, so a reference set of any size costs 2 MiB and is read once per actor.
`histogram_distance` measures how close an output's intensities are to the reference's.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import cv2
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from operators.base import Item, Operator, OperatorConfig
from operators.dicom import DicomConfig
from operators.diffusion import a1111_parameters
from operators.images import DEFAULT_MAX_IMAGE_PIXELS, decode_array, input_array
from operators.rows import RowError, dtype_name

if TYPE_CHECKING:
    import fsspec

logger = logging.getLogger(__name__)

# Reference histograms keep one bin per 16-bit value; 8-bit references are scaled by 257 into them.
REFERENCE_LEVELS = 65536
# Bins of the histograms `histogram_distance` compares.
DISTANCE_BINS = 256

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
}


class StepConfig(BaseModel):
    """Base of the step configs: frozen, and unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PercentileClipStep(StepConfig):
    """Clip intensities to two percentiles of the image (over all channels of a colour image)."""

    op: Literal["percentile_clip"] = Field(description="Step kind.")
    low: float = Field(0.5, ge=0, le=100, description="Lower percentile, in [0, 100).")
    high: float = Field(99.5, ge=0, le=100, description="Upper percentile, in (low, 100].")

    @model_validator(mode="after")
    def _low_below_high(self) -> PercentileClipStep:
        if self.low >= self.high:
            raise ValueError(f"percentile_clip low must be below high, got low={self.low:g} >= high={self.high:g}")
        return self


class NormalizeStep(StepConfig):
    """Stretch intensities to the full range of the working dtype (0..255 or 0..65535).

    One mapping for all channels of a colour image, so its colour balance is kept.
    """

    op: Literal["normalize"] = Field(description="Step kind.")
    method: Literal["minmax", "zscore"] = Field(
        "minmax",
        description="'minmax' maps [min, max] to the full range; 'zscore' maps mean ± zscore_range·std "
        "to it and clips the values beyond.",
    )
    zscore_range: float = Field(
        3.0, gt=0, description="Standard deviations on each side of the mean that 'zscore' keeps."
    )


class HistogramMatchStep(StepConfig):
    """Match the image's intensity histogram to a reference image or a pooled reference set.

    A colour image is matched per channel to a colour reference; a grayscale image to the
    reference's luminance (ITU-R BT.601 weights), and a colour image to a grayscale reference
    replicated into three channels. Reference files are read once per actor; s3:// references use
    the job's model storage options (`run.model_storage`).
    """

    op: Literal["histogram_match"] = Field(description="Step kind.")
    reference: str = Field(
        min_length=1,
        description="One image or DICOM file, or a folder or prefix whose images (any format Pillow reads) and "
        "DICOM files (a reference series), recognised by content whatever their names, are pooled into one "
        "reference (other files and hidden ones are left out); a local path, file:// or "
        "s3:// URI.",
    )
    dicom: DicomConfig | None = Field(
        None,
        description="How the reference's DICOM files are read (every frame of each); give the source's "
        "source.dicom settings so both sides have the same intensities. Default: source.dicom's defaults.",
    )

    @field_validator("reference")
    @classmethod
    def _local_or_s3(cls, value: str) -> str:
        from operators.storage import is_remote, redact

        if "://" in value and not value.startswith("file://") and not is_remote(value):
            raise ValueError(
                f"reference must be a local path, file:// or a remote store's URI (s3://, gs://, az://, hf://), got "
                f"{redact(value)!r}"
            )
        return value


class ClaheStep(StepConfig):
    """OpenCV contrast-limited adaptive histogram equalization (CLAHE).

    Grayscale images are equalized directly in 8 or 16 bits. 8-bit colour is equalized on the L
    channel of CIE LAB; 16-bit colour per RGB channel, since OpenCV's LAB conversion has no 16-bit
    form. In 16 bits OpenCV turns clip_limit into counts per level as clip_limit x tile pixels /
    65536 (at least 1), so the effect depends on how many distinct levels a tile holds: 8-bit data
    stored in 16 bits changes far less than it would in 8 bits, while dense 16-bit data (a CT
    slice, for one) loses more local structure than its 8-bit version would. Try it on a sample
    before a bulk run.
    """

    op: Literal["clahe"] = Field(description="Step kind.")
    clip_limit: float = Field(2.0, gt=0, description="Contrast limit relative to a flat histogram.")
    tile_grid_size: int = Field(
        8, ge=1, le=64, description="Tiles per side; 16-bit CLAHE keeps 65536 table entries per tile.", strict=True
    )


class ResizeStep(StepConfig):
    """Resize to exactly width x height."""

    op: Literal["resize"] = Field(description="Step kind.")
    width: int = Field(ge=1, description="Output width in pixels.", strict=True)
    height: int = Field(ge=1, description="Output height in pixels.", strict=True)
    mode: Literal["fit", "fill", "stretch"] = Field(
        "fit",
        description="'fit' scales to fit inside and pads, centered; 'fill' scales to cover and crops, "
        "centered; 'stretch' ignores the aspect ratio.",
    )
    interpolation: Literal["area", "lanczos", "bicubic", "bilinear", "nearest"] = Field(
        "area", description="OpenCV interpolation; 'area' is the one that does not alias when shrinking."
    )
    pad_value: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Padding intensity for 'fit' as a fraction of the working dtype's maximum "
        "(0 is black; 1 is 255 in 8 bits, 65535 in 16 bits).",
    )


Step = Annotated[
    PercentileClipStep | NormalizeStep | HistogramMatchStep | ClaheStep | ResizeStep, Field(discriminator="op")
]


class StandardizeConfig(OperatorConfig):
    """Config of the `standardize` operator: steps applied in order, on the CPU, with no model."""

    kind: Literal["standardize"] = Field(description="Operator kind.")
    steps: list[Step] = Field(min_length=1, description="Steps applied in order to every row.")
    output_dtype: Literal["keep", "uint8", "uint16"] = Field(
        "keep",
        description="Bit depth of the output, converted after the last step by scaling full range to full "
        "range: 16 to 8 bits is value/257 rounded, 8 to 16 bits is value x 257.",
    )
    output_mode: Literal["keep", "grayscale", "rgb"] = Field(
        "keep",
        description="Channels of the output, converted after the last step: 'grayscale' takes the "
        "luminance (ITU-R BT.601 weights), 'rgb' repeats a gray plane three times.",
    )

    def loads_model(self) -> bool:
        """No model: the histogram references are read once per worker process."""
        return False

    def output_libraries(self) -> tuple[str, ...]:
        """Libraries whose versions can change the standardized bytes."""
        return ("numpy", "opencv", "pillow")

    @model_validator(mode="after")
    def _runs_on_cpu(self) -> StandardizeConfig:
        if self.num_gpus > 0 or self.device == "cuda":
            raise ValueError(
                f"standardize runs on the CPU; num_gpus must be 0 and device auto or cpu, got "
                f"num_gpus={self.num_gpus:g}, device={self.device!r}"
            )
        return self


STANDARDIZE_FIELDS = [
    ("steps", pa.string()),
    ("reference", pa.string()),
    ("input_dtype", pa.string()),
    ("input_channels", pa.int32()),
    ("output_dtype", pa.string()),
    ("output_channels", pa.int32()),
    ("input_histogram_distance", pa.float64()),
    ("histogram_distance", pa.float64()),
]


def dtype_maximum(dtype: np.dtype) -> int:
    """The largest value of a working dtype: 255 or 65535."""
    if dtype not in (np.uint8, np.uint16):
        raise ValueError(f"working arrays are uint8 or uint16, got {dtype}")
    return int(np.iinfo(dtype).max)


def channel_count(array: np.ndarray) -> int:
    """1 for an (H, W) array, 3 for an (H, W, 3) one."""
    return 1 if array.ndim == 2 else array.shape[2]


def apply_lookup(array: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Map every value v of an integer array to lookup[v]; lookup holds one entry per dtype value."""
    return np.take(lookup, array)


def value_counts(array: np.ndarray) -> np.ndarray:
    """How often each value of the dtype occurs in the array (all channels together)."""
    return np.bincount(array.ravel(), minlength=dtype_maximum(array.dtype) + 1)


def percentiles(array: np.ndarray, qs: Iterable[float]) -> list[float]:
    """Percentiles of all values of an integer array, equal to `np.percentile`'s default linear
    interpolation, computed from value counts instead of a sorted float copy."""
    cumulative = np.cumsum(value_counts(array))
    last = array.size - 1
    results = []
    for q in qs:
        position = q / 100 * last
        below = int(np.floor(position))
        above = min(below + 1, last)
        low, high = np.searchsorted(cumulative, [below, above], side="right")
        results.append(float(low + (position - below) * (high - low)))
    return results


def percentile_clip(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to the low and high percentiles of the image (over all channels), each rounded to the
    nearest integer value (halves to even)."""
    bottom, top = (int(round(value)) for value in percentiles(array, (low, high)))
    values = np.arange(dtype_maximum(array.dtype) + 1)
    return apply_lookup(array, np.clip(values, bottom, top).astype(array.dtype))


def normalize(array: np.ndarray, method: str = "minmax", zscore_range: float = 3.0) -> np.ndarray:
    """Stretch to the dtype's full range (see `NormalizeStep`). A constant image is returned as is."""
    if method == "minmax":
        bottom, top = float(array.min()), float(array.max())
    elif method == "zscore":
        mean, std = float(array.mean(dtype=np.float64)), float(array.std(dtype=np.float64))
        bottom, top = mean - zscore_range * std, mean + zscore_range * std
    else:
        raise ValueError(f"method must be minmax or zscore, got {method!r}")
    if top <= bottom:
        return array.copy()
    maximum = dtype_maximum(array.dtype)
    values = np.arange(maximum + 1, dtype=np.float64)
    lookup = np.clip(np.rint((values - bottom) * maximum / (top - bottom)), 0, maximum)
    return apply_lookup(array, lookup.astype(array.dtype))


def clahe(array: np.ndarray, clip_limit: float = 2.0, tile_grid_size: int = 8) -> np.ndarray:
    """OpenCV CLAHE: gray directly, 8-bit colour on the L of LAB, 16-bit colour per channel."""
    equalizer = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid_size, tile_grid_size))
    if array.ndim == 2:
        return equalizer.apply(np.ascontiguousarray(array))
    if array.dtype == np.uint8:
        lab = cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2LAB)
        lab[..., 0] = equalizer.apply(np.ascontiguousarray(lab[..., 0]))
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return np.dstack([equalizer.apply(np.ascontiguousarray(array[..., c])) for c in range(array.shape[2])])


def resize(
    array: np.ndarray,
    width: int,
    height: int,
    mode: str = "fit",
    interpolation: str = "area",
    pad_value: float = 0.0,
) -> np.ndarray:
    """Resize to exactly width x height (see `ResizeStep`); the dtype is kept."""
    flag = INTERPOLATIONS[interpolation]
    source_height, source_width = array.shape[:2]
    if mode == "stretch":
        return cv2.resize(array, (width, height), interpolation=flag)
    if mode == "fit":
        scale = min(width / source_width, height / source_height)
        inner_width = min(width, max(1, round(source_width * scale)))
        inner_height = min(height, max(1, round(source_height * scale)))
        inner = cv2.resize(array, (inner_width, inner_height), interpolation=flag)
        fill = round(pad_value * dtype_maximum(array.dtype))
        out = np.full((height, width, *array.shape[2:]), fill, dtype=array.dtype)
        top, left = (height - inner_height) // 2, (width - inner_width) // 2
        out[top : top + inner_height, left : left + inner_width] = inner
        return out
    if mode == "fill":
        scale = max(width / source_width, height / source_height)
        outer_width = max(width, round(source_width * scale))
        outer_height = max(height, round(source_height * scale))
        outer = cv2.resize(array, (outer_width, outer_height), interpolation=flag)
        top, left = (outer_height - height) // 2, (outer_width - width) // 2
        return np.ascontiguousarray(outer[top : top + height, left : left + width])
    raise ValueError(f"mode must be fit, fill or stretch, got {mode!r}")


def to_grayscale(array: np.ndarray) -> np.ndarray:
    """Luminance of an RGB array (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B) in its own dtype."""
    return array if array.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2GRAY)


def convert_mode(array: np.ndarray, mode: str) -> np.ndarray:
    """'keep', 'grayscale' (luminance) or 'rgb' (a gray plane repeated)."""
    if mode == "grayscale":
        return to_grayscale(array)
    if mode == "rgb" and array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    return array


def convert_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    """'keep', 'uint8' or 'uint16', full range to full range: 16 to 8 bits is value/257 rounded."""
    if dtype == "uint8" and array.dtype == np.uint16:
        # (v + 128) // 257 equals round(v / 257); 257 is odd, so there are no ties.
        return apply_lookup(array, ((np.arange(65536) + 128) // 257).astype(np.uint8))
    if dtype == "uint16" and array.dtype == np.uint8:
        return array.astype(np.uint16) * 257
    return array


@dataclass(frozen=True)
class ReferenceHistogram:
    """Pixel counts of one or more reference images at 16-bit resolution.

    `gray` counts luminance values (grayscale references as they are), shape (65536,); `color`
    counts each RGB channel, shape (3, 65536), with grayscale references counted in all three.
    8-bit values v are counted at v x 257. Pooling is by pixel: a larger image weighs more.
    """

    gray: np.ndarray
    color: np.ndarray
    images: int

    def counts(self, channels: int) -> np.ndarray:
        """The counts to match an image of this many channels against, shape (channels, 65536)."""
        return self.gray[None] if channels == 1 else self.color

    def distance_histogram(self, channels: int) -> np.ndarray:
        """The reference's 256-bin intensity histogram as seen by an image of this many channels."""
        return self.counts(channels).sum(axis=0).reshape(DISTANCE_BINS, -1).sum(axis=1)


def reference_from_arrays(arrays: Iterable[np.ndarray]) -> ReferenceHistogram:
    """Pool decoded arrays (uint8 or uint16, gray or RGB) into one reference histogram."""
    gray = np.zeros(REFERENCE_LEVELS, np.int64)
    color = np.zeros((3, REFERENCE_LEVELS), np.int64)
    images = 0
    for array in arrays:
        if array.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"reference images are uint8 or uint16, got {array.dtype}")
        scale = 257 if array.dtype == np.uint8 else 1
        luminance = np.bincount(to_grayscale(array).ravel().astype(np.int64) * scale, minlength=REFERENCE_LEVELS)
        gray += luminance
        if array.ndim == 2:
            color += luminance
        else:
            for channel in range(3):
                values = array[..., channel].ravel().astype(np.int64) * scale
                color[channel] += np.bincount(values, minlength=REFERENCE_LEVELS)
        images += 1
    if images == 0:
        raise ValueError("a reference needs at least one image")
    return ReferenceHistogram(gray=gray, color=color, images=images)


def reference_files(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The filesystem and image files of a reference: the file itself, or the images under a
    folder or prefix, sorted."""
    from operators.storage import filesystem_for, redact

    filesystem, path = filesystem_for(uri, storage_options)
    if filesystem.isfile(path):
        return filesystem, [path]
    root = path.rstrip("/")
    files = sorted(
        name
        for name in filesystem.find(path)
        if not any(part.startswith(".") for part in name[len(root) + 1 :].split("/"))
    )
    if not files:
        raise ValueError(f"histogram_match reference {redact(uri)} is neither an image file nor a folder holding files")
    return filesystem, files


def is_image_file(data: bytes) -> bool:
    """Whether bytes are a file Pillow recognises (by content, from its header)."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)):
                return True
    except Image.UnidentifiedImageError:
        return False
    except Exception:  # a known format that does not decode here: decoding names the problem
        return True


def load_reference(
    uri: str,
    storage_options: dict | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    dicom: DicomConfig | None = None,
) -> ReferenceHistogram:
    """Read a reference image, or every image of a reference folder or prefix, into one pooled
    histogram; the images are decoded one at a time with `decode_array`'s rules, DICOM files (every
    frame) with `operators.dicom`'s and the `dicom` settings."""
    from operators.dicom import decode_frames, is_dicom
    from operators.storage import redact

    filesystem, files = reference_files(uri, storage_options)

    def arrays():
        for path in files:
            with filesystem.open(path, "rb") as handle:
                data = handle.read()
            if len(files) > 1 and not is_dicom(data) and not is_image_file(data):
                logger.info("standardize: reference file %s is no image or DICOM file: left out", redact(path))
                continue
            try:
                if is_dicom(data):
                    for frame in decode_frames(data, dicom or DicomConfig(), None):
                        if isinstance(frame, RowError):
                            raise frame
                        yield frame.array
                else:
                    yield decode_array(data, max_pixels)
            except RowError as error:
                raise ValueError(f"histogram_match reference {redact(path)}: {error}") from None

    reference = reference_from_arrays(arrays())
    logger.info("standardize: reference %s pooled from %d images", redact(uri), reference.images)
    return reference


def match_histogram(array: np.ndarray, reference: ReferenceHistogram) -> np.ndarray:
    """Map each channel's cumulative distribution onto the reference's, as
    `skimage.exposure.match_histograms` does, rounded back to the array's dtype."""
    maximum = dtype_maximum(array.dtype)
    templates = reference.counts(channel_count(array))
    planes = [array] if array.ndim == 2 else [array[..., channel] for channel in range(array.shape[2])]
    matched = []
    for plane, counts in zip(planes, templates, strict=True):
        values = np.nonzero(counts)[0]
        template_quantiles = np.cumsum(counts[values]) / counts.sum()
        source_quantiles = np.cumsum(value_counts(plane)) / plane.size
        lookup = np.interp(source_quantiles, template_quantiles, values * (maximum / (REFERENCE_LEVELS - 1)))
        matched.append(apply_lookup(plane, np.clip(np.rint(lookup), 0, maximum).astype(array.dtype)))
    return matched[0] if array.ndim == 2 else np.dstack(matched)


def intensity_histogram(array: np.ndarray) -> np.ndarray:
    """256-bin histogram of all values of a uint8 or uint16 array: bin k holds the values whose top
    8 bits are k (v for 8-bit, v >> 8 for 16-bit), i.e. 256 equal bins over the dtype's range."""
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"intensity_histogram takes uint8 or uint16, got {array.dtype}")
    bins = array >> 8 if array.dtype == np.uint16 else array
    return np.bincount(bins.ravel(), minlength=DISTANCE_BINS)


def histogram_distance(array: np.ndarray, reference: ReferenceHistogram | np.ndarray) -> float:
    """Earth mover's distance between the intensity distributions of `array` and `reference`.

    Both are normalised to [0, 1] by their dtype's maximum and binned into 256 equal bins (see
    `intensity_histogram`); the distance is mean |CDF_array - CDF_reference| over the bins: 0 for
    identical histograms, at most 1 (all mass at black against all mass at white gives 255/256).
    A colour array counts the values of all its channels. `reference` is a `ReferenceHistogram`
    (seen with the array's channel count, as `match_histogram` sees it), an image array (uint8
    or uint16, 2-D or 3-D) or a 1-D histogram of 256 counts.
    """
    if isinstance(reference, ReferenceHistogram):
        reference_counts = reference.distance_histogram(channel_count(array))
    elif reference.ndim == 1:
        if reference.shape != (DISTANCE_BINS,):
            raise ValueError(f"a reference histogram has {DISTANCE_BINS} bins, got shape {reference.shape}")
        reference_counts = reference
    else:
        reference_counts = intensity_histogram(reference)
    cdfs = []
    for counts in (intensity_histogram(array), reference_counts):
        total = float(np.sum(counts))
        if total <= 0:
            raise ValueError("histogram_distance needs non-empty histograms")
        cdfs.append(np.cumsum(counts, dtype=np.float64) / total)
    return float(np.mean(np.abs(cdfs[0] - cdfs[1])))


def apply_step(array: np.ndarray, step: StepConfig, references: dict[str, ReferenceHistogram]) -> np.ndarray:
    """One step on one array; `references` holds the loaded reference of each histogram_match URI."""
    if isinstance(step, PercentileClipStep):
        return percentile_clip(array, step.low, step.high)
    if isinstance(step, NormalizeStep):
        return normalize(array, step.method, step.zscore_range)
    if isinstance(step, HistogramMatchStep):
        return match_histogram(array, references[step.reference])
    if isinstance(step, ClaheStep):
        return clahe(array, step.clip_limit, step.tile_grid_size)
    if isinstance(step, ResizeStep):
        return resize(array, step.width, step.height, step.mode, step.interpolation, step.pad_value)
    raise TypeError(f"unknown step {step!r}")


def describe_steps(config: StandardizeConfig) -> str:
    """The steps and output conversions as one line, e.g. 'percentile_clip(low=1.0, high=99.0);
    clahe(clip_limit=2.0, tile_grid_size=8)', credentials removed from references."""
    from operators.storage import redact

    parts = []
    for step in config.steps:
        fields = step.model_dump(exclude={"op"})
        parts.append(f"{step.op}({', '.join(f'{name}={value}' for name, value in fields.items())})")
    if (config.output_dtype, config.output_mode) != ("keep", "keep"):
        parts.append(f"output(dtype={config.output_dtype}, mode={config.output_mode})")
    return redact("; ".join(parts))


class Standardize(Operator):
    """Ray Data actor for `standardize`: reads references once, then runs the steps on each row.

    The stage column records the steps (JSON), the histogram_match reference (its URI, credentials
    removed), input and output dtype and channels, and, with a histogram_match step, the
    `histogram_distance` of the input and of the output to the last such step's reference.
    """

    config_class = StandardizeConfig
    stage_fields = STANDARDIZE_FIELDS

    def setup(self) -> None:
        from operators.storage import redact

        cv2.setNumThreads(max(1, int(self.config.num_cpus)))
        self.references: dict[str, ReferenceHistogram] = {}
        matches = [step for step in self.config.steps if isinstance(step, HistogramMatchStep)]
        for step in matches:
            if step.reference not in self.references:
                self.references[step.reference] = load_reference(
                    step.reference, self.model_storage_options, self.max_image_pixels, step.dicom
                )
        # Distances are measured against the last histogram_match step's reference.
        self.distance_histogram = self.references[matches[-1].reference] if matches else None
        self.reference_label = redact(matches[-1].reference) if matches else None
        self.steps_text = redact(json.dumps([step.model_dump() for step in self.config.steps], separators=(",", ":")))
        self.a1111_steps = describe_steps(self.config)

    def prepare(self, image, row: dict) -> np.ndarray:
        return input_array(image, self.max_image_pixels)

    def process(self, items: list[Item]) -> None:
        for item in items:
            try:
                self.standardize(item)
            except RowError as problem:  # one row's failure stays that row's
                item.error = str(problem)

    def standardize(self, item: Item) -> None:
        """Run the steps on one item and set its output, size and record."""
        array = item.input
        reference = self.distance_histogram
        record = {"input_dtype": dtype_name(array), "input_channels": channel_count(array)}
        if reference is not None:
            record["input_histogram_distance"] = histogram_distance(array, reference)
        for index, step in enumerate(self.config.steps):
            try:
                array = apply_step(array, step, self.references)
            except cv2.error as error:
                message = str(error).strip().splitlines()[-1]
                raise RowError(
                    f"steps[{index}] ({step.op}) failed on a {array.dtype} {array.shape} image: {message}"
                ) from None
        array = convert_dtype(convert_mode(array, self.config.output_mode), self.config.output_dtype)
        record["output_dtype"] = dtype_name(array)
        record["output_channels"] = channel_count(array)
        if reference is not None:
            record["histogram_distance"] = histogram_distance(array, reference)
        item.record = record
        item.output = array

    def parameters_text(self, item: Item) -> str:
        """The AUTOMATIC1111 `parameters` text of one output: the steps, the size and the bit depth."""
        return _standardize_text(self.a1111_steps, item.size, 8 * item.output.dtype.itemsize)

    def record(self, item: Item) -> dict:
        return {"steps": self.steps_text, "reference": self.reference_label, **item.record}


@functools.lru_cache(maxsize=1024)
def _standardize_text(steps: str, size: tuple[int, int], bits: int) -> str:
    """`Standardize.parameters_text`, made once per size and bit depth: a job's outputs share a few."""
    return a1111_parameters("", None, {"Standardize": steps, "Size": f"{size[0]}x{size[1]}", "Bit depth": bits})
