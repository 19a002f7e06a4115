"""Throughput and peak memory of a restyle img2img job against a plain in-process diffusers loop.

Both sides push the same N images (scikit-image's photographs, center-cropped to squares of
`--size`, repeated under distinct ids) through the same checkpoint on the same device, in the same
dtype, with the same number of torch threads, steps, strength, guidance, prompt, batch size and
per-image seeds (`operators.base.derive_seed`, as the job derives them). The job's
`model_batch_size` is set to the batch size so that both sides make model calls of the same size
(the job's default on CPU is one row per call).

The plain side runs first, in this process:
  load s          `AutoPipelineForImage2Image.from_pretrained` and `.to(device)`.
  warm-up s       one untimed batch before the timed loop (first-call allocations and kernel
                  choices); reported, but excluded from every plain figure.
  model s         the pipeline calls over all N images, per-image generators included. Inputs are
                  decoded to PIL images beforehand; outputs stay PIL images (not encoded, not written).
  total s         load s + model s.
  peak RSS        `ru_maxrss` of this process after the loop, so it also covers the interpreter and
                  the input images; this process stays light until then, which keeps the figure honest.

The restyle side then runs `jobs.pipeline.run_job` in a freshly spawned process, so nothing the
plain side left in this process is counted against it:
  total s         the job's own wall time (`wall_seconds` of its summary): read the Parquet, start the
                  actor, load the model, run the first batch (the actor has no warm-up), decode,
                  generate, encode PNGs with their metadata and write the shards. Starting Ray and the
                  row accounting and report written after the shards are reported on their own line
                  (ray start s, run_job s) and left out of total s.
  model s         the sum over ok rows of the per-row `img2img.process_seconds` (each row's share of its
                  batch's model calls and PNG encoding), read back from the output Parquet; it includes
                  the actor's first call.
  outside model s total s - model s: actor start-up, model load, reading, decoding, encoding, writing.
  peak RSS        the largest sum of RSS over the job's process and all its descendants (Ray's GCS,
                  raylet, workers and the actor), sampled every 0.2 s. A summed RSS counts shared pages
                  (libraries, the object store) once per process, so it overstates the true footprint.

images/s is ok images divided by a time; the ratios are restyle / plain, so above 1 means the job is
faster. "total" ratios compare what a user waits for, "model" ratios the steady generation speed.
GPU memory is not measured. Run from the repository root:

    .venv/bin/python bench/img2img_throughput.py --num-images 16 --json bench.json
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from jobs.config import JobConfig, validate_config
from jobs.demo import DEMO_IMAGES, skimage_data_dir
from operators.base import derive_seed

logger = logging.getLogger("bench.img2img_throughput")

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIRECTORY = REPOSITORY_ROOT / ".cache" / "models"
PROMPT = "an oil painting"
STRENGTH = 0.6
GUIDANCE_SCALE = 7.5
RUN_SEED = 0
SAMPLE_INTERVAL_SECONDS = 0.2
MEBIBYTE = 1024 * 1024
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every refusal names the option, the value and what is accepted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=32, help="images pushed through each side (default 32)")
    parser.add_argument("--size", type=int, default=128, help="square side in pixels, a multiple of 8 (default 128)")
    parser.add_argument("--steps", type=int, default=4, help="num_inference_steps at strength 1 (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call on both sides (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="weights dtype (default float32)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a local diffusers img2img checkpoint directory (default: the tiny random sd-img2img, built "
        f"into {DEFAULT_MODEL_DIRECTORY.relative_to(REPOSITORY_ROOT)} if missing)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    args = parser.parse_args(argv)
    for option in ("num_images", "steps", "batch_size", "threads"):
        value = getattr(args, option)
        if value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.size < 8 or args.size % 8:
        parser.error(f"--size must be a positive multiple of 8 (the VAE's factor), got {args.size}")
    if args.model is not None and not (args.model / "model_index.json").is_file():
        parser.error(f"--model must be a diffusers checkpoint directory with a model_index.json, got {args.model}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA device, but torch sees none; accepted here: --device cpu")
    return args


def write_benchmark_images(directory: Path, count: int, size: int) -> Path:
    """Write `count` rows (id, image as {bytes, path} PNG) to directory/images.parquet; return its path.

    scikit-image's photographs are center-cropped to squares of `size` pixels, converted to RGB
    and repeated in turn under distinct ids.
    """
    photographs = []
    for file_name, _caption in DEMO_IMAGES:
        with Image.open(skimage_data_dir() / file_name) as image:
            square = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        square.save(buffer, format="PNG")
        photographs.append((Path(file_name).stem, buffer.getvalue()))
    ids, images = [], []
    for index in range(count):
        stem, data = photographs[index % len(photographs)]
        row_id = f"{stem}-{index:05d}"
        ids.append(row_id)
        images.append({"bytes": data, "path": f"{row_id}.png"})
    path = directory / "images.parquet"
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(images, IMAGE_TYPE)}), path)
    return path


def job_config(args: argparse.Namespace, source: Path, sink: Path, model: Path) -> JobConfig:
    """The restyle job that matches the plain loop: one actor, `--threads` CPUs, one CPU kept for I/O."""
    return validate_config(
        {
            "source": {"uri": str(source), "format": "parquet"},
            "operators": [
                {
                    "kind": "img2img",
                    "model": str(model),
                    "prompt": PROMPT,
                    "strength": STRENGTH,
                    "num_inference_steps": args.steps,
                    "guidance_scale": GUIDANCE_SCALE,
                    "batch_size": args.batch_size,
                    "model_batch_size": args.batch_size,
                    "num_actors": 1,
                    "num_cpus": args.threads,
                    "torch_threads": args.threads,
                    "num_gpus": 1 if args.device == "cuda" else 0,
                    "device": args.device,
                    "dtype": args.dtype,
                }
            ],
            "sink": {"uri": str(sink), "mode": "overwrite"},
            "run": {
                "seed": RUN_SEED,
                "resources": {
                    "num_cpus": args.threads + 1,
                    "num_gpus": 1 if args.device == "cuda" else 0,
                    "reserved_cpus": 1,
                },
            },
        },
        source_name="benchmark config",
    )


def generate_batch(pipeline, images: list, seeds: list[int], args: argparse.Namespace) -> list:
    """One plain pipeline call over a batch, with one seeded generator per image."""
    import torch

    return pipeline(
        prompt=[PROMPT] * len(images),
        image=images,
        strength=STRENGTH,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE_SCALE,
        generator=[torch.Generator(device=args.device).manual_seed(seed) for seed in seeds],
        output_type="pil",
    ).images


def run_plain_loop(args: argparse.Namespace, model: Path, source: Path) -> dict:
    """Load the pipeline in this process and generate every image in batches (see module docstring)."""
    import diffusers
    import torch

    table = pq.read_table(source)
    ids = table.column("id").to_pylist()
    images = [Image.open(io.BytesIO(cell["bytes"])).convert("RGB") for cell in table.column("image").to_pylist()]
    seeds = [derive_seed(RUN_SEED, row_id, 0) for row_id in ids]
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    pipeline = diffusers.AutoPipelineForImage2Image.from_pretrained(
        str(model), use_safetensors=True, dtype=getattr(torch, args.dtype)
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(args.device)
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    generate_batch(pipeline, images[: args.batch_size], seeds[: args.batch_size], args)
    warm_up_seconds = time.perf_counter() - started
    logger.info("plain: loaded in %.2f s, warm-up batch %.2f s", load_seconds, warm_up_seconds)

    model_seconds = 0.0
    produced = 0
    for start in range(0, len(images), args.batch_size):
        batch = slice(start, start + args.batch_size)
        started = time.perf_counter()
        produced += len(generate_batch(pipeline, images[batch], seeds[batch], args))
        model_seconds += time.perf_counter() - started
    # ru_maxrss is in KiB on Linux.
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logger.info("plain: %d images in %.2f s of model calls", produced, model_seconds)

    del pipeline
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    total_seconds = load_seconds + model_seconds
    return {
        "images": produced,
        "load_seconds": load_seconds,
        "warm_up_seconds": warm_up_seconds,
        "model_seconds": model_seconds,
        "total_seconds": total_seconds,
        "outside_model_seconds": load_seconds,
        "images_per_second_total": produced / total_seconds,
        "images_per_second_model": produced / model_seconds,
        "peak_rss_bytes": peak_rss_bytes,
    }


class ProcessTreePeakRss:
    """Samples the summed RSS of a process and all its descendants in a background thread."""

    def __init__(self, pid: int, interval_seconds: float = SAMPLE_INTERVAL_SECONDS):
        self.pid = pid
        self.interval_seconds = interval_seconds
        self.peak_bytes = 0
        self.processes_at_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> ProcessTreePeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        """Add one sample; processes that exit while being read are skipped."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        counted = 0
        for process in processes:
            try:
                total += process.memory_info().rss
                counted += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        self.samples += 1
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.processes_at_peak = counted

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_seconds)


