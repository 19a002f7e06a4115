"""PNG encode time and size per zlib compress level, to choose the sink's default level.

Inputs are the RGB photographs that ship in scikit-image's data folder (astronaut, coffee, chelsea,
rocket, motorcycle_left, hubble_deep_field, retina), resized with Lanczos to squares of each
`--sizes` side (512 and 1024 by default). Sources smaller than the side are upscaled, which makes
them somewhat smoother, and so more compressible, than a model's native output of that size.

For every image and size it measures, in this process on one thread:
  ms        Pillow's PNG encode at compress levels 0..9 (the sink's 8-bit path), the median of
            `--repeats` runs, then the mean over the images;
  bytes     the mean size of those PNGs;
  decode ms Pillow's decode (`load()`) of each PNG, the median of the same repeats;
and, for comparison, JPEG quality 95, WebP lossless and WebP quality 90.

The rule for the chosen level, per size: among the levels whose mean size is within 3% of level 6's
(Pillow's default), the fastest (the lowest level on a tie). The overall choice applies the same rule
to the sum over sizes of the mean ms, keeping only levels within 3% at every size.
Prints a table, then one JSON line. Run from the repository root:

    .venv/bin/python bench/encoding.py
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

PHOTOGRAPHS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)
LEVELS = tuple(range(10))
REFERENCE_LEVEL = 6  # Pillow's default
SIZE_TOLERANCE = 0.03
COMPARISONS = {
    "jpeg q95": {"format": "JPEG", "quality": 95},
    "webp lossless": {"format": "WEBP", "lossless": True},
    "webp q90": {"format": "WEBP", "quality": 90},
}


def load_photographs(side: int) -> list[Image.Image]:
    """scikit-image's bundled photographs as RGB, resized to side x side."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    images = []
    for name in PHOTOGRAPHS:
        with Image.open(folder / name) as image:
            images.append(image.convert("RGB").resize((side, side), Image.Resampling.LANCZOS))
    return images


def timed(function, repeats: int) -> tuple[float, object]:
    """The median wall time of `repeats` calls in ms, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def encoder(image: Image.Image, options: dict):
    def encode() -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, **options)
        return buffer.getvalue()

    return encode


def decoder(data: bytes):
    def decode() -> None:
        with Image.open(io.BytesIO(data)) as image:
            image.load()

    return decode


def measure(images: list[Image.Image], options: dict, repeats: int) -> dict:
    """Mean over the images of the median encode ms, the size, and the median decode ms."""
    encode_ms, sizes, decode_ms = [], [], []
    for image in images:
        milliseconds, data = timed(encoder(image, options), repeats)
        encode_ms.append(milliseconds)
        sizes.append(len(data))
        decode_ms.append(timed(decoder(data), repeats)[0])
    return {
        "ms": round(statistics.mean(encode_ms), 2),
        "bytes": round(statistics.mean(sizes)),
        "decode_ms": round(statistics.mean(decode_ms), 2),
    }


def choose_level(ms: dict[int, float], sizes: list[dict[int, int]]) -> int:
    """The fastest level whose mean size is within SIZE_TOLERANCE of level 6's at every size."""
    eligible = [
        level for level in LEVELS if all(size[level] <= size[REFERENCE_LEVEL] * (1 + SIZE_TOLERANCE) for size in sizes)
    ]
    return min(eligible, key=lambda level: (ms[level], level))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="square sides in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="runs per image and setting; the median is kept")
    args = parser.parse_args()

    results: dict[str, dict] = {}
    lines = [f"PNG encode (Pillow {PIL.__version__}, one thread, mean over {len(PHOTOGRAPHS)} photographs)"]
    for side in args.sizes:
        images = load_photographs(side)
        levels = {level: measure(images, {"format": "PNG", "compress_level": level}, args.repeats) for level in LEVELS}
        others = {name: measure(images, options, args.repeats) for name, options in COMPARISONS.items()}
        chosen = choose_level({lv: levels[lv]["ms"] for lv in LEVELS}, [{lv: levels[lv]["bytes"] for lv in LEVELS}])
        results[str(side)] = {"levels": levels, "chosen_level": chosen, "comparison": others}

        reference = levels[REFERENCE_LEVEL]
        lines.append(f"\n{side}x{side} RGB")
        lines.append(f"{'setting':<16}{'encode ms':>11}{'KiB':>9}{'size/L6':>9}{'time/L6':>9}{'decode ms':>11}")
        rows = [(f"png level {lv}", figures) for lv, figures in levels.items()] + list(others.items())
        for name, figures in rows:
            marker = " <- chosen" if name == f"png level {chosen}" else ""
            lines.append(
                f"{name:<16}{figures['ms']:>11.1f}{figures['bytes'] / 1024:>9.0f}"
                f"{figures['bytes'] / reference['bytes']:>9.3f}{figures['ms'] / reference['ms']:>9.3f}"
                f"{figures['decode_ms']:>11.1f}{marker}"
            )

    total_ms = {lv: sum(results[str(side)]["levels"][lv]["ms"] for side in args.sizes) for lv in LEVELS}
    sizes = [{lv: results[str(side)]["levels"][lv]["bytes"] for lv in LEVELS} for side in args.sizes]
    overall = choose_level(total_ms, sizes)
    lines.append(
        f"\nchosen level over all sizes: {overall} (fastest level whose mean size is within "
        f"{SIZE_TOLERANCE:.0%} of level {REFERENCE_LEVEL}'s at every size)"
    )
    print("\n".join(lines))
    summary = {
        **results,
        "chosen_level": overall,
        "pillow": PIL.__version__,
        "photographs": len(PHOTOGRAPHS),
        "repeats": args.repeats,
        "numpy": np.__version__,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
