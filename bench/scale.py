"""Scale: a whole restyle job at 100 000 and 1 000 000 rows against the same plain Ray Data pipeline.

The operator is trivial on purpose, so the framework and not a model is measured: `standardize` with
one step, `{op: resize, width: 16, height: 16, mode: stretch, interpolation: area}` (OpenCV), on
32x32 RGB PNGs. For each count in `--rows` (default 100000 1000000) the script makes a synthetic
Parquet source of `--files` files (default 8) of `--row-groups` row groups each (default 4): `id`, a
unique string, and `image`, the Hugging Face image struct {bytes, path}, holding one of 512 distinct
PNGs (random 4x4 colour grids scaled bilinearly to 32x32, about 1.3 kB each) in turn. The files are
written a row group at a time, without dictionary encoding (so each row's bytes are stored, as
distinct images would be), and kept under `--work-dir` keyed by the row count, files and row groups,
so a rerun reuses them. Outputs are deleted after each count.

Three runs per count, each in its own freshly spawned process, so none is charged for what another
left behind; Ray gets `--cpus` CPUs (default: every core) in each.
  restyle   `jobs.pipeline.start_ray`, then `jobs.pipeline.run_job` on the job (`job_config`): the
            source above, the one standardize operator at `--batch-size` rows per batch (its pool
            sized by restyle from the cluster), a local sink in mode overwrite with restyle's shard
            defaults unless `--rows-per-shard` is given. seconds = Ray start + run_job, as the CLI
            spends them (run_job starts Ray itself when there is work).
  resume    `run_job` again on the finished sink with `sink.mode: resume`, without starting Ray
            first, as a second `restyle run` would: how long it takes to find there is nothing to do
            (Ray included if run_job starts it). resume fraction = resume seconds / restyle seconds.
  plain     `ray.init(address="local", num_cpus=--cpus)`, then `ray.data.read_parquet` of the same
            files -> one `map_batches` (tasks, `--batch-size` rows per batch) that decodes each PNG
            with Pillow, resizes it as the step does (OpenCV, area) and encodes it again as PNG at
            restyle's default sink level -> `write_parquet` to a folder. seconds = Ray start + the
            pipeline.

Figures per run:
  rows/s            ok rows / seconds (restyle: its summary's `ok`; plain: the rows written).
  ratio             restyle rows/s / plain rows/s.
  driver peak RSS   the largest resident set of the side's own process (the driver: where run_job or
                    the plain pipeline runs, Ray's workers not included), sampled every 0.1 s by a
                    thread in that process (a /proc read), and the kernel's own peak (`ru_maxrss`)
                    beside it. driver growth = its last count's sampled peak / its first count's.
  total peak USS    the largest unique set size (psutil `memory_full_info().uss`, pages no other
                    process maps) summed over the side's process and all its descendants (Ray's GCS,
                    raylet, workers and actors), sampled every 0.5 s from this process (one process's
                    USS costs about 3 ms of CPU to read). Summed RSS would count the object store and
                    shared libraries once per process.
  before first row  seconds from the call of run_job (Ray already started) to the first commit record
                    under SINK/_commits; for plain, from before `read_parquet` (Ray already started) to
                    the first file in its output folder. Both are seen by the sampling thread polling
                    the folder every 0.1 s, and both include reading, resizing and writing that first
                    block: the driver's work before any row moves is the rest.
  accounting s      restyle only: run_job - its summary's `wall_seconds` (inspecting the source and
                    opening the sink before the pipeline, accounting, manifest and report after it).

The script prints a table per count, then one JSON line: `rows`, `rows_per_s`, `plain_rows_per_s`,
`ratio`, `driver_peak_rss_mb` (lists, one entry per count), `driver_growth`, `total_peak_uss_mb`,
`seconds_before_first_row`, `resume_seconds`, `resume_fraction`, the plain side's figures, `settings`
and the load average (other work on the CPUs makes the figures noisy). MB here is MiB. Run from the
repository root:

    .venv/bin/python bench/scale.py --rows 100000 1000000 --work-dir .cache/bench-scale
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from measure import MEBIBYTE, in_spawned_process, prepare_spawned_side, send_reply
from PIL import Image

from jobs.config import JobConfig, validate_config
from operators.images import EncodingConfig

logger = logging.getLogger("bench.scale")

DEFAULT_ROWS = (100_000, 1_000_000)
DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "restyle-bench-scale"
SOURCE_SIDE = 32
OUTPUT_SIDE = 16
DISTINCT_IMAGES = 512
GRID_SIDE = 4
SOURCE_SEED = 0
RESIZE_STEP = {"op": "resize", "width": OUTPUT_SIDE, "height": OUTPUT_SIDE, "mode": "stretch", "interpolation": "area"}
DRIVER_INTERVAL_SECONDS = 0.1
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# Disk needed per row: the source (~1.3 kB) and both outputs (16x16 PNGs, ids, restyle's record column).
SOURCE_BYTES_PER_ROW = 1400
OUTPUT_BYTES_PER_ROW = 2000
SOURCE_FORMAT_VERSION = 1


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every refusal names the option, the value and what is accepted."""
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=list(DEFAULT_ROWS),
        help="input row counts, one set of runs per count (default 100000 1000000)",
    )
    parser.add_argument("--files", type=int, default=8, help="Parquet files per source (default 8)")
    parser.add_argument("--row-groups", type=int, default=4, help="row groups per file (default 4)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per batch on both sides (default 256)")
    parser.add_argument(
        "--rows-per-shard", type=int, default=None, help="restyle sink.rows_per_shard (default: restyle's)"
    )
    parser.add_argument("--cpus", type=int, default=cores, help=f"CPUs of each local Ray instance (default {cores})")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help=f"where sources are kept for reruns and outputs written (default {DEFAULT_WORK_DIR})",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON line's figures to this path")
    args = parser.parse_args(argv)
    for option in ("files", "row_groups", "batch_size"):
        value = getattr(args, option)
        if value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    for count in args.rows:
        if count < args.files:
            parser.error(f"--rows takes counts of at least --files ({args.files}), so no file is empty, got {count}")
    if args.rows_per_shard is not None and args.rows_per_shard < 1:
        parser.error(f"--rows-per-shard must be at least 1, got {args.rows_per_shard}")
    if args.cpus < 2:
        parser.error(
            f"--cpus must be at least 2 (one for the standardize actor, one kept for reads and writes), got {args.cpus}"
        )
    if args.work_dir.exists() and not args.work_dir.is_dir():
        parser.error(f"--work-dir must be a directory, got the file {args.work_dir}")
    return args


