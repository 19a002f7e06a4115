"""Accelerator duty cycle: the in-actor pattern against restyle's prepare / model / finish split.

Both sides push the same N inputs (scikit-image's photographs, center-cropped to squares of
`--input-side` pixels so the resize to the model's 512 is real work, repeated under distinct ids,
alternately stored as JPEG quality 95 and PNG in one Parquet file of `id` and `image` bytes) through
a simulated accelerator: a call that holds its actor for a fixed time per image with `time.sleep`,
which releases the GIL as a process waiting on its GPU does. The CPU work around it is real: decode,
RGB conversion, bicubic resize to the model size (img2img's size policy, `size.max_side: 512`), and a
PNG encode of the 512x512 output with its parameters text at the sink's default encoding
(`operators.images.EncodingConfig()`).

First the script measures c, that CPU work per image: the median over the inputs of decode + resize
+ encode, in this process, single-threaded (wall time, as an actor experiences it under the load of
the machine; the CPU time is shown beside it). The simulated time per image t is c unless
`--accelerator-ms` sets it, so the in-actor pattern is about half busy on any machine; with
`--also-h100` (the default) a second pair of runs uses t = 35 ms, the arithmetic floor of SD 1.5
img2img at 512x512 on an H100.

  naive    a plain Ray Data pipeline: `read_parquet` -> `map_batches` over one actor
           (`ActorPoolStrategy(size=1)`, 1 CPU) that decodes and resizes its batch, makes the
           simulated call for the batch, then PNG-encodes the outputs, in series -> `write_parquet`.
  restyle  `jobs.pipeline.run_job` on an img2img job with one actor whose model step is replaced by
           `SimulatedImg2Img`: no model is loaded and the pipeline is a stand-in that sleeps for
           t x its images and returns its inputs. The actor reserves `--actor-cpus` (0.25 by default:
           it uses no CPU while it sleeps, as a GPU actor mostly waits on its GPU); decoding, resizing
           and encoding run as restyle's own prepare and finish tasks around it.

Each side runs in a freshly spawned process with its own local Ray instance of `--ray-cpus` CPUs
(default: all of this machine's); Ray's start-up is outside the figures.
  busy       the accelerator actor's busy fraction: the summed duration of its simulated calls over
             the span from the start of its first call to the end of its last (each call appends its
             time.time() interval to a file that this process reads back).
  images/s   ok output rows / the accelerator's span (first call start to last call end): the steady
             rate, over the same window as the busy fraction, without the fixed costs of starting
             workers and loading (before the first call) and of the last encodes and writes (after
             the last), which a job of millions of rows pays once.
  speedup    restyle images/s / naive images/s.
  end to end ok output rows / the job's wall time, on both sides from building the dataset (after
             Ray started) to the last output written (restyle's is its summary's `wall_seconds`), with
             the time before the first and after the last call shown apart; JSON keys
             `*_end_to_end_images_per_s` and `end_to_end_speedup`.

Run from the repository root (the tiny sd-img2img checkpoint, which restyle vets but never loads
here, is built into .cache/models if missing):

    .venv/bin/python bench/duty_cycle.py --images 32
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from measure import in_spawned_process, prepare_spawned_side, send_reply
from PIL import Image, ImageOps

from jobs.config import JobConfig, validate_config
from jobs.demo import DEMO_IMAGES, skimage_data_dir
from operators.diffusion import a1111_parameters
from operators.images import EncodingConfig, decode_eight_bit_rgb, encode_output, fit_size
from operators.img2img import Img2Img
from operators.rows import derive_seed

logger = logging.getLogger("bench.duty_cycle")

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIRECTORY = REPOSITORY_ROOT / ".cache" / "models"
MODEL_SIDE = 512
MULTIPLE_OF = 8
H100_FLOOR_MS = 35.0
PROMPT = "an oil painting"
STRENGTH = 0.5
STEPS = 30
SCHEDULER = "PNDMScheduler"
RUN_SEED = 0
JPEG_QUALITY = 95


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every refusal names the option, the value and what is accepted."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="inputs pushed through each side (default 256)")
    parser.add_argument(
        "--input-side", type=int, default=640, help=f"stored square side, above {MODEL_SIDE} (default 640)"
    )
    parser.add_argument(
        "--accelerator-ms", type=float, default=None, help="simulated accelerator time per image (default: c)"
    )
    parser.add_argument(
        "--also-h100",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also run both sides at t = {H100_FLOOR_MS:g} ms (default on)",
    )
    parser.add_argument("--batch-size", type=int, default=4, help="rows per batch on both sides (default 4)")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of each local Ray instance (default: all)")
    parser.add_argument(
        "--actor-cpus", type=float, default=0.25, help="CPUs restyle's simulated accelerator actor reserves"
    )
    parser.add_argument(
        "--cpu-step-cpus", type=float, default=None, help="restyle run.resources.cpu_step_cpus (default: restyle's)"
    )
    parser.add_argument(
        "--reserved-cpus", type=float, default=None, help="restyle run.resources.reserved_cpus (default: restyle's)"
    )
    parser.add_argument("--read-blocks", type=int, default=None, help="restyle source.read_blocks (default: restyle's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON to this path")
    args = parser.parse_args(argv)
    for option in ("images", "batch_size"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    if args.input_side <= MODEL_SIDE:
        parser.error(f"--input-side must be above {MODEL_SIDE}, so the resize is real work, got {args.input_side}")
    if args.accelerator_ms is not None and args.accelerator_ms <= 0:
        parser.error(f"--accelerator-ms must be above 0, got {args.accelerator_ms}")
    if args.actor_cpus <= 0:
        parser.error(f"--actor-cpus must be above 0, got {args.actor_cpus}")
    return args


def write_inputs(directory: Path, count: int, side: int) -> tuple[Path, list[bytes]]:
    """Write `count` rows (id, image bytes) to directory/inputs.parquet; return its path and the bytes.

    Each photograph is center-cropped to `side` x `side` RGB and stored both as JPEG and as PNG; row i
    takes photograph i mod 8, as JPEG in even rounds of the 8 and as PNG in odd ones, so half the rows
    are of each format and every photograph appears in both."""
    encoded = []
    for file_name, _caption in DEMO_IMAGES:
        with Image.open(skimage_data_dir() / file_name) as image:
            square = ImageOps.fit(image.convert("RGB"), (side, side), method=Image.Resampling.BICUBIC)
        forms = {}
        for image_format, options in (("jpeg", {"quality": JPEG_QUALITY}), ("png", {})):
            buffer = io.BytesIO()
            square.save(buffer, format=image_format.upper(), **options)
            forms[image_format] = buffer.getvalue()
        encoded.append((Path(file_name).stem, forms))
    ids, images = [], []
    for index in range(count):
        stem, forms = encoded[index % len(encoded)]
        image_format = "jpeg" if (index // len(encoded)) % 2 == 0 else "png"
        ids.append(f"{stem}-{image_format}-{index:05d}")
        images.append(forms[image_format])
    path = directory / "inputs.parquet"
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(images, pa.binary())}), path)
    return path, images


def prepare_image(data: bytes) -> np.ndarray:
    """Decode to 8-bit RGB and resize to the model size, bicubic, as img2img's prepare step does."""
    image = decode_eight_bit_rgb(data)
    size = fit_size(*image.size, MODEL_SIDE, MULTIPLE_OF)
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    return np.asarray(image)


