"""What a running job shows: its progress, counted from one source, the sink's commit records.

On a terminal, one bar whose total is the rows this run has to commit, with rate and time left; in a
log file or a Ray job log (stderr not a terminal), one line every `run.progress_interval_seconds` and
a final line when the write ends. The same counts go to Ray metrics (`ray.util.metrics`), which the
Ray dashboard and Prometheus show. Ray Data's own bars and status block are off unless `--verbose`,
and library notices that tell a user nothing are dropped in the driver and, through a worker set-up
hook, in every Ray worker (whose output reaches the driver's stderr through `log_to_driver`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.config import SinkConfig

# Imported by every Ray worker as it starts (`quiet_worker`): nothing heavy at module level.
logger = logging.getLogger(__name__)

# How often the bar reads the commit records (a listing of one folder).
BAR_SECONDS = 1.0
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_SETUP_HOOK = "jobs.progress.quiet_worker"

# Notices that say nothing a user can act on, by the logger that emits them: message fragments.
QUIET_LOG_NOTICES = {
    # Ray enables token authentication by default and says so on every start.
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled",),
    # Ray Data says its bars are off, which is restyle's choice, not the user's.
    "ray.data._internal.progress": ("Progress bars disabled", "Progress bars for operators disabled"),
    # transformers' image processors announce their PIL fallback when torchvision (not a dependency) is absent.
    "transformers.models.auto.image_processing_auto": (
        "backend is not available. Falling back to",
        "The `use_fast` parameter is deprecated",
    ),
    # Since transformers 5, the same fallback per image processor class a pipeline names.
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
}
# Python warnings of the same kind: (message regex, category, module regex).
QUIET_WARNINGS = (
    # Pillow on a source image's damaged EXIF block ("Corrupt EXIF data", "Tag data larger than file.
    # Skipping tag 274"): the pixels still decode, and the warning names no file.
    (r"", UserWarning, r"PIL\.TiffImagePlugin"),
)


class _DropNotices(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def drop_notices() -> None:
    """Drop the notices in QUIET_LOG_NOTICES and QUIET_WARNINGS in this process (idempotent)."""
    for name, fragments in QUIET_LOG_NOTICES.items():
        target = logging.getLogger(name)
        if not any(isinstance(item, _DropNotices) for item in target.filters):
            target.addFilter(_DropNotices(fragments))
    for message, category, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def quiet_worker() -> None:
    """Ray's `worker_process_setup_hook`: `drop_notices` in each worker as it starts (cheap: no import)."""
    drop_notices()


def worker_runtime_env(verbose: bool) -> dict:
    """The `runtime_env` for `ray.init` that quiets every worker of the job (Ray merges it with a
    submitted job's own runtime_env)."""
    return {} if verbose else {"worker_process_setup_hook": WORKER_SETUP_HOOK}


def configure_output(level: str = "info", verbose: bool = False, quiet: bool = False) -> None:
    """Set up the CLI's logging: restyle's own lines at `level` (errors only when `quiet`), Ray's own
    start-up and Ray Data's execution lines only when `verbose`."""
    threshold = logging.ERROR if quiet else getattr(logging, level.upper())
    logging.basicConfig(level=threshold, format=LOG_FORMAT)
    logging.getLogger().setLevel(threshold)  # also where logging was set up before (basicConfig is then a no-op)
    if not verbose:
        drop_notices()


def ray_log_level(verbose: bool) -> int:
    """`ray.init`'s `logging_level` (it sets up the `ray` logger itself): Ray's own INFO lines ("Started
    a local Ray instance.") only when `verbose`; its warnings stay, errors only under `--quiet`."""
    return logging.INFO if verbose else max(logging.WARNING, logging.getLogger().getEffectiveLevel())


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's progress bars, its 'Total Progress' status block and its INFO lines on the console
    off (its log file, `ray-data.log` in the session's logs, keeps them; errors only under `--quiet`),
    unless `verbose`. Must run before a dataset is built: a dataset copies the DataContext when it is
    created."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    context.enable_operator_progress_bars = verbose
    if verbose:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # ray.data._internal.logging's console handler
            handler.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))


