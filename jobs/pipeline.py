"""Planning and running a job: the one place that turns operator configs into Ray Data stages.

`plan_job` is pure: from a validated config, what the source holds and the cluster's resources,
it decides each stage's actor pool, resources and batch size (and is what `--dry-run` prints).
`run_job` starts or joins Ray, builds read -> operators -> write, and accounts for every row.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

from jobs.config import JobConfig
from jobs.fragments import FRAGMENT, ROW
from jobs.sources import SourceInfo, check_ids, inspect_source, read_source
from operators.base import UserError
from operators.storage import redact

logger = logging.getLogger(__name__)


class PlanError(UserError):
    """A job that cannot run on the cluster it was given."""


@dataclass
class StagePlan:
    """One operator's place in the job."""

    index: int
    name: str
    kind: str
    num_actors: int  # 0 for a stage that runs as CPU tasks (`tasks`)
    num_cpus: float
    num_gpus: float
    batch_size: int
    device: str
    variants: int
    parameters: dict = field(default_factory=dict)
    tasks: bool = False  # runs as CPU tasks (`OperatorConfig.runs_as_tasks`), no actor pool


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
            workers = (
                f"CPU tasks of {stage.num_cpus:g} CPU"
                if stage.tasks
                else f"{stage.num_actors} actor(s) x {stage.num_cpus:g} CPU / {stage.num_gpus:g} GPU"
            )
            lines.append(
                f"stage {stage.index} {stage.name!r} ({stage.kind}): {workers}, batch_size {stage.batch_size}, "
                f"device {stage.device}, {stage.variants} variant(s) per row"
            )
            for key, value in stage.parameters.items():
                lines.append(f"    {key}: {value}")
        lines.append(f"sink:    {self.sink_uri} ({self.expected_rows} rows expected)")
        return "\n".join(lines)


def size_pools(config: JobConfig, cpus: float, gpus: float) -> list[int]:
    """Actors per operator, leaving `run.resources.reserved_cpus` free so reads and writes
    are never starved (a pool that takes every CPU hangs the job).

    A stage that runs as CPU tasks (`runs_as_tasks`) has no pool: 0, and takes no share.
    GPU stages get as many actors as the GPUs allow. CPU stages with `num_actors` take what they
    ask for; the CPUs left are split evenly between the other CPU stages, each getting as many
    actors as its share holds (at least one, or the plan is refused naming the split). An actor
    reserves its `num_cpus` as configured, never less: a stage that should share a CPU says so
    with a fraction (`num_cpus: 0.5`), as configs/chain.yaml does."""
    operators = config.operators
    sizes: list[int | None] = [None] * len(operators)
    for index, operator in enumerate(operators):
        if operator.runs_as_tasks():
            sizes[index] = 0
            continue
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
    reserved = config.run.resources.reserved_cpus
    gpu_stage_cpus = sum(
        operators[i].num_cpus * sizes[i] for i in range(len(operators)) if sizes[i] and operators[i].num_gpus > 0
    )
    free = cpus - reserved - gpu_stage_cpus
    cpu_stages = [i for i in range(len(operators)) if sizes[i] is None]
    fixed = [i for i in cpu_stages if operators[i].num_actors is not None]
    automatic = [i for i in cpu_stages if operators[i].num_actors is None]

    def refuse(index: int, actors: int, detail: str, fix: str) -> PlanError:
        operator = operators[index]
        taken = f", {gpu_stage_cpus:g} taken by GPU stages" if gpu_stage_cpus else ""
        return PlanError(
            f"operators[{index}] needs {actors} actor(s) x {operator.num_cpus:g} CPUs but the cluster has "
            f"{cpus:g} CPUs, {reserved:g} kept for reads and writes (run.resources.reserved_cpus){taken}, "
            f"leaving {max(free, 0):g} for CPU stages{detail}; {fix}, or give the job more CPUs "
            "(run.resources.num_cpus, or a larger cluster)"
        )

    for index in fixed:
        sizes[index] = operators[index].num_actors
    demand = sum(operators[i].num_actors * operators[i].num_cpus for i in fixed)
    if fixed and demand > free + 1e-9:
        index = fixed[-1]
        others = f", of which the stages with num_actors ask {demand:g}" if len(fixed) > 1 else ""
        raise refuse(index, operators[index].num_actors, others, f"lower operators[{index}].num_actors or num_cpus")
    share = (free - demand) / len(automatic) if automatic else 0.0
    for index in automatic:
        operator = operators[index]
        sizes[index] = math.floor(share / operator.num_cpus + 1e-9)
        if sizes[index] < 1:
            stages = ", ".join(f"operators[{i}]" for i in automatic)
            after = f" after the {demand:g} that stages with num_actors take" if demand else ""
            split = (
                f"{after}, split between the {len(automatic)} CPU stages sized automatically ({stages}): "
                f"{max(share, 0):g} CPUs each"
                if len(automatic) > 1
                else f"{after}: {max(share, 0):g} for operators[{index}]"
                if demand
                else ""
            )
            fix = (
                f"set operators[{index}].num_cpus to {share:g} or less (a fraction shares a CPU)"
                if share > 0
                else "lower the num_actors or num_cpus of the other stages"
            )
            raise refuse(index, 1, split, fix)
    return [int(size) for size in sizes]


