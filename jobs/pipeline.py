"""Planning and running a job: the one place that turns operator configs into Ray Data stages.

`plan_job` is pure: from a validated config, what the source holds and the cluster's resources,
it decides each stage's actor pool, resources and batch size (and is what `--dry-run` prints).
`run_job` starts or joins Ray, builds read -> operators -> write, and accounts for every row.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

from jobs.config import JobConfig
from jobs.sources import SourceInfo, inspect_source, read_source
from operators.base import UserError

logger = logging.getLogger(__name__)


class PlanError(UserError):
    """A job that cannot run on the cluster it was given."""


@dataclass
class StagePlan:
    """One operator's place in the job."""

    index: int
    name: str
    kind: str
    num_actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    device: str
    variants: int
    parameters: dict = field(default_factory=dict)


@dataclass
class JobPlan:
    """Everything decided before Ray runs anything."""

    source_uri: str
    source_format: str
    input_rows: int
    sink_uri: str
    cluster_cpus: float
    cluster_gpus: float
    stages: list[StagePlan]

    @property
    def expected_rows(self) -> int:
        """Output rows: every input times every stage's variants."""
        return self.input_rows * math.prod(stage.variants for stage in self.stages)

    def describe(self) -> str:
        """A human-readable plan (what `--dry-run` prints)."""
        lines = [
            f"source:  {self.source_uri} ({self.source_format}, {self.input_rows} rows)",
            f"cluster: {self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs",
        ]
        for stage in self.stages:
            lines.append(
                f"stage {stage.index} {stage.name!r} ({stage.kind}): {stage.num_actors} actor(s) x "
                f"{stage.num_cpus:g} CPU / {stage.num_gpus:g} GPU, batch_size {stage.batch_size}, "
                f"device {stage.device}, {stage.variants} variant(s) per row"
            )
            for key, value in stage.parameters.items():
                lines.append(f"    {key}: {value}")
        lines.append(f"sink:    {self.sink_uri} ({self.expected_rows} rows expected)")
        return "\n".join(lines)


def size_pools(config: JobConfig, cpus: float, gpus: float) -> list[int]:
    """Actors per operator, leaving `run.resources.reserved_cpus` free so reads and writes
    are never starved (a pool that takes every CPU hangs the job)."""
    operators = config.operators
    sizes: list[int | None] = [None] * len(operators)
    for index, operator in enumerate(operators):
        if operator.num_gpus > 0:
            if operator.num_actors is not None:
                sizes[index] = operator.num_actors
                continue
            count = math.floor(gpus / operator.num_gpus + 1e-9)
            if count < 1:
                raise PlanError(
                    f"operators[{index}].num_gpus is {operator.num_gpus:g} per actor but the cluster has "
                    f"{gpus:g} GPUs; lower it, or set operators[{index}].num_actors if an autoscaler adds GPUs"
                )
            sizes[index] = count
    free = cpus - config.run.resources.reserved_cpus
    free -= sum(operators[i].num_cpus * sizes[i] for i in range(len(operators)) if sizes[i] is not None)
    cpu_stages = [i for i in range(len(operators)) if sizes[i] is None]
    for index in cpu_stages:
        operator = operators[index]
        share = free / len(cpu_stages)
        if operator.num_actors is not None:
            sizes[index] = operator.num_actors
        else:
            sizes[index] = math.floor(share / operator.num_cpus + 1e-9)
        if sizes[index] < 1 or sizes[index] * operator.num_cpus > share + 1e-9:
            raise PlanError(
                f"operators[{index}] needs {operator.num_actors or 1} actor(s) x {operator.num_cpus:g} CPUs but "
                f"the cluster has {cpus:g} CPUs, {config.run.resources.reserved_cpus:g} kept for reads and "
                f"writes (run.resources.reserved_cpus); lower operators[{index}].num_cpus or num_actors"
            )
    return [int(size) for size in sizes]


def variants_per_input(config: JobConfig) -> int:
    """Output rows each input row becomes: the product of every stage's variants."""
    return math.prod(op.variant_count() if hasattr(op, "variant_count") else 1 for op in config.operators)


