"""Throughput and peak memory of a restyle img2img job against a plain in-process diffusers loop.

For each count in `--num-images` (default 64, 256 and 1024), both sides push the same images
(scikit-image's photographs, center-cropped to squares of `--size`, stored as PNG in one Parquet
file, repeated under distinct ids) through the same checkpoint on the same device and dtype, with
the same steps, strength, guidance, prompt, model-call size and per-image seeds
(`operators.base.derive_seed`, as the job derives them). Each side runs in its own freshly spawned
process, so neither is charged for what the other left behind, and both are given every core of
this machine: the plain side as torch threads (`--threads`, default all), the restyle side as its
local Ray's CPUs, with the actor's torch threads at what it reserves (`--restyle-threads`, default
the actor's CPUs: on a machine this small the CPU steps and Ray's own processes share the cores with
the actor, and torch's thread team then waits on whichever thread the system paused; measured here,
a 2-thread call of the tiny model took 70 ms alone, 130 ms beside 40% of a core of other work, and
a 1-thread call 110 and 115 ms).

The plain side is what a user would write without restyle, one process end to end:
  load s          import torch and diffusers, `AutoPipelineForImage2Image.from_pretrained`, `.to(device)`.
  prepare s       decode each input and resize it as the job does (`operators.img2img.decode_rgb`).
  model s         the pipeline calls, `--batch-size` images each, with one seeded generator per image.
  finish s        encode each output at restyle's default sink encoding (`EncodingConfig()`, through
                  `encode_output`) with its AUTOMATIC1111 parameters text, then write them to Parquet.
  total s         from before the imports to the written file: everything above.

The restyle side runs `jobs.pipeline.start_ray` then `jobs.pipeline.run_job`, with the settings a
user of this machine would choose (see `job_config`): one actor reserving the CPUs that are not kept
for reads and writes, torch using every core, the prepare and finish steps as Ray Data tasks at
`run.resources.cpu_step_cpus`, and `model_batch_size` equal to the plain side's batch (on cpu a
batch above one changes bytes against batch one; both sides make calls of the same size).
  load s          starting the private local Ray instance.
  prepare/model/finish s  the sums over ok rows of the stage's per-row `prepare_seconds`,
                  `model_seconds` and `finish_seconds`, read back from the output Parquet. The prepare
                  and finish steps run as tasks beside the actor, so these overlap each other and the
                  model calls; model s is the actor's busy time.
  total s         Ray start plus `run_job` (read, actor start-up and model load, the three steps,
                  writing, and the row accounting and report); `run_job` splits into the pipeline
                  (`wall_seconds` of its summary) and the rest, "accounting s": inspecting the source
                  and opening the sink before it, the row accounting, manifest and report after it.
  actor idle s    total s - Ray start - model s: what the one actor spends not generating (its start,
                  the model load, waiting for the first prepared batch and on the last finish tasks).

Peak memory is the largest unique set size (psutil `memory_full_info().uss`, pages no other process
maps) summed over the side's process and all its descendants (for restyle: Ray's GCS, raylet,
workers and the actor), sampled every 0.5 s (reading one process's unique set size costs about 3 ms of
CPU, so a denser sampling of restyle's dozen processes would take CPU from the side it measures more
than from the plain side's one process). Summed RSS would count shared libraries and the object
store once per process. GPU memory is not measured.

images/s is ok images / total s; the ratios are restyle / plain, so above 1 means restyle is faster
or uses more memory. Beside each ratio stands the bound that Ray alone sets, whatever restyle does
inside it:
  ceiling   images/s: plain total s / (plain total s + restyle's Ray start s), the ratio restyle
            would reach if starting its local Ray were its only cost beyond the plain loop's own
            imports, load, model calls and encodes (its actor pays those same imports and that load
            after Ray has started: the actor's process does not exist before).
  floor     peak USS: (plain peak + Ray's own processes at restyle's peak) / plain peak, the ratio
            restyle would reach if its driver, CPU workers and actor cost nothing beyond the plain
            process. Ray's own: GCS, raylet, the dashboard, runtime-env and log monitor processes,
            the autoscaler monitor, and Ray Data's `_StatsActor`, `_AutoscalingCoordinatorActor` and
            `ActorLocationTracker` (all there whatever the job).

The script prints a table per count, then one JSON line with `images`, `ratio_images_per_s` and
`ratio_memory` (lists, one entry per count), the bounds (`ceiling_ratio_images_per_s`,
`floor_ratio_memory`, `ray_own_uss_mib`) and the details. The machine's
load average is reported with the figures: other work on the CPUs makes them noisy. Run from the
repository root:

    .venv/bin/python bench/img2img_throughput.py --num-images 64 256 1024
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
from measure import MEBIBYTE, in_spawned_process
from PIL import Image, ImageOps

from jobs.config import JobConfig, validate_config
from jobs.demo import DEMO_IMAGES, skimage_data_dir
from operators.base import derive_seed

logger = logging.getLogger("bench.img2img_throughput")

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIRECTORY = REPOSITORY_ROOT / ".cache" / "models"
DEFAULT_COUNTS = (64, 256, 1024)
PROMPT = "an oil painting"
STRENGTH = 0.6
GUIDANCE_SCALE = 7.5
RUN_SEED = 0
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every refusal names the option, the value and what is accepted."""
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--num-images",
        type=int,
        nargs="+",
        default=list(DEFAULT_COUNTS),
        help="image counts, one run of each side per count (default 64 256 1024)",
    )
    parser.add_argument("--size", type=int, default=128, help="square side in pixels, a multiple of 8 (default 128)")
    parser.add_argument("--steps", type=int, default=4, help="num_inference_steps at strength 1 (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per model call on both sides (default 4)")
    parser.add_argument(
        "--threads", type=int, default=cores, help=f"torch threads of the plain side (default: every core, {cores})"
    )
    parser.add_argument(
        "--restyle-threads",
        type=int,
        default=None,
        help="torch threads of restyle's actor (default: the CPUs it reserves)",
    )
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
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON line's figures to this path")
    args = parser.parse_args(argv)
    for count in args.num_images:
        if count < 1:
            parser.error(f"--num-images takes counts of at least 1, got {count}")
    for option in ("steps", "batch_size", "threads", "restyle_threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
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
    """The restyle job a user of this machine would run: Ray gets every core; one CPU is kept for
    reads and writes (`reserved_cpus`, the default and the least); one actor reserves the rest
    (`num_cpus`) and runs torch on as many threads (`torch_threads`; `--restyle-threads` sets
    another count); `batch_size` and `model_batch_size` are the plain side's batch. With a GPU, the
    actor takes it and one CPU."""
    cores = os.cpu_count() or 1
    cuda = args.device == "cuda"
    reserved = 1
    actor_cpus = 1 if cuda else max(cores - reserved, 1)
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
                    "num_cpus": actor_cpus,
                    "torch_threads": args.restyle_threads or actor_cpus,
                    "num_gpus": 1 if cuda else 0,
                    "device": args.device,
                    "dtype": args.dtype,
                }
            ],
            "sink": {"uri": str(sink), "mode": "overwrite"},
            "run": {
                "seed": RUN_SEED,
                "resources": {
                    "num_cpus": max(cores, actor_cpus + reserved),
                    "num_gpus": 1 if cuda else 0,
                    "reserved_cpus": reserved,
                },
            },
        },
        source_name="benchmark config",
    )