def variants_per_input(config: JobConfig) -> int:
    """Output rows each input row becomes: the product of every stage's variants."""
    return math.prod(op.variant_count() for op in config.operators)


def plan_job(config: JobConfig, info: SourceInfo, cpus: float, gpus: float, sizes: list[int] | None = None) -> JobPlan:
    """Decide pools, resources and batch sizes (see module docstring); `sizes` skips the sizing
    (for a job with nothing left to run)."""
    if sizes is None:
        sizes = size_pools(config, cpus, gpus)
    if info.fragments:
        check_input_columns(config, info)
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
                # A stage of CPU tasks reserves what the tasks around it do (see `stage_steps`).
                num_cpus=config.run.resources.cpu_step_cpus if operator.runs_as_tasks() else operator.num_cpus,
                num_gpus=operator.num_gpus,
                batch_size=operator.batch_size,
                device=operator.resolved_device(),
                variants=operator.variant_count(),
                parameters=parameters,
                tasks=operator.runs_as_tasks(),
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


def check_input_columns(config: JobConfig, info: SourceInfo) -> None:
    """Refuse operators that read columns (prompt templates, prompt, mask, reference and control-image
    columns) that neither the source nor an earlier stage (`written_columns`, e.g. a saved depth map)
    provides."""
    available = {"id", *info.passthrough_columns}
    for index, operator in enumerate(config.operators):
        missing = sorted(operator.input_columns() - available)
        if missing:
            raise PlanError(
                f"operators[{index}] reads columns {missing} that neither the source nor an earlier stage has; "
                f"columns: {sorted(available)}"
            )
        available |= operator.written_columns()


def assumed_resources(config: JobConfig) -> tuple[float, float]:
    """Resources for a plan made without Ray: the configured local ones, else this machine's CPUs.
    GPUs are never guessed from the driver; without a configured count there are none."""
    resources = config.run.resources
    cpus = resources.num_cpus if resources.num_cpus is not None else (os.cpu_count() or 1)
    return float(cpus), float(resources.num_gpus or 0)


def operator_arguments(config: JobConfig, index: int) -> dict:
    """What each step of operator `index` is built from: its class's constructor arguments."""
    operator = config.operators[index]
    return {
        "config": operator,
        "seed": config.run.seed,
        "offline": config.run.offline,
        "model_storage_options": config.run.model_storage.storage_options(),
        "max_image_pixels": config.source.max_image_pixels,
    }


# Fragments per cluster CPU from which each is read as one block (see `read_source`): two, so that
# no CPU waits long for the last fragment.
READ_BLOCKS_PER_CPU = 2

# The largest alignment of read blocks `read_alignment` asks for; past it, the first model stage's.
MAX_READ_ALIGNMENT = 1024


