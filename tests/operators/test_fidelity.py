"""Fidelity columns and thresholds, on batches as the last operator leaves them."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from operators.fidelity import FidelityConfig, compare, fidelity_batch
from operators.images import encode_array


def ramp(width=32, height=32, dtype=np.uint8) -> np.ndarray:
    peak = 255 if dtype == np.uint8 else 65535
    return np.tile(np.linspace(0, peak, width), (height, 1)).astype(dtype)


def batch(outputs, sources, statuses=None, standardize=None) -> pa.Table:
    count = len(outputs)
    columns = {
        "id": [f"r{i}" for i in range(count)],
        "image": pa.array(outputs, pa.binary()),
        "status": statuses or ["ok"] * count,
        "error": pa.array([None] * count, pa.string()),
        "source_image": pa.array(sources, pa.binary()),
    }
    if standardize is not None:
        columns["standardize"] = pa.array(standardize, pa.struct([("histogram_distance", pa.float64())]))
    return pa.table(columns)


def test_identical_images_score_perfectly_and_source_column_is_dropped():
    image = encode_array(ramp())
    out = fidelity_batch(batch([image], [image]), FidelityConfig(), [])
    assert "source_image" not in out.column_names
    assert out.column("ssim")[0].as_py() == pytest.approx(1.0)
    assert math.isinf(out.column("psnr")[0].as_py())
    assert out.column("status").to_pylist() == ["ok"] and out.column("histogram_distance")[0].as_py() is None


def test_bit_depths_and_sizes_compare_fairly():
    ssim, psnr = compare(ramp(64, 64, np.uint16), ramp(32, 32, np.uint8))
    assert ssim > 0.95 and psnr > 35


def test_thresholds_mark_rows_rejected_with_the_reason_and_keep_them():
    rng = np.random.default_rng(0)
    clean = encode_array(ramp())
    noisy = encode_array(rng.integers(0, 256, (32, 32), dtype=np.uint8))
    table = batch([clean, noisy, None], [clean, clean, clean], statuses=["ok", "ok", "error"])
    out = fidelity_batch(table, FidelityConfig(min_ssim=0.5, min_psnr=20), [])
    assert out.column("status").to_pylist() == ["ok", "rejected", "error"]
    reason = out.column("error")[1].as_py()
    assert reason.startswith("ssim ") and "< min_ssim 0.5" in reason and "dB < min_psnr 20" in reason
    assert out.column("image")[1].as_py() == noisy
    assert out.column("ssim")[2].as_py() is None


def test_histogram_distance_comes_from_the_standardize_stage():
    image = encode_array(ramp())
    table = batch(
        [image, image], [image, image], standardize=[{"histogram_distance": 0.05}, {"histogram_distance": 0.4}]
    )
    out = fidelity_batch(table, FidelityConfig(max_histogram_distance=0.1), ["standardize"])
    assert out.column("histogram_distance").to_pylist() == [0.05, 0.4]
    assert out.column("status").to_pylist() == ["ok", "rejected"]
    assert out.column("error")[1].as_py() == "histogram_distance 0.4000 > max_histogram_distance 0.1"


def test_tiny_images_cannot_meet_an_ssim_threshold():
    image = encode_array(ramp(2, 2))
    out = fidelity_batch(batch([image], [image]), FidelityConfig(min_ssim=0.1), [])
    assert out.column("status").to_pylist() == ["rejected"]
    assert "ssim cannot be computed" in out.column("error")[0].as_py()