def run_plain_side(args: argparse.Namespace, model: Path, source: Path, output: Path, connection) -> None:
    """Body of the plain side's spawned process (see module docstring); sends back its figures."""
    try:
        connection.send(plain_loop(args, model, source, output))
    except BaseException:
        connection.send({"failure": traceback.format_exc()})
        raise
    finally:
        connection.close()


def plain_loop(args: argparse.Namespace, model: Path, source: Path, output: Path) -> dict:
    """Load, then per batch decode and resize, generate and encode; write the outputs to Parquet."""
    started = time.perf_counter()
    import diffusers
    import numpy as np
    import torch

    from operators.diffusion import SizePolicy, a1111_parameters
    from operators.images import DEFAULT_MAX_IMAGE_PIXELS, EncodingConfig, encode_output
    from operators.img2img import decode_rgb

    torch.set_num_threads(args.threads)
    pipeline = diffusers.AutoPipelineForImage2Image.from_pretrained(
        str(model), use_safetensors=True, dtype=getattr(torch, args.dtype)
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(args.device)
    load_seconds = time.perf_counter() - started

    table = pq.read_table(source)
    ids = table.column("id").to_pylist()
    cells = table.column("image").to_pylist()
    size_policy = SizePolicy()  # the job's default, as job_config leaves it
    decoder = SimpleNamespace(max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
    encoding = EncodingConfig()  # the sink's default
    prepare_seconds = model_seconds = finish_seconds = 0.0
    encoded: list[bytes] = []
    for start in range(0, len(ids), args.batch_size):
        batch_ids = ids[start : start + args.batch_size]
        mark = time.perf_counter()
        images = [decode_rgb(decoder, cell["bytes"], size_policy) for cell in cells[start : start + args.batch_size]]
        seeds = [derive_seed(RUN_SEED, row_id, 0) for row_id in batch_ids]
        prepare_seconds += time.perf_counter() - mark
        mark = time.perf_counter()
        outputs = pipeline(
            prompt=[PROMPT] * len(images),
            image=images,
            strength=STRENGTH,
            num_inference_steps=args.steps,
            guidance_scale=GUIDANCE_SCALE,
            generator=[torch.Generator(device=args.device).manual_seed(seed) for seed in seeds],
            output_type="pil",
        ).images
        model_seconds += time.perf_counter() - mark
        mark = time.perf_counter()
        for seed, image in zip(seeds, outputs, strict=True):
            fields = {
                "Steps": args.steps,
                "CFG scale": GUIDANCE_SCALE,
                "Seed": seed,
                "Size": f"{image.width}x{image.height}",
                "Model": str(model),
                "Denoising strength": STRENGTH,
            }
            text = a1111_parameters(PROMPT, None, fields)
            encoded.append(encode_output(np.asarray(image.convert("RGB")), encoding, text))
        finish_seconds += time.perf_counter() - mark
    mark = time.perf_counter()
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(encoded, pa.binary())}), output)
    finish_seconds += time.perf_counter() - mark
    total_seconds = time.perf_counter() - started
    return {
        "images": len(encoded),
        "load_seconds": load_seconds,
        "prepare_seconds": prepare_seconds,
        "model_seconds": model_seconds,
        "finish_seconds": finish_seconds,
        "total_seconds": total_seconds,
        "encoding": encoding.describe(),
        "torch_threads": torch.get_num_threads(),
    }