def distinct_pngs(count: int = DISTINCT_IMAGES) -> list[bytes]:
    """`count` distinct 32x32 RGB PNGs: random 4x4 colour grids scaled bilinearly, so they compress
    as smooth photographs do (about 1.3 kB each) rather than as noise."""
    generator = np.random.default_rng(SOURCE_SEED)
    images = []
    for _ in range(count):
        grid = generator.integers(0, 256, (GRID_SIDE, GRID_SIDE, 3), dtype=np.uint8)
        image = Image.fromarray(grid).resize((SOURCE_SIDE, SOURCE_SIDE), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def source_directory(work_dir: Path, rows: int, files: int, row_groups: int) -> Path:
    """Where the source of this shape is kept."""
    return work_dir / f"source-v{SOURCE_FORMAT_VERSION}-{rows}rows-{files}files-{row_groups}groups"


def write_source(work_dir: Path, rows: int, files: int, row_groups: int) -> Path:
    """The folder of `files` Parquet files of `row_groups` row groups each, `rows` rows in all, written
    unless a complete one is kept (a `complete` marker beside it is written last)."""
    directory = source_directory(work_dir, rows, files, row_groups)
    marker, data_directory = directory / "complete", directory / "data"
    if marker.is_file():
        logger.info("reusing the source %s", data_directory)
        return data_directory
    if directory.exists():
        shutil.rmtree(directory)
    data_directory.mkdir(parents=True)
    started = time.perf_counter()
    images = pa.array(distinct_pngs(), pa.binary())
    schema = pa.schema([("id", pa.string()), ("image", IMAGE_TYPE)])
    file_bounds = np.linspace(0, rows, files + 1).round().astype(np.int64)
    for file_index in range(files):
        first, last = int(file_bounds[file_index]), int(file_bounds[file_index + 1])
        group_rows = math.ceil((last - first) / row_groups)
        path = data_directory / f"part-{file_index:03d}.parquet"
        with pq.ParquetWriter(path, schema, use_dictionary=False) as writer:
            for start in range(first, last, group_rows):
                stop = min(start + group_rows, last)
                ids = pa.array([f"row-{index:09d}" for index in range(start, stop)], pa.string())
                paths = pc.binary_join_element_wise(ids, pa.scalar(".png"), pa.scalar(""))
                data = images.take(pa.array(np.arange(start, stop) % len(images)))
                image = pa.StructArray.from_arrays([data, paths], fields=list(IMAGE_TYPE))
                writer.write_table(pa.table({"id": ids, "image": image}, schema=schema), row_group_size=stop - start)
    marker.write_text(f"{rows}\n")
    logger.info("wrote %d rows to %s in %.1f s", rows, data_directory, time.perf_counter() - started)
    return data_directory


def job_config(args: argparse.Namespace, source: Path, sink: Path, mode: str) -> JobConfig:
    """The restyle job: one standardize resize step, a local sink, Ray given `--cpus` CPUs."""
    sink_config: dict = {"uri": str(sink), "mode": mode}
    if args.rows_per_shard is not None:
        sink_config["rows_per_shard"] = args.rows_per_shard
    return validate_config(
        {
            "source": {"uri": str(source), "format": "parquet"},
            "operators": [{"kind": "standardize", "steps": [RESIZE_STEP], "batch_size": args.batch_size}],
            "sink": sink_config,
            "run": {"seed": 0, "resources": {"num_cpus": args.cpus}},
        },
        source_name="scale benchmark config",
    )


class DriverSampler:
    """In a side's own process: samples that process's RSS, and notes when a watched folder first
    holds a finished file (names starting with '.' are files still being written aside)."""

    def __init__(self, interval_seconds: float = DRIVER_INTERVAL_SECONDS):
        import psutil

        self.process = psutil.Process()
        self.interval_seconds = interval_seconds
        self.peak_rss_bytes = 0
        self.samples = 0
        self.folder: Path | None = None
        self.started: float | None = None
        self.first_file_seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="driver-sampler", daemon=True)

    def __enter__(self) -> DriverSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def watch(self, folder: Path) -> None:
        """Start the clock, and note the seconds until `folder` first holds a finished file."""
        self.folder = folder
        self.started = time.perf_counter()

    def sample(self) -> None:
        """Add one sample."""
        self.peak_rss_bytes = max(self.peak_rss_bytes, self.process.memory_info().rss)
        self.samples += 1
        if self.folder is not None and self.first_file_seconds is None:
            try:
                with os.scandir(self.folder) as entries:
                    found = any(not entry.name.startswith(".") for entry in entries)
            except FileNotFoundError:
                found = False
            if found:
                self.first_file_seconds = time.perf_counter() - self.started

    def figures(self) -> dict:
        """The peak RSS (sampled, and the kernel's `ru_maxrss`, in KiB on Linux) and the first file."""
        return {
            "driver_peak_rss_bytes": self.peak_rss_bytes,
            "driver_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "driver_samples": self.samples,
            "seconds_before_first_row": self.first_file_seconds,
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_seconds)