def duration(seconds: float) -> str:
    """`42 s`, `12 min 05 s`, `3 h 04 min`."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressMetrics:
    """Ray metrics of one run, tagged with its `run_id` (Prometheus names them `ray_restyle_...`): rows
    committed by status, error rows, expected rows, the commit rate and seconds left while it runs, the
    summary's images/s and wall time at the end, and each stage's images per second of model time
    (`restyle_stage_images_per_second{stage}`); each stage's own rows are also Ray Data's
    `ray_data_output_rows{operator}`."""

    def __init__(self, run_id: str, expected: int):
        from ray.util.metrics import Counter, Gauge

        run = ("run_id",)
        self.committed = Counter(
            "restyle_rows_committed", description="Output rows committed, by status.", tag_keys=("run_id", "status")
        )
        self.errors = Counter("restyle_error_rows", description="Rows committed with status error.", tag_keys=run)
        self.expected = Gauge("restyle_rows_expected", description="Output rows the job has in all.", tag_keys=run)
        self.rate = Gauge("restyle_rows_per_second", description="Rows committed per second by this run.", tag_keys=run)
        self.left = Gauge("restyle_seconds_left", description="Estimated seconds until all rows are in.", tag_keys=run)
        self.images = Gauge(
            "restyle_images_per_second", description="The run summary's images/s (ok rows / wall time).", tag_keys=run
        )
        self.wall = Gauge("restyle_wall_seconds", description="The run summary's wall time.", tag_keys=run)
        self.stage_images = Gauge(
            "restyle_stage_images_per_second",
            description="Per stage: rows per second of model time (the report's stage figures).",
            tag_keys=("run_id", "stage"),
        )
        for metric in (
            self.committed,
            self.errors,
            self.expected,
            self.rate,
            self.left,
            self.images,
            self.wall,
            self.stage_images,
        ):
            metric.set_default_tags({"run_id": run_id})
        self.expected.set(expected)

    def update(self, new_by_status: dict[str, int], rate: float, left: float | None) -> None:
        for status, rows in new_by_status.items():
            if rows:
                self.committed.inc(rows, tags={"status": status})
                if status == "error":
                    self.errors.inc(rows)
        self.rate.set(rate)
        if left is not None:
            self.left.set(left)

    def summary(self, summary: dict) -> None:
        """The run's end figures, from its summary."""
        if summary.get("images_per_second") is not None:
            self.images.set(summary["images_per_second"])
        self.wall.set(summary["wall_seconds"])
        self.left.set(0)
        for stage, figures in (summary.get("stages") or {}).items():
            if figures.get("images_per_model_second") is not None:
                self.stage_images.set(figures["images_per_model_second"], tags={"stage": stage})


def job_metrics(run_id: str, expected: int) -> ProgressMetrics | None:
    """The run's Ray metrics, or None where Ray cannot record them (metrics are a courtesy)."""
    try:
        return ProgressMetrics(run_id, expected)
    except Exception as error:
        logger.debug("no Ray metrics for this run: %s", error)
        return None