def plan_job(config: JobConfig, info: SourceInfo, cpus: float, gpus: float, sizes: list[int] | None = None) -> JobPlan:
    """Decide pools, resources and batch sizes (see module docstring); `sizes` skips the sizing
    (for a job with nothing left to run)."""
    if sizes is None:
        sizes = size_pools(config, cpus, gpus)
    if info.ids:
        check_template_columns(config, info)
    stages = []
    for index, (operator, size) in enumerate(zip(config.operators, sizes, strict=True)):
        parameters = operator.model_dump(
            exclude={"kind", "name", "batch_size", "num_actors", "num_cpus", "num_gpus", "device", "variants"},
            exclude_none=True,
        )
        stages.append(
            StagePlan(
                index=index,
                name=operator.stage_name,
                kind=operator.kind,
                num_actors=size,
                num_cpus=operator.num_cpus,
                num_gpus=operator.num_gpus,
                batch_size=operator.batch_size,
                device=operator.resolved_device(),
                variants=operator.variant_count() if hasattr(operator, "variant_count") else 1,
                parameters=parameters,
            )
        )
    return JobPlan(
        source_uri=config.source.uri,
        source_format=config.source.format,
        input_rows=info.row_count,
        sink_uri=config.sink.uri,
        cluster_cpus=cpus,
        cluster_gpus=gpus,
        stages=stages,
    )


def check_template_columns(config: JobConfig, info: SourceInfo) -> None:
    """Refuse prompt templates and prompt columns that name columns the source does not have."""
    available = {"id", *info.passthrough_columns}
    for index, operator in enumerate(config.operators):
        wanted = operator.template_columns() if hasattr(operator, "template_columns") else set()
        missing = sorted(wanted - available)
        if missing:
            raise PlanError(
                f"operators[{index}] prompt refers to columns {missing} that the source does not have; "
                f"columns: {sorted(available)}"
            )


def assumed_resources(config: JobConfig) -> tuple[float, float]:
    """Resources for a plan made without Ray: the configured local ones, else this machine's CPUs.
    GPUs are never guessed from the driver; without a configured count there are none."""
    resources = config.run.resources
    cpus = resources.num_cpus if resources.num_cpus is not None else (os.cpu_count() or 1)
    return float(cpus), float(resources.num_gpus or 0)


def map_batches_args(config: JobConfig, index: int, stage: StagePlan) -> dict:
    """The `map_batches` arguments of one operator stage."""
    from ray.data import ActorPoolStrategy

    from operators import OPERATORS

    operator = config.operators[index]
    return {
        "fn": OPERATORS[type(operator)],
        "fn_constructor_kwargs": {
            "config": operator,
            "seed": config.run.seed,
            "offline": config.run.offline,
            "model_storage_options": config.run.model_storage.storage_options(),
            "max_image_pixels": config.source.max_image_pixels,
        },
        "compute": ActorPoolStrategy(size=stage.num_actors),
        "num_cpus": stage.num_cpus,
        "num_gpus": stage.num_gpus,
        "batch_size": stage.batch_size,
        "batch_format": "pyarrow",
        "zero_copy_batch": True,
    }


def fidelity_args(config: JobConfig) -> dict:
    """The `map_batches` arguments of the fidelity stage: a CPU task after the last operator."""
    from operators.fidelity import fidelity_batch

    return {
        "fn": fidelity_batch,
        "fn_kwargs": {
            "config": config.fidelity,
            "histogram_stages": [op.stage_name for op in config.operators if op.kind == "standardize"],
            "max_image_pixels": config.source.max_image_pixels,
        },
        "num_cpus": 1,
        "batch_size": config.operators[-1].batch_size,
        "batch_format": "pyarrow",
        "zero_copy_batch": True,
    }


def start_ray(config: JobConfig) -> None:
    """Join `run.ray_address` (or RAY_ADDRESS), else start a local instance sized by `run.resources`."""
    import ray

    if ray.is_initialized():
        return
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=config.run.resources.num_cpus,
            num_gpus=config.run.resources.num_gpus,
            include_dashboard=False,
            log_to_driver=True,
        )


def cluster_resources() -> tuple[float, float]:
    """CPUs and GPUs of the running Ray cluster."""
    import ray

    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0)), float(resources.get("GPU", 0))


@dataclass
class RunResult:
    """What a finished job reports."""

    plan: JobPlan
    summary: dict

    def to_dict(self) -> dict:
        """Plain data for JSON."""
        return {"plan": asdict(self.plan), "summary": self.summary}


def open_sink(config: JobConfig, job_hash: str):
    """Apply `sink.mode`, refuse output of another config, and clear a crashed attempt's leftovers."""
    from jobs.commits import COMMITS, SinkError, SinkState
    from jobs.storage import filesystem_for, join, open_atomically

    filesystem, root = filesystem_for(config.sink.uri, config.sink.storage.storage_options())
    exists = filesystem.exists(root) and bool(filesystem.ls(root))
    if exists and config.sink.mode == "overwrite":
        filesystem.rm(root, recursive=True)
    elif exists and config.sink.mode == "error":
        raise SinkError(
            f"sink.uri {config.sink.uri} is not empty; choose a new uri, or set sink.mode: resume (continue "
            "the same config) or overwrite"
        )
    probe = join(root, COMMITS, f".write-probe-{uuid.uuid4().hex[:8]}")
    try:  # fail fast, before any work, when the sink cannot be written
        with open_atomically(filesystem, probe) as handle:
            handle.write(b"")
        filesystem.rm(probe)
    except OSError as error:
        raise SinkError(
            f"cannot write to sink.uri {config.sink.uri} (key {probe}): {type(error).__name__}: {error}"
            " (check sink.storage credentials and permissions)"
        ) from None
    state = SinkState(config.sink)
    state.check_owner(job_hash)
    state.remove_leftovers()
    return state