def summary_figures(summary: dict) -> dict:
    """The parts of run_job's summary this benchmark reports (keys that are missing become None)."""
    keys = ("rows_in", "ok", "error", "wall_seconds", "inputs_processed", "rows_already_committed")
    return {key: summary.get(key) for key in keys}


def run_restyle_job(sampler: DriverSampler, config: JobConfig) -> dict:
    """The restyle side (see module docstring): start Ray, run the job."""
    import ray

    from jobs.commits import COMMITS
    from jobs.pipeline import run_job, start_ray

    try:
        started = time.perf_counter()
        start_ray(config)
        ray_started = time.perf_counter()
        sampler.watch(Path(config.sink.uri) / COMMITS)
        result = run_job(config)
        finished = time.perf_counter()
    finally:
        ray.shutdown()
    return {
        "summary": summary_figures(result.summary),
        "ray_start_seconds": ray_started - started,
        "run_job_seconds": finished - ray_started,
        "stages": [
            {"name": stage.name, "actors": stage.num_actors, "cpus": stage.num_cpus, "batch_size": stage.batch_size}
            for stage in result.plan.stages
        ],
    }


def run_restyle_resume(sampler: DriverSampler, config: JobConfig) -> dict:
    """The resume (see module docstring): run_job on the finished sink, Ray started only by run_job."""
    import ray

    from jobs.pipeline import run_job

    try:
        started = time.perf_counter()
        result = run_job(config)
        finished = time.perf_counter()
        ray_started = ray.is_initialized()
    finally:
        ray.shutdown()
    return {"summary": summary_figures(result.summary), "run_job_seconds": finished - started, "ray": ray_started}