def run_restyle_side(config: JobConfig, connection) -> None:
    """Body of the restyle side's spawned process: start a local Ray, run the job, send back its figures."""
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
        stages = [
            stage
            for status, stage in zip(
                table.column("status").to_pylist(), table.column(stage_name).to_pylist(), strict=True
            )
            if status == "ok"
        ]
        sums = {
            f"{step}_seconds": sum(stage[f"{step}_seconds"] or 0.0 for stage in stages)
            for step in ("prepare", "model", "finish")
        }
        connection.send(
            {
                "summary": result.summary,
                "ray_start_seconds": ray_started - started,
                "run_job_seconds": finished - ray_started,
                "encoding": stages[0]["encoding"] if stages else None,
                "torch_threads": stages[0]["torch_threads"] if stages else None,
                **sums,
            }
        )
    except BaseException:
        connection.send({"failure": traceback.format_exc()})
        raise
    finally:
        ray.shutdown()
        connection.close()


def run_side(target, arguments: tuple, name: str) -> dict:
    """Run `target(*arguments, connection)` in a spawned process while sampling that process tree's
    unique set size; return its reply with the peak added. A failure on that side raises."""
    reply, tree = in_spawned_process(target, arguments, name, sample_memory=True)
    reply.update(
        peak_uss_bytes=tree.peak_bytes,
        processes_at_peak=tree.processes_at_peak,
        uss_mib_at_peak_by_process=tree.breakdown_at_peak,
        uss_samples=tree.samples,
    )
    return reply