def read_alignment(plan: JobPlan) -> int | None:
    """Source rows that every model stage's batches divide evenly (a stage after stages of variants
    sees each source row as that many rows), so that the blocks `read_source` cuts a fragment into
    make full batches and full model calls; None for a job without a model stage (a CPU stage's
    output does not depend on its batches). Past `MAX_READ_ALIGNMENT`, what the first model stage needs."""
    needs, fan_out = [], 1
    for stage in plan.stages:
        if not stage.tasks:
            needs.append(stage.batch_size // math.gcd(stage.batch_size, fan_out))
        fan_out *= stage.variants
    if not needs:
        return None
    alignment = math.lcm(*needs)
    return alignment if alignment <= MAX_READ_ALIGNMENT else needs[0]


# Batches queued on each model actor: one running, one ready for when it finishes.
MODEL_PREFETCH_BATCHES = 2


def stage_steps(config: JobConfig, index: int, stage: StagePlan) -> list[dict]:
    """The `map_batches` arguments of one operator stage: its prepare step (CPU tasks, no model), then
    its model step (the stage's actor pool, which loads the model once per actor); or, for a stage
    that loads no model (`StagePlan.tasks`), both steps in one CPU task, which Ray may fuse with the
    tasks around it as it would a plain `map_batches`."""
    from ray.data import ActorPoolStrategy

    from operators import OPERATORS
    from operators.steps import model_step, prepare_step, task_step

    operator_class = OPERATORS[type(config.operators[index])]
    arguments = operator_arguments(config, index)
    common = {"batch_size": stage.batch_size, "batch_format": "pyarrow", "zero_copy_batch": True}
    if stage.tasks:
        # Reserving what the tasks around it do lets Ray fuse read, steps, finish and write into one task.
        return [
            {
                "fn": task_step(operator_class),
                "fn_kwargs": {"arguments": arguments, "batch_size": stage.batch_size},
                **cpu_step_resources(config),
                **common,
                "batch_size": None,  # whole blocks, batched by the step itself (see `task_step`)
            }
        ]
    prepare = {
        "fn": prepare_step(operator_class),
        "fn_kwargs": {"arguments": arguments},
        **cpu_step_resources(config),
        # Ray Data's own default for its tasks, stated so that these remote arguments never equal a CPU
        # actor's: Ray fuses a task into the actor stage after it when they do, which would put the
        # prepare step back on the actor. (Ray 2.60 has no named parameter for it; see `add_step`.)
        "max_retries": -1,
        **common,
    }
    model = {
        "fn": model_step(operator_class),
        "fn_constructor_kwargs": {"operator_class": operator_class, "arguments": arguments},
        # While an actor runs one batch the next waits in its queue, its inputs already transferred.
        "compute": ActorPoolStrategy(size=stage.num_actors, max_tasks_in_flight_per_actor=MODEL_PREFETCH_BATCHES),
        "num_cpus": stage.num_cpus,
        "num_gpus": stage.num_gpus,
        **common,
    }
    return [prepare, model]


def cpu_step_resources(config: JobConfig) -> dict:
    """What every task around the actor pools reserves (read, prepare, finish, write): the same, so
    Ray runs the finish step and the write as one task (encode, then write and commit, with no
    hand-over in between), and so the write is never the one task that waits for a whole free CPU
    while fractional tasks keep taking it (commits would then pile up to the end of the job)."""
    return {"num_cpus": config.run.resources.cpu_step_cpus}


def add_step(dataset, step: dict):
    """`dataset.map_batches(**step)`, without Ray's notice that remote arguments outside its named
    parameters will go: the prepare step needs one that has no name yet (see `stage_steps`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(**step)


def finish_args(config: JobConfig, job_hash: str = "") -> dict:
    """The `map_batches` arguments of the finish step: CPU tasks after the last stage that run the
    fidelity checks (when configured) and encode each output once, as the sink says (and, with
    `sink.dicom`, once more as a derived DICOM instance whose UIDs derive from `job_hash`)."""
    from operators.finish import DicomOutput, finish_batch

    return {
        "fn": finish_batch,
        "fn_kwargs": {
            "stage_name": config.operators[-1].stage_name,
            "encoding": config.sink.encoding,
            "fidelity": config.fidelity,
            "histogram_stages": [op.stage_name for op in config.operators if op.kind == "standardize"],
            "max_image_pixels": config.source.max_image_pixels,
            "dicom": (
                DicomOutput(job_hash, derivation(config), tuple(config.source.dicom_settings.attributes))
                if config.sink.dicom
                else None
            ),
        },
        **cpu_step_resources(config),
        # Whole blocks: each row is finished on its own, and a batch size would keep Ray from fusing
        # the read with the steps before it (see `read_source`).
        "batch_size": None,
        "batch_format": "pyarrow",
        "zero_copy_batch": True,
    }


def derivation(config: JobConfig) -> str:
    """What a derived DICOM instance says made it (`DerivationDescription`): restyle's version and each
    stage, with a standardize stage's steps."""
    from importlib import metadata

    stages = []
    for operator in config.operators:
        steps = operator.steps if operator.kind == "standardize" else None
        named = f"{operator.kind} ({', '.join(step.op for step in steps)})" if steps else operator.kind
        stages.append(named if operator.stage_name == operator.kind else f"{operator.stage_name}: {named}")
    return f"restyle {metadata.version('restyle')}: {'; '.join(stages)}"


def start_ray(config: JobConfig, verbose: bool = False) -> None:
    """Join the cluster named by `run.ray_address` (else RAY_ADDRESS, which `ray job submit` sets), else
    start a private local instance sized by `run.resources`. Without an address nothing is joined: not a
    cluster that `/tmp/ray/ray_current_cluster` names (a crashed `ray start` leaves it behind), not a
    live local `ray start --head`. A start-up failure is a `ClusterError`. Unless `verbose`, each worker
    drops the notices `jobs.progress` lists as it starts."""
    import ray

    from jobs.progress import ray_log_level, worker_runtime_env

    if ray.is_initialized():
        return
    field_name, address = ray_address_setting(config)
    if address is None or address == "local":
        try:
            ray.init(
                address="local",
                num_cpus=config.run.resources.num_cpus,
                num_gpus=config.run.resources.num_gpus,
                include_dashboard=False,
                log_to_driver=True,
                logging_level=ray_log_level(verbose),
                runtime_env=worker_runtime_env(verbose),
            )
        except Exception as error:  # Ray raises anything from OSError to RuntimeError here
            raise ClusterError(
                f"cannot start a local Ray instance (run.resources num_cpus={config.run.resources.num_cpus}, "
                f"num_gpus={config.run.resources.num_gpus}): {first_line(error)}"
            ) from None
        return
    gcs_address = reachable_address(field_name, address)
    try:
        ray.init(
            address=address,
            log_to_driver=True,
            logging_level=ray_log_level(verbose),
            runtime_env=worker_runtime_env(verbose),
        )
    except Exception as error:
        raise ClusterError(
            f"cannot join the Ray cluster at {field_name} {redact(address)} ({gcs_address}): "
            f"{first_line(error)}; {ADDRESS_FORMS}"
        ) from None


ADDRESS_FORMS = (
    "accepted: 'auto' (the cluster this node runs), HOST:PORT of a head's GCS (port 6379 by default), "
    "ray://HOST:PORT (Ray client, port 10001), or no address for a private local instance"
)
CONNECT_TIMEOUT_SECONDS = 10.0


class ClusterError(UserError):
    """A Ray cluster that cannot be joined or started: a bad or unreachable address, or bad resources."""


def ray_address_setting(config: JobConfig) -> tuple[str, str | None]:
    """Which setting names the cluster to join, and its value (None: start a private local instance).
    An empty RAY_ADDRESS counts as unset."""
    if config.run.ray_address:
        return "run.ray_address", config.run.ray_address.strip()
    return "RAY_ADDRESS", os.environ.get("RAY_ADDRESS", "").strip() or None


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def reachable_address(field_name: str, address: str) -> str:
    """HOST:PORT that `address` connects to, checked to answer within CONNECT_TIMEOUT_SECONDS (Ray itself
    retries an address that does not answer for many minutes)."""
    import socket

    shown = redact(address)
    scheme, _, rest = address.rpartition("://")
    if scheme and scheme != "ray":
        hint = " (that is a job server; use `restyle submit --address`)" if scheme in ("http", "https") else ""
        raise ClusterError(f"{field_name} {shown} is not a Ray cluster address{hint}; {ADDRESS_FORMS}")
    if address == "auto":  # what Ray would join: RAY_ADDRESS, ray_current_cluster, else a running GCS
        try:
            from ray._private.services import canonicalize_bootstrap_address

            rest = canonicalize_bootstrap_address("auto") or ""
        except Exception as error:
            raise ClusterError(
                f"{field_name} auto found no Ray cluster on this node ({first_line(error)}); {ADDRESS_FORMS}"
            ) from None
    hostport = rest.rsplit("@", 1)[-1].split("/", 1)[0]
    host, colon, port = hostport.rpartition(":")
    if not colon and scheme == "ray":
        host, port = hostport, "10001"
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"{field_name} {shown} is not a valid Ray address; {ADDRESS_FORMS}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise ClusterError(
            f"{field_name} {shown}: nothing answers at {host}:{port} ({type(error).__name__}: {error}); "
            f"start the cluster or fix the address; {ADDRESS_FORMS}"
        ) from None
    return f"{host}:{port}"


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