def resize_batch(batch: pa.Table, png_level: int) -> pa.Table:
    """The plain side's map: decode each PNG with Pillow, resize as the step does, encode as PNG."""
    import cv2

    cv2.setNumThreads(1)
    outputs = []
    for cell in batch.column("image").to_pylist():
        with Image.open(io.BytesIO(cell["bytes"])) as image:
            array = np.asarray(image.convert("RGB"))
        resized = cv2.resize(array, (OUTPUT_SIDE, OUTPUT_SIDE), interpolation=cv2.INTER_AREA)
        buffer = io.BytesIO()
        Image.fromarray(resized).save(buffer, format="PNG", compress_level=png_level)
        outputs.append({"bytes": buffer.getvalue(), "path": cell["path"]})
    return pa.table({"id": batch.column("id"), "image": pa.array(outputs, IMAGE_TYPE)})


def run_plain(sampler: DriverSampler, source: Path, output: Path, cpus: int, batch_size: int) -> dict:
    """The plain side (see module docstring): read -> map -> write with Ray Data alone."""
    import pyarrow.dataset
    import ray
    import ray.data

    started = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_started = time.perf_counter()
        sampler.watch(output)
        dataset = ray.data.read_parquet(str(source)).map_batches(
            resize_batch,
            fn_kwargs={"png_level": EncodingConfig().resolved_png_level()},
            batch_size=batch_size,
            batch_format="pyarrow",
        )
        dataset.write_parquet(str(output))
        finished = time.perf_counter()
    finally:
        ray.shutdown()
    return {
        "ok": pyarrow.dataset.dataset(output, format="parquet").count_rows(),
        "ray_start_seconds": ray_started - started,
        "pipeline_seconds": finished - ray_started,
    }


def _child(target, arguments: tuple, connection) -> None:
    prepare_spawned_side(logger)

    def sampled() -> dict:
        with DriverSampler() as sampler:
            reply = target(sampler, *arguments)
        return {**reply, **sampler.figures()}

    send_reply(connection, sampled)


def run_side(target, *arguments) -> dict:
    """`target(sampler, *arguments)` in a fresh spawned process while sampling that process tree's
    unique set size; its reply with the peak and the load average around it. A failure raises."""
    load_before = os.getloadavg()[0]
    reply, tree = in_spawned_process(_child, (target, arguments), target.__name__, sample_memory=True)
    reply.update(
        total_peak_uss_bytes=tree.peak_bytes,
        processes_at_peak=tree.processes_at_peak,
        load_average=(load_before, os.getloadavg()[0]),
    )
    return reply


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def mebibytes(value: float | None) -> float | None:
    """Bytes as MiB, rounded to 0.1."""
    return None if value is None else round(value / MEBIBYTE, 1)