def parameters_text(row_id: str, array: np.ndarray) -> str:
    """A parameters text of the form and length img2img writes."""
    return a1111_parameters(
        PROMPT,
        None,
        {
            "Steps": STEPS,
            "Sampler": "PLMS",
            "CFG scale": 7.5,
            "Seed": derive_seed(RUN_SEED, row_id, 0),
            "Size": f"{array.shape[1]}x{array.shape[0]}",
            "Model hash": "0123456789",
            "Model": "sd-img2img",
            "Denoising strength": STRENGTH,
        },
    )


def finish_image(row_id: str, array: np.ndarray) -> bytes:
    """PNG-encode an output with its parameters text at the sink's default encoding."""
    return encode_output(array, EncodingConfig(), parameters_text(row_id, array))


def measure_cpu_work(images: list[bytes]) -> tuple[float, float]:
    """Median seconds of decode + resize + encode per input: (wall, CPU time of this thread)."""
    walls, cpus = [], []
    for index, data in enumerate(images):
        wall, cpu = time.perf_counter(), time.thread_time()
        finish_image(f"measure-{index}", prepare_image(data))
        cpus.append(time.thread_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus)


def simulated_call(seconds_per_image: float, count: int, interval_log: str) -> None:
    """Hold this process for `seconds_per_image` x `count` without the GIL, then log the interval."""
    start = time.time()
    time.sleep(seconds_per_image * count)
    end = time.time()
    with open(interval_log, "a") as handle:
        handle.write(f"{start!r} {end!r} {count}\n")