def open_sink(config: JobConfig, job_hash: str, run_id: str, force: bool = False):
    """Check where the sink is, take its lease, apply `sink.mode`, refuse output of another config,
    and clear a crashed attempt's leftovers. Returns the sink's state and the lease (renewing in the
    background), which the caller releases."""
    from jobs.commits import SinkError, SinkState, check_sink_location, remove_outputs, storage_errors, survey
    from jobs.lease import LEASE, SinkBusy, SinkLease
    from operators.storage import filesystem_for

    check_sink_location(config)
    uri, mode = config.sink.uri, config.sink.mode
    filesystem, root = filesystem_for(uri, config.sink.storage.storage_options())
    failures = storage_errors()
    try:
        entries = [path for path in filesystem.ls(root, detail=False) if path.rstrip("/").rsplit("/", 1)[-1] != LEASE]
        foreign = survey(filesystem, root)[1] if entries and mode == "overwrite" and not force else []
    except FileNotFoundError:
        entries, foreign = [], []
    except failures as error:
        raise SinkError(f"cannot read sink.uri {uri}: {_storage_failure(error)}") from None
    if entries and mode == "error":
        raise SinkError(
            f"sink.uri {uri} is not empty; choose a new uri, or set sink.mode: resume (continue "
            "the same config) or overwrite"
        )
    if foreign:
        raise SinkError(
            f"sink.uri {uri} holds files restyle did not write ({len(foreign)} entries: {', '.join(foreign[:3])}); "
            "overwrite deletes only restyle's own outputs: move them, choose a new uri, or run with --force to keep "
            "them and replace the rest"
        )
    lease = SinkLease(filesystem, root, uri, run_id, job_hash)
    try:  # the lease is the first write: it fails fast, before any work, when the sink cannot be written
        lease.acquire()
    except SinkBusy as busy:
        raise SinkError(str(busy)) from None
    except failures as error:
        raise SinkError(f"cannot write to sink.uri {uri} (key {lease.path}): {_storage_failure(error)}") from None
    try:
        if mode == "overwrite":
            ours = [path for path in survey(filesystem, root)[0] if not path.endswith(f"/{LEASE}")]
            remove_outputs(filesystem, root, ours)
        state = SinkState(config.sink)
        state.check_owner(job_hash, force)
        state.remove_leftovers()
    except failures as error:
        lease.release()
        raise SinkError(f"cannot read or write sink.uri {uri}: {_storage_failure(error)}") from None
    except BaseException:
        lease.release()
        raise
    return state, lease.start()