def count_figures(rows: int, restyle: dict, resume: dict, plain: dict) -> dict:
    """One count's figures from the three replies."""
    summary = restyle["summary"]
    ok = summary["ok"] if summary["ok"] is not None else rows
    if ok != rows:
        logger.warning("restyle: %s of %d rows ok (summary %s)", ok, rows, summary)
    if plain["ok"] != rows:
        logger.warning("plain: %d of %d rows written", plain["ok"], rows)
    processed = resume["summary"]["inputs_processed"]
    if processed:
        logger.warning("the resume processed %s inputs; a finished job should have none to do", processed)
    seconds = restyle["ray_start_seconds"] + restyle["run_job_seconds"]
    plain_seconds = plain["ray_start_seconds"] + plain["pipeline_seconds"]
    wall = summary["wall_seconds"]
    return {
        "rows": rows,
        "restyle": {
            "ok": ok,
            "seconds": seconds,
            "ray_start_seconds": restyle["ray_start_seconds"],
            "run_job_seconds": restyle["run_job_seconds"],
            "pipeline_seconds": wall,
            "accounting_seconds": None if wall is None else restyle["run_job_seconds"] - wall,
            "rows_per_s": ok / seconds,
            "seconds_before_first_row": restyle["seconds_before_first_row"],
            "driver_peak_rss_mb": mebibytes(restyle["driver_peak_rss_bytes"]),
            "driver_max_rss_mb": mebibytes(restyle["driver_max_rss_bytes"]),
            "total_peak_uss_mb": mebibytes(restyle["total_peak_uss_bytes"]),
            "processes_at_peak": restyle["processes_at_peak"],
            "stages": restyle["stages"],
            "load_average": restyle["load_average"],
        },
        "resume": {
            "seconds": resume["run_job_seconds"],
            "fraction": resume["run_job_seconds"] / seconds,
            "started_ray": resume["ray"],
            "inputs_processed": processed,
            "driver_peak_rss_mb": mebibytes(resume["driver_peak_rss_bytes"]),
            "total_peak_uss_mb": mebibytes(resume["total_peak_uss_bytes"]),
            "load_average": resume["load_average"],
        },
        "plain": {
            "ok": plain["ok"],
            "seconds": plain_seconds,
            "ray_start_seconds": plain["ray_start_seconds"],
            "pipeline_seconds": plain["pipeline_seconds"],
            "rows_per_s": plain["ok"] / plain_seconds,
            "seconds_before_first_row": plain["seconds_before_first_row"],
            "driver_peak_rss_mb": mebibytes(plain["driver_peak_rss_bytes"]),
            "driver_max_rss_mb": mebibytes(plain["driver_max_rss_bytes"]),
            "total_peak_uss_mb": mebibytes(plain["total_peak_uss_bytes"]),
            "processes_at_peak": plain["processes_at_peak"],
            "load_average": plain["load_average"],
        },
    }


def format_table(figures: dict) -> str:
    """One count's figures as a fixed-width table, the three runs side by side."""

    def cell(value, digits: int = 2) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    restyle, resume, plain = figures["restyle"], figures["resume"], figures["plain"]
    rows = [
        ("seconds", [cell(restyle["seconds"]), cell(resume["seconds"]), cell(plain["seconds"])]),
        ("  Ray start s", [cell(restyle["ray_start_seconds"]), "-", cell(plain["ray_start_seconds"])]),
        ("  accounting s", [cell(restyle["accounting_seconds"]), "-", "-"]),
        ("rows/s", [cell(restyle["rows_per_s"], 1), "-", cell(plain["rows_per_s"], 1)]),
        ("to 1st row s", [cell(restyle["seconds_before_first_row"]), "-", cell(plain["seconds_before_first_row"])]),
        (
            "driver RSS MiB",
            [
                cell(restyle["driver_peak_rss_mb"], 1),
                cell(resume["driver_peak_rss_mb"], 1),
                cell(plain["driver_peak_rss_mb"], 1),
            ],
        ),
        ("  ru_maxrss MiB", [cell(restyle["driver_max_rss_mb"], 1), "-", cell(plain["driver_max_rss_mb"], 1)]),
        (
            "tree USS MiB",
            [
                cell(restyle["total_peak_uss_mb"], 1),
                cell(resume["total_peak_uss_mb"], 1),
                cell(plain["total_peak_uss_mb"], 1),
            ],
        ),
        (
            "load avg 1 min",
            [f"{run['load_average'][0]:.1f}-{run['load_average'][1]:.1f}" for run in (restyle, resume, plain)],
        ),
    ]
    lines = [f"{figures['rows']} rows", f"{'':<16}" + "".join(f"{name:>14}" for name in ("restyle", "resume", "plain"))]
    lines += [f"{name:<16}" + "".join(f"{value:>14}" for value in values) for name, values in rows]
    lines.append(
        f"restyle / plain rows/s = {cell(ratio(restyle['rows_per_s'], plain['rows_per_s']), 3)}; resume = "
        f"{cell(resume['fraction'], 3)} of the job's seconds"
        + ("" if resume["started_ray"] else " (it started no Ray)")
    )
    return "\n".join(lines)


