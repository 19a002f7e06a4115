"""Fidelity: how far each output strayed from its source, and thresholds that mark rows rejected.

Runs in the finish step (`operators.finish`) when the config has a `fidelity` section, on the output
pixels before they are encoded. The source image travels with each row (as `source_image` bytes)
from the read to here, where it is dropped.

- `ssim`, `psnr`: of the output's luminance against the source's, the source resized to the
  output's size, both scaled to [0, 1] by their dtype's range (so 8- and 16-bit compare fairly).
- `histogram_distance`: copied from the last standardization stage that matched a reference
  histogram (see `operators.standardize.histogram_distance`), else null.

A row that misses a threshold gets `status: rejected` and the reason in `error`; it stays in the
output with its image.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from operators.base import replace_columns
from operators.images import DEFAULT_MAX_IMAGE_PIXELS
from operators.rows import RowError, is_pixels, pixel_arrays

SOURCE_IMAGE_COLUMN = "source_image"


class FidelityConfig(BaseModel):
    """Fidelity columns and optional thresholds below (or above) which rows are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_ssim: float | None = Field(None, ge=-1, le=1, description="Reject rows whose SSIM is below this.")
    min_psnr: float | None = Field(None, ge=0, description="Reject rows whose PSNR (dB) is below this.")
    max_histogram_distance: float | None = Field(
        None, ge=0, le=1, description="Reject rows whose histogram distance to the reference is above this."
    )


def luminance(array: np.ndarray) -> np.ndarray:
    """Luminance in [0, 1] as float32 (ITU-R 601 weights for colour)."""
    scale = 65535.0 if array.dtype == np.uint16 else 255.0
    values = array.astype(np.float32) / scale
    if values.ndim == 3:
        values = values[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    return values


def compare(output: np.ndarray, source: np.ndarray) -> tuple[float | None, float]:
    """(SSIM, PSNR) of output against source, the source resized to the output's size."""
    import cv2
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    out, src = luminance(output), luminance(source)
    if src.shape != out.shape:
        shrinking = src.shape[0] * src.shape[1] > out.shape[0] * out.shape[1]
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
        src = np.clip(cv2.resize(src, (out.shape[1], out.shape[0]), interpolation=interpolation), 0, 1)
    window = min(7, *out.shape)
    window -= 1 - window % 2  # SSIM needs an odd window no larger than the image
    ssim = float(structural_similarity(src, out, data_range=1.0, win_size=window)) if window >= 3 else None
    if np.array_equal(src, out):
        return ssim, math.inf
    return ssim, float(peak_signal_noise_ratio(src, out, data_range=1.0))


def fidelity_batch(
    batch: pa.Table,
    config: FidelityConfig,
    histogram_stages: list[str],
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    outputs: list | None = None,
) -> pa.Table:
    """Add `ssim`, `psnr` and `histogram_distance`, apply thresholds, drop `source_image`. `outputs`
    are the output arrays when the caller has them (the finish step); otherwise `image` is decoded."""
    from operators.images import decode_array

    statuses = batch.column("status").to_pylist()
    errors = batch.column("error").to_pylist()
    encoded = None if outputs is not None else batch.column("image").to_pylist()
    source_column = batch.column(SOURCE_IMAGE_COLUMN)
    # A source read as pixels (DICOM, NIfTI) travels as pixels; any other as its encoded bytes.
    sources = pixel_arrays(source_column) if is_pixels(source_column.type) else source_column.to_pylist()
    stage_records = {name: batch.column(name).to_pylist() for name in histogram_stages if name in batch.column_names}
    ssims, psnrs, distances = [], [], []
    for index, status in enumerate(statuses):
        distance = None
        for records in stage_records.values():
            record = records[index] or {}
            if record.get("histogram_distance") is not None:
                distance = record["histogram_distance"]
        ssim = psnr = None
        if status == "ok":
            try:
                output = outputs[index] if outputs is not None else decode_array(encoded[index], max_image_pixels)
                source = sources[index]
                ssim, psnr = compare(
                    output, source if isinstance(source, np.ndarray) else decode_array(source, max_image_pixels)
                )
            except RowError as problem:
                statuses[index], errors[index] = "error", f"fidelity: {problem}"
        if statuses[index] == "ok":
            reasons = _threshold_failures(config, ssim, psnr, distance)
            if reasons:
                statuses[index], errors[index] = "rejected", "; ".join(reasons)
        ssims.append(ssim)
        psnrs.append(psnr)
        distances.append(distance)
    table = replace_columns(
        batch.drop_columns([SOURCE_IMAGE_COLUMN]),
        {
            "status": pa.array(statuses, pa.string()),
            "error": pa.array(errors, pa.string()),
            "ssim": pa.array(ssims, pa.float64()),
            "psnr": pa.array(psnrs, pa.float64()),
            "histogram_distance": pa.array(distances, pa.float64()),
        },
    )
    return table


def _threshold_failures(config: FidelityConfig, ssim, psnr, distance) -> list[str]:
    reasons = []
    if config.min_ssim is not None and ssim is None:
        reasons.append("ssim cannot be computed for an image under 3 pixels on a side (min_ssim is set)")
    elif config.min_ssim is not None and ssim < config.min_ssim:
        reasons.append(f"ssim {ssim:.4f} < min_ssim {config.min_ssim:g}")
    if config.min_psnr is not None and psnr is not None and psnr < config.min_psnr:
        reasons.append(f"psnr {psnr:.2f} dB < min_psnr {config.min_psnr:g}")
    if config.max_histogram_distance is not None and distance is not None and distance > config.max_histogram_distance:
        reasons.append(f"histogram_distance {distance:.4f} > max_histogram_distance {config.max_histogram_distance:g}")
    return reasons