def read_intervals(interval_log: Path) -> list[tuple[float, float]]:
    """The (start, end) of every simulated call logged so far."""
    if not interval_log.exists():
        return []
    lines = interval_log.read_text().splitlines()
    return [(float(start), float(end)) for start, end, _ in (line.split() for line in lines)]


def busy_fraction(intervals: list[tuple[float, float]]) -> float | None:
    """Time inside the calls over the span from the first call's start to the last call's end."""
    if not intervals:
        return None
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    return sum(end - start for start, end in intervals) / span if span > 0 else None


class NaiveActor:
    """The in-actor pattern: decode + resize, the model call and the PNG encode of a batch, in series."""

    def __init__(self, seconds_per_image: float, interval_log: str):
        import torch  # noqa: F401  (a model actor imports torch at set-up, as restyle's does)

        self.seconds_per_image = seconds_per_image
        self.interval_log = interval_log

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_pylist()
        arrays = [prepare_image(data) for data in batch.column("image").to_pylist()]
        simulated_call(self.seconds_per_image, len(arrays), self.interval_log)
        outputs = [finish_image(row_id, array) for row_id, array in zip(ids, arrays, strict=True)]
        return pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(outputs, pa.binary())})


class SimulatedPipeline:
    """Stands in for a diffusers pipeline on an accelerator: sleeps t per image, returns its inputs."""

    def __init__(self, seconds_per_image: float, interval_log: str):
        self.seconds_per_image = seconds_per_image
        self.interval_log = interval_log
        self.scheduler = type(SCHEDULER, (), {})()  # named as the checkpoint's, for the parameters text

    def __call__(self, **arguments) -> SimpleNamespace:
        images = arguments["image"]
        simulated_call(self.seconds_per_image, len(images), self.interval_log)
        return SimpleNamespace(images=list(images))


class SimulatedImg2Img(Img2Img):
    """img2img with its model step's pipeline replaced by `SimulatedPipeline`; nothing is loaded. The
    spawned job process sets the two class attributes before the job plans its stages."""

    seconds_per_image: ClassVar[float] = 0.0
    interval_log: ClassVar[str] = ""

    def resolve(self):
        """The checkpoint as restyle names it, unvetted (the job vets it before it starts)."""
        from operators.models import ResolvedModel, model_fingerprint

        path = Path(self.config.model)
        return ResolvedModel(path, self.config.model, model_fingerprint(path))

    def load(self) -> tuple:
        """The simulated pipeline and the knobs' record; the rest of the actor's set-up is restyle's
        own. torch is imported, as a model actor's is (the model step makes torch generators);
        diffusers is not, which only loading a pipeline needs."""
        import torch  # noqa: F401

        from operators.acceleration import speed_record

        return SimulatedPipeline(self.seconds_per_image, self.interval_log), speed_record(self.config)


def job_config(args: argparse.Namespace, source: Path, sink: Path, model: Path) -> JobConfig:
    """restyle's side: one img2img actor at `--actor-cpus`, model calls of a whole batch (as on cuda)."""
    resources: dict = {}
    if args.ray_cpus is not None:
        resources["num_cpus"] = args.ray_cpus
    if args.cpu_step_cpus is not None:
        resources["cpu_step_cpus"] = args.cpu_step_cpus
    if args.reserved_cpus is not None:
        resources["reserved_cpus"] = args.reserved_cpus
    source_config: dict = {"uri": str(source), "format": "parquet"}
    if args.read_blocks is not None:
        source_config["read_blocks"] = args.read_blocks
    return validate_config(
        {
            "source": source_config,
            "operators": [
                {
                    "kind": "img2img",
                    "model": str(model),
                    "prompt": PROMPT,
                    "strength": STRENGTH,
                    "num_inference_steps": STEPS,
                    "size": {"max_side": MODEL_SIDE},
                    "batch_size": args.batch_size,
                    "model_batch_size": args.batch_size,
                    "num_actors": 1,
                    "num_cpus": args.actor_cpus,
                    "num_gpus": 0,
                }
            ],
            "sink": {"uri": str(sink), "mode": "overwrite"},
            "run": {"seed": RUN_SEED, "resources": resources},
        },
        source_name="duty-cycle benchmark config",
    )