def _storage_failure(error: Exception) -> str:
    """A storage error in one line, with no credential, and what to check."""
    return f"{type(error).__name__}: {redact(str(error))} (check sink.storage credentials, endpoint and permissions)"


def drop_committed(batch, pairs: dict[int, set[tuple[int, int]]]):
    """Drop rows whose (row, variant_index) of their fragment is already committed: the outputs of a
    fragment a crash left half done. `pairs` maps `_fragment` indices to those pairs."""
    import pyarrow as pa

    keep = [
        (row, variant) not in pairs.get(fragment, ())
        for fragment, row, variant in zip(
            batch.column(FRAGMENT).to_pylist(),
            batch.column(ROW).to_pylist(),
            batch.column("variant_index").to_pylist(),
            strict=True,
        )
    ]
    return batch.filter(pa.array(keep, pa.bool_()))


@dataclass
class ResumePlan:
    """What is left of a job, per fragment (`jobs.fragments`): the fragments to read, and for those
    a crash left half done, the rows to skip (every variant committed) and the (row, variant) pairs
    to drop after the last stage (some variants committed)."""

    todo: list[int]
    skip_rows: dict[int, frozenset[int]]
    drop_pairs: dict[int, set[tuple[int, int]]]
    committed_rows: int
    inputs: int  # inputs with at least one output still to make