class Progress:
    """Progress of one run, counted from the commit records it writes (`_commits/part-aAAAA-RUN-*`).

    `mode` is `bar` (a tqdm bar on stderr), `lines` (a log line every `interval` seconds and a final
    one) or `off` (metrics only). Reads only the records it has not seen; never fails the job."""

    def __init__(
        self,
        config: SinkConfig,
        attempt: int,
        already: int,
        expected: int,
        interval: float,
        run_id: str,
        mode: str = "lines",
        metrics: ProgressMetrics | None = None,
    ):
        from operators.storage import filesystem_for

        self.filesystem, self.root = filesystem_for(config.uri, config.storage.storage_options())
        self.prefix = f"part-a{attempt:04d}-{run_id}-"
        self.already, self.expected, self.interval = already, expected, interval
        self.mode, self.metrics = mode, metrics
        self.seen: dict[str, dict[str, int]] = {}  # record path -> rows by status
        self.errors = 0
        self.started = time.monotonic()
        self.bar = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="restyle-progress", daemon=True)

    def __enter__(self) -> Progress:
        self.started = time.monotonic()
        if self.mode == "bar":
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            # restyle's log lines print above the bar instead of through it.
            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()

            self.bar = tqdm(
                total=max(self.expected - self.already, 0),
                desc="rows committed",
                unit="row",
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )
        self.thread.start()
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        try:
            done = self.committed_now()
        except Exception as problem:  # progress must never fail a job, nor hide its error
            logger.warning("progress: cannot read commit records: %s", type(problem).__name__)
            done = None
        if self.bar is not None:
            self.bar.close()
            self.redirect.__exit__(None, None, None)
        elif self.mode == "lines" and done is not None:
            logger.info(self.line(done, final=True))

    def committed_now(self) -> int:
        """Rows committed so far, earlier attempts' included; updates the bar and the metrics."""
        from jobs.commits import COMMITS
        from operators.storage import join

        with self.lock:
            folder = join(self.root, COMMITS)
            # refresh: s3fs would otherwise answer from its cached listing and progress would never move.
            # No `exists` first: s3fs's answers False to a server error, unretried and uncounted.
            try:
                names = self.filesystem.ls(folder, detail=False, refresh=True)
            except FileNotFoundError:
                names = []
            new: dict[str, int] = {}
            for path in names:
                name = path.rsplit("/", 1)[-1]
                # A record being written (`.<name>.<hex>.tmp`) holds this run's prefix too: only whole records count.
                if name.startswith(self.prefix) and name.endswith(".json") and path not in self.seen:
                    record = json.loads(self.filesystem.cat_file(path))
                    statuses = record.get("statuses") or {"ok": record["rows"]}
                    self.seen[path] = statuses
                    for status, rows in statuses.items():
                        new[status] = new.get(status, 0) + rows
            self.errors += new.get("error", 0)
            done = self.already + sum(sum(statuses.values()) for statuses in self.seen.values())
            if self.bar is not None and sum(new.values()):
                self.bar.update(sum(new.values()))
                if self.errors:
                    self.bar.set_postfix_str(f"{self.errors} error row{'s' if self.errors > 1 else ''}", refresh=False)
            if self.metrics is not None:
                rate, left = self._rate(done)
                self.metrics.update(new, rate, left)
            return done

    def _rate(self, done: int) -> tuple[float, float | None]:
        elapsed = time.monotonic() - self.started
        rate = (done - self.already) / elapsed if elapsed > 0 else 0.0
        return rate, ((self.expected - done) / rate if rate > 0 else None)

    def line(self, done: int | None = None, final: bool = False) -> str:
        """One progress line: committed/expected, percent, rate, time elapsed and left."""
        done = self.committed_now() if done is None else done
        rate, left = self._rate(done)
        percent = 100.0 * done / self.expected if self.expected else 100.0
        errors = f", {self.errors} error row{'s' if self.errors > 1 else ''}" if self.errors else ""
        if final:
            ending = "done" if done >= self.expected else f"stopped, {self.expected - done} rows not committed"
        else:
            ending = f"about {duration(left)} left" if left is not None else "time left unknown"
        return (
            f"progress: {done}/{self.expected} rows committed ({percent:.1f}%){errors}, {rate:.2f} rows/s, "
            f"{duration(time.monotonic() - self.started)} elapsed, {ending}"
        )

    def _run(self) -> None:
        wait = min(self.interval, BAR_SECONDS) if self.mode == "bar" else self.interval
        while not self.stop.wait(wait):
            try:
                if self.mode == "lines":
                    logger.info(self.line())
                else:
                    self.committed_now()
            except Exception as error:  # progress must never fail a job
                logger.warning("progress: cannot read commit records: %s", type(error).__name__)


def progress_mode(verbose: bool, quiet: bool) -> str:
    """`off` when quiet, `bar` on a terminal (unless Ray Data draws its own bars: verbose), else `lines`."""
    if quiet:
        return "off"
    return "bar" if sys.stderr.isatty() and not verbose else "lines"