def run_naive(source: Path, sink: Path, interval_log: Path, seconds: float, args: argparse.Namespace) -> dict:
    """The naive side, in a spawned process (see module docstring)."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=True)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        started, began = time.perf_counter(), time.time()
        dataset = ray.data.read_parquet(str(source)).map_batches(
            NaiveActor,
            fn_constructor_kwargs={"seconds_per_image": seconds, "interval_log": str(interval_log)},
            compute=ActorPoolStrategy(size=1),
            batch_size=args.batch_size,
            batch_format="pyarrow",
            num_cpus=1,
        )
        dataset.write_parquet(str(sink))
        wall_seconds, ended = time.perf_counter() - started, time.time()
    finally:
        ray.shutdown()
    ok = pq.read_table(sink, columns=["id"]).num_rows
    return {"ok": ok, "wall_seconds": wall_seconds, "began": began, "ended": ended}


def run_restyle(config: JobConfig, interval_log: Path, seconds: float) -> dict:
    """The restyle side, in a spawned process: register `SimulatedImg2Img` for img2img, run the job."""
    import ray

    import operators
    from jobs.pipeline import run_job, start_ray
    from operators.img2img import Img2ImgConfig
    from operators.models import require_vetted_models

    SimulatedImg2Img.seconds_per_image = seconds
    SimulatedImg2Img.interval_log = str(interval_log)
    operators.OPERATORS[Img2ImgConfig] = SimulatedImg2Img
    # Vetted once here, so the second vetting in run_job is quick: it lies outside `wall_seconds`, and
    # the time before the first call should leave it out too.
    require_vetted_models(config.operators, config.run.offline)
    start_ray(config)
    try:
        began = time.time()
        summary = run_job(config).summary
    finally:
        ray.shutdown()
    # The job's wall time starts after it opened its sink (a fraction of a second here) and ends when
    # the last shard is written, before its row accounting and report.
    return {
        "ok": summary["ok"],
        "error": summary["error"],
        "wall_seconds": summary["wall_seconds"],
        "began": began,
        "ended": began + summary["wall_seconds"],
    }


def _child(target, arguments: tuple, connection) -> None:
    prepare_spawned_side(logger)
    send_reply(connection, lambda: target(*arguments))


def run_in_spawned_process(target, *arguments) -> dict:
    """`target(*arguments)` in a fresh spawned process; its returned dict."""
    return in_spawned_process(_child, (target, arguments), target.__name__)[0]


def run_pair(args: argparse.Namespace, scratch: Path, source: Path, model: Path, seconds: float, label: str) -> dict:
    """Both sides at one simulated time per image; their figures."""
    figures = {}
    for side in ("naive", "restyle"):
        interval_log = scratch / f"{label}-{side}-intervals.txt"
        sink = scratch / f"{label}-{side}-output"
        load_before = os.getloadavg()[0]
        logger.info("%s at t = %.1f ms: running", side, seconds * 1000)
        if side == "naive":
            reply = run_in_spawned_process(run_naive, source, sink, interval_log, seconds, args)
        else:
            reply = run_in_spawned_process(run_restyle, job_config(args, source, sink, model), interval_log, seconds)
        intervals = read_intervals(interval_log)
        first = min(start for start, _ in intervals)
        last = max(end for _, end in intervals)
        figures[side] = {
            **reply,
            "busy": busy_fraction(intervals),
            "calls": len(intervals),
            "images_per_s": reply["ok"] / reply["wall_seconds"],
            "span_images_per_s": reply["ok"] / (last - first),
            "before_first_call_seconds": first - reply["began"],
            "after_last_call_seconds": reply["ended"] - last,
            "load_average": (load_before, os.getloadavg()[0]),
        }
    return figures


def summary_keys(cpu_seconds: float, seconds: float, figures: dict) -> dict:
    """The JSON keys of one pair of runs."""
    naive, restyle = figures["naive"], figures["restyle"]
    return {
        "cpu_ms_per_image": round(cpu_seconds * 1000, 2),
        "accelerator_ms_per_image": round(seconds * 1000, 2),
        "naive_busy": None if naive["busy"] is None else round(naive["busy"], 3),
        "restyle_busy": None if restyle["busy"] is None else round(restyle["busy"], 3),
        "naive_images_per_s": round(naive["span_images_per_s"], 3),
        "restyle_images_per_s": round(restyle["span_images_per_s"], 3),
        "speedup": round(restyle["span_images_per_s"] / naive["span_images_per_s"], 3),
        "naive_end_to_end_images_per_s": round(naive["images_per_s"], 3),
        "restyle_end_to_end_images_per_s": round(restyle["images_per_s"], 3),
        "end_to_end_speedup": round(restyle["images_per_s"] / naive["images_per_s"], 3),
    }


def format_table(runs: list[tuple[str, float, dict]]) -> str:
    """Every pair of runs side by side."""
    columns = [(f"{label} {side}", figures[side]) for label, _, figures in runs for side in ("naive", "restyle")]
    width = max(16, *(len(name) + 2 for name, _ in columns))
    rows = [
        ("t ms/image", [f"{seconds * 1000:.1f}" for _, seconds, _ in runs for _ in (0, 1)]),
        ("busy fraction", ["n/a" if f["busy"] is None else f"{f['busy']:.3f}" for _, f in columns]),
        ("images/s", [f"{f['span_images_per_s']:.2f}" for _, f in columns]),
        ("  end to end", [f"{f['images_per_s']:.2f}" for _, f in columns]),
        ("wall s", [f"{f['wall_seconds']:.2f}" for _, f in columns]),
        ("  to 1st call s", [f"{f['before_first_call_seconds']:.2f}" for _, f in columns]),
        ("  after last s", [f"{f['after_last_call_seconds']:.2f}" for _, f in columns]),
        ("ok rows", [str(f["ok"]) for _, f in columns]),
        ("model calls", [str(f["calls"]) for _, f in columns]),
        ("load avg 1 min", [f"{f['load_average'][0]:.1f}-{f['load_average'][1]:.1f}" for _, f in columns]),
    ]
    lines = [f"{'':<16}" + "".join(f"{name:>{width}}" for name, _ in columns)]
    lines += [f"{name:<16}" + "".join(f"{value:>{width}}" for value in values) for name, values in rows]
    for label, _, figures in runs:
        steady = figures["restyle"]["span_images_per_s"] / figures["naive"]["span_images_per_s"]
        whole = figures["restyle"]["images_per_s"] / figures["naive"]["images_per_s"]
        lines.append(f"{label}: restyle / naive images/s = {steady:.2f}x ({whole:.2f}x end to end)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the inputs, measure c, run both sides at t = c (or --accelerator-ms) and 35 ms, print."""
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from jobs.tiny_models import make_tiny_models

    model = make_tiny_models(DEFAULT_MODEL_DIRECTORY, names=("sd-img2img",))["sd-img2img"]
    with tempfile.TemporaryDirectory(prefix="restyle-duty-cycle-") as scratch:
        scratch = Path(scratch)
        source, images = write_inputs(scratch, args.images, args.input_side)
        cpu_wall, cpu_thread = measure_cpu_work(images)
        logger.info("c = %.1f ms per image (median wall; %.1f ms CPU time)", cpu_wall * 1000, cpu_thread * 1000)
        seconds = args.accelerator_ms / 1000 if args.accelerator_ms is not None else cpu_wall
        label = "t=c" if args.accelerator_ms is None else "t=set"
        runs = [(label, seconds, run_pair(args, scratch, source, model, seconds, label))]
        if args.also_h100:
            floor = H100_FLOOR_MS / 1000
            runs.append(("t=35ms", floor, run_pair(args, scratch, source, model, floor, "t=35ms")))

    cpus = args.ray_cpus or os.cpu_count()
    print(
        f"{args.images} inputs {args.input_side}x{args.input_side} (half JPEG q{JPEG_QUALITY}, half PNG) -> "
        f"{MODEL_SIDE}x{MODEL_SIDE} PNG at {EncodingConfig().describe()}, batch {args.batch_size}, "
        f"{cpus} Ray CPUs on {os.cpu_count()} cores; restyle actor {args.actor_cpus:g} CPU\n"
        f"c = {cpu_wall * 1000:.1f} ms per image (median wall of decode + resize + encode, single thread; "
        f"{cpu_thread * 1000:.1f} ms CPU time)"
    )
    print(format_table(runs))
    result = summary_keys(cpu_wall, runs[0][1], runs[0][2])
    if args.also_h100:
        result["h100_floor"] = summary_keys(cpu_wall, runs[1][1], runs[1][2])
    result.update(images=args.images, cpus=cpus, load_average_1min=round(os.getloadavg()[0], 2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