def plan_resume(info: SourceInfo, state, variants: int) -> ResumePlan:
    """Compare each fragment's committed tally with a complete one's: equal is done, absent is to do,
    anything else is half done, and only then are its committed rows read (`source_fragment` filter)."""
    from collections import Counter

    from jobs.fragments import SOURCE_FRAGMENT, SOURCE_ROW, expected_tally

    state.refuse_records_without_tallies()
    committed = state.tallies()
    todo, half_done = [], {}
    inputs = 0
    for index, fragment in enumerate(info.fragments):
        have = committed.get(fragment.key)
        if have is not None and tuple(have) == expected_tally(fragment, variants):
            continue
        todo.append(index)
        if have is None:
            inputs += fragment.rows
        else:
            half_done[fragment.key] = index
    skip_rows, drop_pairs = {}, {}
    if half_done:
        table = state.read_fragments([SOURCE_FRAGMENT, SOURCE_ROW, "variant_index"], list(half_done))
        pairs: dict[int, set[tuple[int, int]]] = {}
        for key, row, variant in zip(*(table.column(name).to_pylist() for name in table.column_names), strict=True):
            pairs.setdefault(half_done[key], set()).add((row, variant))
        for index in half_done.values():
            done = pairs.get(index, set())
            per_row = Counter(row for row, _ in done)
            skip_rows[index] = frozenset(row for row, count in per_row.items() if count >= variants)
            drop_pairs[index] = {pair for pair in done if pair[0] not in skip_rows[index]}
            inputs += info.fragments[index].rows - len(skip_rows[index])
    drop_pairs = {index: pairs for index, pairs in drop_pairs.items() if pairs}
    return ResumePlan(todo, skip_rows, drop_pairs, state.rows, inputs)


def uses_object_storage(config: JobConfig) -> bool:
    """Whether the job reads or writes s3:// anywhere: its source, its sink or a model it loads."""
    uris = [config.source.uri, config.sink.uri]
    uris += [reference.uri for operator in config.operators for reference in operator.model_references()]
    return any(uri.startswith("s3://") for uri in uris)


def run_job(
    config: JobConfig, rerun_failed: bool = False, force: bool = False, verbose: bool = False, quiet: bool = False
) -> RunResult:
    """Run the job end to end, resuming from what the sink already committed, and return its plan
    and summary. With `rerun_failed`, committed error rows are dropped and their inputs redone;
    `force` lets the job proceed in a sink holding files restyle did not write (they are kept).
    The sink's lease is held from opening the sink to the end. Progress (`jobs.progress`) is a bar on
    a terminal, else log lines; none when `quiet`; Ray Data's own bars and status lines only when `verbose`."""
    from jobs.commits import config_hash
    from operators.models import require_vetted_models
    from operators.s3 import local_retries

    require_vetted_models(config.operators, config.run.offline)
    local_retries_before = local_retries()
    info = inspect_source(config.source)
    job_hash = config_hash(config)
    run_id = uuid.uuid4().hex[:8]
    state, lease = open_sink(config, job_hash, run_id, force)
    try:
        return _run_holding_lease(
            config, info, job_hash, run_id, state, lease, rerun_failed, local_retries_before, verbose, quiet
        )
    finally:
        lease.release()