def drop_committed(batch, pairs: set[tuple[str, int]]):
    """Drop rows whose (id, variant_index) is already committed (inputs a crash left half done)."""
    import pyarrow as pa

    keep = [
        (row_id, variant) not in pairs
        for row_id, variant in zip(
            batch.column("id").to_pylist(), batch.column("variant_index").to_pylist(), strict=True
        )
    ]
    return batch.filter(pa.array(keep, pa.bool_()))


def run_job(config: JobConfig, rerun_failed: bool = False) -> RunResult:
    """Run the job end to end, resuming from what the sink already committed, and return its plan
    and summary. With `rerun_failed`, committed error rows are dropped and their inputs redone."""
    from collections import Counter

    import ray
    import ray.data

    from jobs.commits import ProgressLog, SinkState, config_hash
    from jobs.report import account_for_rows, write_report, write_summary
    from jobs.s3 import counted_retries, local_retries, retry_counter
    from jobs.sinks import ParquetImageSink

    local_retries_before = local_retries()
    info = inspect_source(config.source)
    job_hash = config_hash(config)
    state = open_sink(config, job_hash)
    attempt = state.next_attempt()
    dropped = state.drop_error_rows(attempt, job_hash) if rerun_failed else 0
    committed = state.read(["id", "variant_index"])
    done = set(zip(committed.column("id").to_pylist(), committed.column("variant_index").to_pylist(), strict=True))
    per_id = Counter(row_id for row_id, _ in done)
    variants = variants_per_input(config)
    todo = [row_id for row_id in info.ids if per_id[row_id] < variants]
    todo_ids = set(todo)

    started = time.perf_counter()
    counter = counted_before = None
    if todo:
        start_ray(config)
        counter = retry_counter()
        counted_before = counted_retries(counter)
        plan = plan_job(config, info, *cluster_resources())
        logger.info(
            "plan (attempt %d, %d of %d inputs to do):\n%s", attempt, len(todo), info.row_count, plan.describe()
        )
        wanted = todo if len(todo) < info.row_count or config.source.limit is not None else None
        dataset = read_source(config.source, info, keep_source_image=config.fidelity is not None, ids=wanted)
        for index, stage in enumerate(plan.stages):
            dataset = dataset.map_batches(**map_batches_args(config, index, stage))
        if config.fidelity is not None:
            dataset = dataset.map_batches(**fidelity_args(config))
        half_done = {pair for pair in done if pair[0] in todo_ids}
        if half_done:
            dataset = dataset.map_batches(drop_committed, fn_kwargs={"pairs": half_done}, batch_format="pyarrow")
        interactive = sys.stdout.isatty()
        ray.data.DataContext.get_current().enable_progress_bars = interactive
        progress = ProgressLog(
            config.sink, attempt, len(done), plan.expected_rows, config.run.progress_interval_seconds
        )
        with progress if not interactive else contextlib.nullcontext():
            dataset.write_datasink(ParquetImageSink(config.sink, job_hash, attempt))
    else:
        plan = plan_job(config, info, *assumed_resources(config), sizes=[op.num_actors or 0 for op in config.operators])
        logger.info("nothing to do: every input is committed in %s", config.sink.uri)
    wall_seconds = time.perf_counter() - started

    state = SinkState(config.sink)
    summary = account_for_rows(config, plan, info, state, wall_seconds)
    summary.update(
        config_hash=job_hash,
        attempt=attempt,
        inputs_processed=len(todo),
        rows_already_committed=len(done),
        error_rows_dropped_for_rerun=dropped,
    )
    state.write_manifest(job_hash, summary["rows_out"])
    # Every storage retry up to here; those of writing the summary and report themselves are logged.
    summary["retried"] = local_retries() - local_retries_before
    if counter is not None:
        counted_after = counted_retries(counter)
        if counted_before is None or counted_after is None:
            summary["retried"] = None  # unknown: the counter was lost
        else:
            summary["retried"] += counted_after - counted_before
    write_summary(config.sink, summary)
    summary["report"] = write_report(config, info, summary, state)
    return RunResult(plan=plan, summary=summary)