def restyle_figures(reply: dict, config: JobConfig) -> dict:
    """The restyle side's figures from its process's reply (see module docstring)."""
    summary = reply["summary"]
    if summary["ok"] != summary["rows_in"]:
        logger.warning("restyle: %d of %d rows failed; see %s", summary["error"], summary["rows_in"], config.sink.uri)
    total_seconds = reply["ray_start_seconds"] + reply["run_job_seconds"]
    return {
        "images": summary["ok"],
        "error_rows": summary["error"],
        "load_seconds": reply["ray_start_seconds"],
        "prepare_seconds": reply["prepare_seconds"],
        "model_seconds": reply["model_seconds"],
        "finish_seconds": reply["finish_seconds"],
        "total_seconds": total_seconds,
        "pipeline_seconds": summary["wall_seconds"],
        "accounting_seconds": reply["run_job_seconds"] - summary["wall_seconds"],
        "actor_idle_seconds": total_seconds - reply["ray_start_seconds"] - reply["model_seconds"],
        "encoding": reply["encoding"],
        "torch_threads": reply["torch_threads"],
        "peak_uss_bytes": reply["peak_uss_bytes"],
        "processes_at_peak": reply["processes_at_peak"],
        "uss_mib_at_peak_by_process": reply["uss_mib_at_peak_by_process"],
        "ray_own_uss_mib_at_peak": ray_own_mib(reply["uss_mib_at_peak_by_process"]),
    }


# Processes of a local Ray instance and of Ray Data that any job has, by their titles in the memory
# breakdown (`measure.process_title`); every Python process beside the side's own is one of Ray's.
RAY_OWN_PROCESSES = (
    "gcs_server",
    "raylet",
    "python ",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "ray::_StatsActor",
    "ray::datasets_stats_actor",
    "ray::_AutoscalingCoordinatorActor",
    "ray::ActorLocationTracker",
)


def ray_own_mib(breakdown: dict[str, float]) -> float:
    """The unique set size, in MiB, of Ray's own processes in a restyle side's breakdown at its peak."""
    return sum(mib for name, mib in breakdown.items() if name.startswith(RAY_OWN_PROCESSES))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def images_per_second(figures: dict) -> float:
    """Ok images per second of a side, end to end."""
    return figures["images"] / figures["total_seconds"]


def ceiling_ratio(plain: dict, restyle: dict) -> float:
    """The images/s ratio restyle would reach if starting Ray were its only cost beyond the plain loop's."""
    return plain["total_seconds"] / (plain["total_seconds"] + restyle["load_seconds"])


def floor_ratio(plain: dict, restyle: dict) -> float:
    """The peak USS ratio restyle would reach if Ray's own processes were its only memory beyond the plain loop's."""
    plain_mib = plain["peak_uss_bytes"] / MEBIBYTE
    return (plain_mib + restyle["ray_own_uss_mib_at_peak"]) / plain_mib