def _run_holding_lease(
    config, info, job_hash, run_id, state, lease, rerun_failed, local_retries_before, verbose=False, quiet=False
) -> RunResult:
    """`run_job` once the sink is open and its lease held."""
    from jobs.commits import SinkState
    from jobs.hub import write_card
    from jobs.progress import Progress, job_metrics, progress_mode, quiet_ray_data
    from jobs.report import AccountingError, account_for_rows, write_report, write_summary
    from jobs.sinks import ParquetImageSink
    from operators.s3 import counted_retries, local_retries, retry_counter

    attempt = state.next_attempt()
    dropped = state.drop_error_rows(attempt, job_hash, run_id) if rerun_failed else 0
    variants = variants_per_input(config)
    resume = plan_resume(info, state, variants)

    started = time.perf_counter()
    counter = counted_before = None
    if resume.todo:
        start_ray(config, verbose)
        quiet_ray_data(verbose)  # before any dataset is built: each copies the DataContext
        if uses_object_storage(config):  # only S3 requests retry; a local job needs no counter actor
            counter = retry_counter()
            counted_before = counted_retries(counter)
        cpus, gpus = cluster_resources()
        plan = plan_job(config, info, cpus, gpus)
        check_ids(config.source, info, tasks=max(int(cpus), 1), **cpu_step_resources(config))
        logger.info(
            "plan (attempt %d, run %s, %d of %d inputs to do, in %d of %d fragments):\n%s",
            attempt,
            run_id,
            resume.inputs,
            info.row_count,
            len(resume.todo),
            len(info.fragments),
            plan.describe(),
        )
        dataset = read_source(
            config.source,
            info,
            keep_source_image=config.fidelity is not None,
            fragments=resume.todo,
            skip_rows=resume.skip_rows,
            min_blocks=READ_BLOCKS_PER_CPU * max(int(cpus), 1),
            align=read_alignment(plan),
            **cpu_step_resources(config),
        )
        for index, stage in enumerate(plan.stages):
            for step in stage_steps(config, index, stage):
                dataset = add_step(dataset, step)
        dataset = dataset.map_batches(**finish_args(config, job_hash))
        if resume.drop_pairs:
            dataset = dataset.map_batches(
                drop_committed,
                fn_kwargs={"pairs": resume.drop_pairs},
                batch_format="pyarrow",
                **cpu_step_resources(config),
            )
        metrics = job_metrics(run_id, plan.expected_rows)
        progress = Progress(
            config.sink,
            attempt,
            resume.committed_rows,
            plan.expected_rows,
            config.run.progress_interval_seconds,
            run_id,
            mode=progress_mode(verbose, quiet),
            metrics=metrics,
        )
        with progress:
            dataset.write_datasink(
                ParquetImageSink(config.sink, job_hash, attempt, run_id, [fragment.key for fragment in info.fragments]),
                ray_remote_args=cpu_step_resources(config),
            )
    else:
        metrics = None
        plan = plan_job(config, info, *assumed_resources(config), sizes=[op.num_actors or 0 for op in config.operators])
        logger.info("nothing to do: every input is committed in %s", config.sink.uri)
    wall_seconds = time.perf_counter() - started

    if lease.lost:
        raise AccountingError(f"{lease.lost}; this run's output is not finalized (no _manifest.json written)")
    state = SinkState(config.sink)
    summary = account_for_rows(config, plan, info, state, wall_seconds)
    summary.update(
        config_hash=job_hash,
        attempt=attempt,
        run_id=run_id,
        inputs_processed=resume.inputs,
        rows_already_committed=resume.committed_rows,
        error_rows_dropped_for_rerun=dropped,
    )
    if config.sink.imagefolder:
        from jobs.sinks import write_imagefolder_metadata

        write_imagefolder_metadata(config.sink, sorted(state.commits))
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
    write_card(config, summary, state)
    summary["report"] = write_report(config, info, summary, state)
    if metrics is not None:
        metrics.summary(summary)
    return RunResult(plan=plan, summary=summary)