def run_restyle_job(config: JobConfig, connection) -> None:
    """Body of the spawned job process: start a local Ray, run the job, send back its figures."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.environ.pop("RAY_ADDRESS", None):
        logger.warning("ignoring RAY_ADDRESS: the benchmark compares against this machine, so Ray runs locally")
    import ray

    from jobs.commits import SinkState
    from jobs.pipeline import run_job, start_ray

    try:
        started = time.perf_counter()
        start_ray(config)
        ray_started = time.perf_counter()
        result = run_job(config)
        finished = time.perf_counter()
        stage_name = config.operators[0].stage_name
        table = SinkState(config.sink).read(["status", stage_name])
        model_seconds = sum(
            stage["process_seconds"]
            for status, stage in zip(
                table.column("status").to_pylist(), table.column(stage_name).to_pylist(), strict=True
            )
            if status == "ok"
        )
        connection.send(
            {
                "summary": result.summary,
                "ray_start_seconds": ray_started - started,
                "run_job_seconds": finished - ray_started,
                "model_seconds": model_seconds,
            }
        )
    except BaseException:
        connection.send({"failure": traceback.format_exc()})
        raise
    finally:
        ray.shutdown()
        connection.close()


def run_restyle(config: JobConfig) -> dict:
    """Run the job in a spawned process while sampling that process tree's RSS (see module docstring)."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=run_restyle_job, args=(config, sender), name="restyle-job")
    process.start()
    sender.close()
    with ProcessTreePeakRss(process.pid) as tree:
        try:
            reply = receiver.recv()
        except EOFError:
            reply = {"failure": f"the job process exited with code {process.exitcode} before reporting"}
        process.join()
    if "failure" in reply:
        raise RuntimeError(f"restyle job failed:\n{reply['failure']}")
    summary = reply["summary"]
    if summary["ok"] != summary["rows_in"]:
        logger.warning("restyle: %d of %d rows failed; see %s", summary["error"], summary["rows_in"], config.sink.uri)
    total_seconds = summary["wall_seconds"]
    model_seconds = reply["model_seconds"]
    return {
        "images": summary["ok"],
        "error_rows": summary["error"],
        "ray_start_seconds": reply["ray_start_seconds"],
        "run_job_seconds": reply["run_job_seconds"],
        "model_seconds": model_seconds,
        "total_seconds": total_seconds,
        "outside_model_seconds": total_seconds - model_seconds,
        "images_per_second_total": summary["ok"] / total_seconds,
        "images_per_second_model": summary["ok"] / model_seconds if model_seconds > 0 else None,
        "peak_rss_bytes": tree.peak_bytes,
        "processes_at_peak_rss": tree.processes_at_peak,
        "rss_samples": tree.samples,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def format_table(settings: dict, plain: dict, restyle: dict, ratios: dict) -> str:
    """The results as a compact fixed-width table with a header naming the settings."""
    header = (
        f"{settings['num_images']} images {settings['size']}x{settings['size']}, {settings['steps']} steps x strength "
        f"{STRENGTH}, guidance {GUIDANCE_SCALE}, batch {settings['batch_size']} (restyle model_batch_size = "
        f"{settings['batch_size']}, as the plain loop), {settings['device']} {settings['dtype']}, "
        f"{settings['threads']} torch thread(s) per side\nmodel: {settings['model']}"
    )
    columns = ("model s", "outside model s", "total s", "img/s total", "img/s model", "peak RSS MiB")
    lines = [header, f"{'side':<8}" + "".join(f"{name:>17}" for name in columns)]
    for name, figures in (("plain", plain), ("restyle", restyle)):
        values = (
            f"{figures['model_seconds']:.2f}",
            f"{figures['outside_model_seconds']:.2f}",
            f"{figures['total_seconds']:.2f}",
            f"{figures['images_per_second_total']:.3f}",
            "n/a" if figures["images_per_second_model"] is None else f"{figures['images_per_second_model']:.3f}",
            f"{figures['peak_rss_bytes'] / MEBIBYTE:.0f}",
        )
        lines.append(f"{name:<8}" + "".join(f"{value:>17}" for value in values))

    def shown(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines.append(
        f"ratio restyle/plain: images/s total {shown(ratios['images_per_second_total'])}, "
        f"images/s model {shown(ratios['images_per_second_model'])}, peak RSS {shown(ratios['peak_rss'])}"
    )
    lines.append(
        f"plain: load {plain['load_seconds']:.2f} s, untimed warm-up batch {plain['warm_up_seconds']:.2f} s; "
        f"restyle: Ray start {restyle['ray_start_seconds']:.2f} s, run_job {restyle['run_job_seconds']:.2f} s "
        f"(total s plus accounting and report), peak RSS over {restyle['processes_at_peak_rss']} processes"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the inputs, run both sides, print the table and optionally write the JSON."""
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is not None:
        model = args.model.resolve()
    else:
        from jobs.tiny_models import make_tiny_models

        model = make_tiny_models(DEFAULT_MODEL_DIRECTORY, names=("sd-img2img",))["sd-img2img"]

    with tempfile.TemporaryDirectory(prefix="restyle-bench-") as scratch:
        scratch = Path(scratch)
        source = write_benchmark_images(scratch, args.num_images, args.size)
        config = job_config(args, source, scratch / "output", model)
        logger.info("wrote %d images of %dx%d to %s", args.num_images, args.size, args.size, source)
        plain = run_plain_loop(args, model, source)
        restyle = run_restyle(config)

    settings = {
        "num_images": args.num_images,
        "size": args.size,
        "steps": args.steps,
        "strength": STRENGTH,
        "guidance_scale": GUIDANCE_SCALE,
        "batch_size": args.batch_size,
        "model_batch_size": args.batch_size,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "model": str(model),
    }
    ratios = {
        "images_per_second_total": ratio(restyle["images_per_second_total"], plain["images_per_second_total"]),
        "images_per_second_model": ratio(restyle["images_per_second_model"], plain["images_per_second_model"]),
        "peak_rss": ratio(restyle["peak_rss_bytes"], plain["peak_rss_bytes"]),
    }
    print(format_table(settings, plain, restyle, ratios))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"settings": settings, "plain": plain, "restyle": restyle, "ratio": ratios}, indent=2) + "\n"
        )
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