def format_table(count: int, plain: dict, restyle: dict, load: dict) -> str:
    """One count's figures as a fixed-width table, both sides side by side."""
    columns = ("load s", "prepare s", "model s", "finish s", "total s", "img/s", "peak USS MiB")
    lines = [
        f"{count} images; load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after "
        "(1-minute; prepare/model/finish overlap on the restyle side)",
        f"{'side':<8}" + "".join(f"{name:>14}" for name in columns),
    ]
    for name, figures in (("plain", plain), ("restyle", restyle)):
        values = (
            figures["load_seconds"],
            figures["prepare_seconds"],
            figures["model_seconds"],
            figures["finish_seconds"],
            figures["total_seconds"],
            images_per_second(figures),
            figures["peak_uss_bytes"] / MEBIBYTE,
        )
        lines.append(f"{name:<8}" + "".join(f"{value:>14.2f}" for value in values))
    speed = ratio(images_per_second(restyle), images_per_second(plain))
    memory = ratio(restyle["peak_uss_bytes"], plain["peak_uss_bytes"])
    lines.append(
        f"restyle/plain: images/s {speed:.3f} (Ray's start alone caps it at {ceiling_ratio(plain, restyle):.3f}), "
        f"peak USS {memory:.3f} (Ray's own processes alone, {restyle['ray_own_uss_mib_at_peak']:.0f} MiB, make it "
        f"at least {floor_ratio(plain, restyle):.3f})"
    )
    lines.append(
        f"restyle: run_job = pipeline "
        f"{restyle['pipeline_seconds']:.2f} s + accounting {restyle['accounting_seconds']:.2f} s, actor idle "
        f"{restyle['actor_idle_seconds']:.2f} s, peak over {restyle['processes_at_peak']} processes"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the inputs, run both sides per count, print the tables and the JSON line."""
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model is not None:
        model = args.model.resolve()
    else:
        from jobs.tiny_models import make_tiny_models

        model = make_tiny_models(DEFAULT_MODEL_DIRECTORY, names=("sd-img2img",))["sd-img2img"]

    runs = []
    tables = []
    for count in args.num_images:
        with tempfile.TemporaryDirectory(prefix="restyle-bench-") as scratch:
            scratch = Path(scratch)
            source = write_benchmark_images(scratch, count, args.size)
            config = job_config(args, source, scratch / "output", model)
            logger.info("%d images of %dx%d: plain side", count, args.size, args.size)
            before = os.getloadavg()
            plain = run_side(run_plain_side, (args, model, source, scratch / "plain.parquet"), "plain side")
            middle = os.getloadavg()
            logger.info("%d images: restyle side", count)
            restyle = restyle_figures(run_side(run_restyle_side, (config,), "restyle side"), config)
            after = os.getloadavg()
        load = {"before": before, "between": middle, "after": after}
        tables.append(format_table(count, plain, restyle, load))
        print(tables[-1], flush=True)
        runs.append({"images": count, "plain": plain, "restyle": restyle, "load_average": load})

    def per_count(side: str, key: str) -> list:
        return [run[side][key] for run in runs]

    operator = job_config(args, Path("unused"), Path("unused"), model).operators[0]
    result = {
        "images": list(args.num_images),
        "ratio_images_per_s": [
            ratio(images_per_second(run["restyle"]), images_per_second(run["plain"])) for run in runs
        ],
        "ratio_memory": [ratio(run["restyle"]["peak_uss_bytes"], run["plain"]["peak_uss_bytes"]) for run in runs],
        # The bounds Ray alone sets on both ratios (see the module docstring).
        "ceiling_ratio_images_per_s": [ceiling_ratio(run["plain"], run["restyle"]) for run in runs],
        "floor_ratio_memory": [floor_ratio(run["plain"], run["restyle"]) for run in runs],
        "ray_own_uss_mib": [run["restyle"]["ray_own_uss_mib_at_peak"] for run in runs],
        # The ratio had the plain side generated as fast as restyle's actor did: both sides' model
        # calls are the same work, so this separates restyle's fixed costs from CPU contention noise.
        "ratio_images_per_s_at_equal_model_seconds": [
            ratio(
                run["plain"]["total_seconds"] - run["plain"]["model_seconds"] + run["restyle"]["model_seconds"],
                run["restyle"]["total_seconds"],
            )
            for run in runs
        ],
        "plain_images_per_s": [images_per_second(run["plain"]) for run in runs],
        "restyle_images_per_s": [images_per_second(run["restyle"]) for run in runs],
        "plain_peak_uss_mib": [value / MEBIBYTE for value in per_count("plain", "peak_uss_bytes")],
        "restyle_peak_uss_mib": [value / MEBIBYTE for value in per_count("restyle", "peak_uss_bytes")],
        "settings": {
            "size": args.size,
            "steps": args.steps,
            "strength": STRENGTH,
            "guidance_scale": GUIDANCE_SCALE,
            "model_batch_size": args.batch_size,
            "threads": args.threads,
            "device": args.device,
            "dtype": args.dtype,
            "model": str(model),
            "cores": os.cpu_count(),
            "restyle": {
                "num_actors": operator.num_actors,
                "num_cpus": operator.num_cpus,
                "torch_threads": operator.torch_threads,
                "batch_size": operator.batch_size,
                "model_batch_size": operator.model_batch_size,
                "reserved_cpus": 1,
            },
        },
        "runs": runs,
    }
    if 256 in args.num_images and 1024 in args.num_images:
        at = {run["images"]: run for run in runs}
        for side in ("plain", "restyle"):
            result[f"{side}_memory_growth_256_to_1024"] = ratio(
                at[1024][side]["peak_uss_bytes"], at[256][side]["peak_uss_bytes"]
            )
    line = json.dumps(result, separators=(",", ":"))
    print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