def check_disk(args: argparse.Namespace) -> None:
    """Refuse, in one line, a work directory without room for the sources and the largest outputs."""
    missing = [
        rows
        for rows in args.rows
        if not (source_directory(args.work_dir, rows, args.files, args.row_groups) / "complete").is_file()
    ]
    needed = sum(rows * SOURCE_BYTES_PER_ROW for rows in set(missing)) + max(args.rows) * OUTPUT_BYTES_PER_ROW
    args.work_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.work_dir).free
    if free < needed:
        sys.exit(
            f"error: --work-dir {args.work_dir} has {free / 2**30:.1f} GiB free; these counts need about "
            f"{needed / 2**30:.1f} GiB (sources kept, outputs deleted after each count)"
        )


def main(argv: list[str] | None = None) -> int:
    """Make the sources; per count run restyle, its resume and the plain pipeline; print tables and the JSON line."""
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.work_dir = args.work_dir.resolve()
    check_disk(args)
    runs = []
    for rows in args.rows:
        source = write_source(args.work_dir, rows, args.files, args.row_groups)
        outputs = Path(tempfile.mkdtemp(prefix=f"run-{rows}-", dir=args.work_dir))
        try:
            sink = outputs / "restyle"
            logger.info("%d rows: restyle", rows)
            restyle = run_side(run_restyle_job, job_config(args, source, sink, "overwrite"))
            logger.info("%d rows: resume of the finished job", rows)
            resume = run_side(run_restyle_resume, job_config(args, source, sink, "resume"))
            shutil.rmtree(sink)
            logger.info("%d rows: plain Ray Data", rows)
            plain = run_side(run_plain, source, outputs / "plain", args.cpus, args.batch_size)
        finally:
            shutil.rmtree(outputs, ignore_errors=True)
        runs.append(count_figures(rows, restyle, resume, plain))
        print(format_table(runs[-1]), flush=True)

    def per_count(side: str, key: str) -> list:
        return [run[side][key] for run in runs]

    driver_peaks = per_count("restyle", "driver_peak_rss_mb")
    result = {
        "rows": list(args.rows),
        "rows_per_s": per_count("restyle", "rows_per_s"),
        "plain_rows_per_s": per_count("plain", "rows_per_s"),
        "ratio": [ratio(run["restyle"]["rows_per_s"], run["plain"]["rows_per_s"]) for run in runs],
        "driver_peak_rss_mb": driver_peaks,
        "driver_growth": ratio(driver_peaks[-1], driver_peaks[0]),
        "total_peak_uss_mb": per_count("restyle", "total_peak_uss_mb"),
        "seconds_before_first_row": per_count("restyle", "seconds_before_first_row"),
        "resume_seconds": per_count("resume", "seconds"),
        "resume_fraction": per_count("resume", "fraction"),
        "accounting_seconds": per_count("restyle", "accounting_seconds"),
        "plain_driver_peak_rss_mb": per_count("plain", "driver_peak_rss_mb"),
        "plain_total_peak_uss_mb": per_count("plain", "total_peak_uss_mb"),
        "plain_seconds_before_first_row": per_count("plain", "seconds_before_first_row"),
        "settings": {
            "files": args.files,
            "row_groups_per_file": args.row_groups,
            "batch_size": args.batch_size,
            "rows_per_shard": job_config(args, Path("unused"), Path("unused"), "overwrite").sink.rows_per_shard,
            "cpus": args.cpus,
            "cores": os.cpu_count(),
            "step": RESIZE_STEP,
            "source_side": SOURCE_SIDE,
            "distinct_images": DISTINCT_IMAGES,
            "png_compress_level": EncodingConfig().resolved_png_level(),
            "work_dir": str(args.work_dir),
        },
        "load_average": os.getloadavg(),
        "runs": runs,
    }
    line = json.dumps(result, separators=(",", ":"))
    print(line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
