"""Pool sizing and the plan: reads and writes always keep room, GPUs come from the cluster only."""

from __future__ import annotations

import pytest

from jobs.config import validate_config
from jobs.fragments import Fragment
from jobs.pipeline import PlanError, add_step, finish_args, plan_job, size_pools, stage_steps, uses_object_storage
from jobs.sources import SourceInfo


def config(*operators, reserved=1.0):
    entries = [
        {"kind": "img2img", "model": "m", "prompt": "p", "name": f"s{i}", **op} for i, op in enumerate(operators)
    ]
    return validate_config(
        {
            "source": {"uri": "in"},
            "operators": entries,
            "sink": {"uri": "out"},
            "run": {"resources": {"reserved_cpus": reserved}},
        }
    )


def test_two_cpus_leave_one_for_reads_and_writes():
    assert size_pools(config({}), cpus=2, gpus=0) == [1]


def test_cpu_pools_share_what_is_left():
    assert size_pools(config({}, {}), cpus=9, gpus=0) == [4, 4]
    assert size_pools(config({"num_cpus": 2}), cpus=8, gpus=0) == [3]


def test_a_pool_that_would_starve_reads_is_refused():
    with pytest.raises(PlanError, match=r"operators\[0\] needs 2 actor\(s\) x 1 CPUs but the cluster has 2 CPUs"):
        size_pools(config({"num_actors": 2}), cpus=2, gpus=0)
    with pytest.raises(PlanError, match="reserved_cpus"):
        size_pools(config({"num_cpus": 2}), cpus=2, gpus=0)


def test_gpu_pools_follow_gpus_including_fractions():
    assert size_pools(config({"num_gpus": 1}), cpus=16, gpus=4) == [4]
    assert size_pools(config({"num_gpus": 0.5}), cpus=16, gpus=2) == [4]
    assert size_pools(config({"num_gpus": 1}, {}), cpus=8, gpus=2) == [2, 5]


def test_gpu_operator_without_gpus_is_refused_unless_pool_is_explicit():
    with pytest.raises(PlanError, match=r"operators\[0\].num_gpus is 1 per actor but the cluster has 0 GPUs"):
        size_pools(config({"num_gpus": 1}), cpus=8, gpus=0)
    assert size_pools(config({"num_gpus": 1, "num_actors": 3}), cpus=8, gpus=0) == [3]


def test_plan_describes_stages_and_expected_rows():
    plan = plan_job(
        config({"variants": 3, "batch_size": 8}), SourceInfo(fragments=[Fragment("rows.parquet#0", 2)]), cpus=2, gpus=0
    )
    assert plan.expected_rows == 6
    text = plan.describe()
    assert "stage 0 's0' (img2img): 1 actor(s) x 1 CPU / 0 GPU, batch_size 8, device cpu, 3 variant(s)" in text
    assert "sink:    out (6 rows expected)" in text


def test_each_stage_is_a_cpu_prepare_step_then_an_actor_pool_model_step():
    from ray.data import ActorPoolStrategy

    from operators.steps import ModelStep

    job = config({"num_gpus": 1, "batch_size": 16})
    plan = plan_job(job, SourceInfo(fragments=[Fragment("rows.parquet#0", 1)]), cpus=8, gpus=2)
    prepare, model = stage_steps(job, 0, plan.stages[0])
    assert prepare["fn"].__name__ == "Img2ImgPrepare" and "compute" not in prepare
    assert prepare["max_retries"] == -1 and "max_retries" not in model  # never fused into the actor
    assert (prepare["num_cpus"], prepare.get("num_gpus", 0)) == (job.run.resources.cpu_step_cpus, 0)
    assert issubclass(model["fn"], ModelStep) and model["fn"].__name__ == "Img2ImgModel"
    assert model["compute"].max_tasks_in_flight_per_actor == 2  # the next batch waits ready
    assert isinstance(model["compute"], ActorPoolStrategy)
    assert model["compute"].min_size == model["compute"].max_size == 2
    assert (model["num_gpus"], model["num_cpus"], model["batch_size"], model["batch_format"]) == (1, 1, 16, "pyarrow")
    assert "concurrency" not in model
    assert model["fn_constructor_kwargs"]["arguments"]["config"] is job.operators[0]
    finish = finish_args(job)
    assert finish["fn_kwargs"]["stage_name"] == job.operators[0].stage_name and "compute" not in finish


def test_a_cpu_stage_that_reserves_what_a_prepare_task_does_still_runs_prepare_apart(ray_session):
    """Ray fuses a task into the actor stage after it when their remote arguments match; the prepare
    step must stay a task of its own, also for a CPU operator of `cpu_step_cpus` CPUs."""
    import ray.data

    from tests.conftest import make_batch, png_bytes

    job = validate_config(
        {
            "source": {"uri": "in"},
            "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}], "num_cpus": 0.5, "num_actors": 1}],
            "sink": {"uri": "out"},
        }
    )
    assert job.operators[0].num_cpus == job.run.resources.cpu_step_cpus
    plan = plan_job(job, SourceInfo(fragments=[Fragment("rows.parquet#0", 2)]), cpus=2, gpus=0)
    dataset = ray.data.from_arrow(make_batch([png_bytes(8, 8), png_bytes(6, 6)]))
    for step in stage_steps(job, 0, plan.stages[0]):
        dataset = add_step(dataset, step)
    rows = dataset.materialize()
    assert rows.count() == 2
    stats = rows.stats()
    assert "MapBatches(StandardizePrepare)->MapBatches(StandardizeModel)" not in stats
    assert "MapBatches(StandardizePrepare)" in stats and "MapBatches(StandardizeModel)" in stats


@pytest.mark.parametrize(
    ("source", "sink", "model", "expected"),
    [
        ("in", "out", "m", False),
        ("s3://bucket/in", "out", "m", True),
        ("in", "s3://bucket/out", "m", True),
        ("in", "out", "s3://bucket/models/sd", True),
    ],
)
def test_only_jobs_touching_object_storage_count_its_retries_in_an_actor(source, sink, model, expected):
    """The retry counter is an actor (a process, about 60 MiB); only S3 requests retry."""
    job = validate_config(
        {
            "source": {"uri": source},
            "operators": [{"kind": "img2img", "model": model, "prompt": "p"}],
            "sink": {"uri": sink},
        }
    )
    assert uses_object_storage(job) is expected


@pytest.mark.parametrize(
    ("operator", "tasks"),
    [
        ({"kind": "standardize", "steps": [{"op": "normalize"}]}, True),
        ({"kind": "standardize", "steps": [{"op": "normalize"}], "num_actors": 1}, False),
        ({"kind": "upscale", "method": "lanczos", "scale": 2}, True),
        ({"kind": "upscale", "method": "sd_x4", "model": "m"}, False),
        ({"kind": "img2img", "model": "m", "prompt": "p"}, False),
    ],
)
def test_a_stage_that_loads_no_model_runs_as_cpu_tasks_not_an_idle_actor(operator, tasks):
    """An actor holds its CPU between batches; a stage without a model would leave it mostly idle."""
    job = validate_config({"source": {"uri": "in"}, "operators": [operator], "sink": {"uri": "out"}})
    plan = plan_job(job, SourceInfo(fragments=[Fragment("rows.parquet#0", 4)]), cpus=2, gpus=0)
    steps = stage_steps(job, 0, plan.stages[0])
    assert plan.stages[0].tasks is tasks
    if tasks:
        (step,) = steps
        assert step["fn"].__name__.endswith("Steps") and "compute" not in step
        assert plan.stages[0].num_actors == 0 and "CPU tasks of 0.5 CPU" in plan.describe()
        assert step["num_cpus"] == job.run.resources.cpu_step_cpus  # fused with the read, finish and write
    else:
        assert [step.get("compute") is not None for step in steps] == [False, True]


def standardize_job(source, rows_per_shard=1000, batch_size=3):
    return validate_config(
        {
            "source": {"uri": str(source)},
            "operators": [{"kind": "standardize", "steps": [{"op": "normalize"}], "batch_size": batch_size}],
            "sink": {"uri": str(source.parent / "out"), "rows_per_shard": rows_per_shard},
        }
    )


@pytest.mark.parametrize(("row_groups", "fused"), [(4, True), (1, False)])
def test_a_cpu_stage_runs_in_the_read_task_when_each_fragment_can_be_a_block(ray_session, tmp_path, row_groups, fused):
    """Ray fuses the read with the steps after it unless it splits blocks or a step asks for a batch
    size; then rows never wait in the object store between reading and writing. One fragment on two
    CPUs is split for parallelism instead (Ray's default), so nothing is fused."""
    import pyarrow.parquet as pq

    from jobs.pipeline import READ_BLOCKS_PER_CPU
    from jobs.sources import inspect_source, read_source
    from tests.conftest import make_batch, png_bytes

    table = make_batch([png_bytes(8, 8, (i, 0, 0)) for i in range(16)]).select(["id", "image"])
    pq.write_table(table, tmp_path / "rows.parquet", row_group_size=16 // row_groups)
    job = standardize_job(tmp_path / "rows.parquet")
    info = inspect_source(job.source)
    assert len(info.fragments) == row_groups
    plan = plan_job(job, info, cpus=2, gpus=0)
    dataset = read_source(job.source, info, min_blocks=READ_BLOCKS_PER_CPU * 2, num_cpus=0.5)
    for step in stage_steps(job, 0, plan.stages[0]):
        dataset = add_step(dataset, step)
    dataset = dataset.map_batches(**finish_args(job)).materialize()
    assert sorted(row["id"] for row in dataset.take_all()) == sorted(table.column("id").to_pylist())
    assert ("ReadParquet->MapBatches(StandardizeSteps)->MapBatches(finish_batch)" in dataset.stats()) is fused


def test_a_task_stage_runs_its_operator_on_batches_of_its_batch_size():
    """A task step takes whole blocks (so Ray can fuse it with the read) and batches them itself."""
    from jobs.pipeline import operator_arguments
    from operators import OPERATORS
    from operators.finish import finish_batch
    from operators.steps import task_step
    from tests.conftest import make_batch, png_bytes

    job = standardize_job(__import__("pathlib").Path("in"), batch_size=3)
    operator_class = OPERATORS[type(job.operators[0])]
    block = make_batch([png_bytes(8, 8, (i, 0, 0)) for i in range(7)])
    outputs = list(task_step(operator_class)(block, operator_arguments(job, 0), batch_size=3))
    assert [output.num_rows for output in outputs] == [3, 3, 1]
    operator = operator_class(**operator_arguments(job, 0))
    whole = finish_batch(operator.model_batch(operator.prepare_batch(block)), job.operators[0].stage_name)
    pieces = [finish_batch(output, job.operators[0].stage_name) for output in outputs]
    assert [row["image"] for piece in pieces for row in piece.to_pylist()] == whole.column("image").to_pylist()
    assert list(task_step(operator_class)(block.slice(0, 0), operator_arguments(job, 0), batch_size=3)) == []


def test_a_stage_may_read_a_column_an_earlier_stage_writes_but_not_one_nobody_has():
    from jobs.pipeline import check_input_columns

    controlnet = {"kind": "controlnet_img2img", "model": "m", "prompt": "p"}
    job = validate_config(
        {
            "source": {"uri": "in"},
            "operators": [
                {
                    **controlnet,
                    "name": "a",
                    "controlnets": [{"model": "c", "preprocessor": "canny", "save_as": "e"}],
                },
                {**controlnet, "name": "b", "controlnets": [{"model": "c", "column": "e"}]},
            ],
            "sink": {"uri": "out"},
        }
    )
    info = SourceInfo(fragments=[Fragment("rows.parquet#0", 1)], passthrough_columns=["caption"])
    check_input_columns(job, info)
    reversed_job = job.model_copy(update={"operators": job.operators[::-1]})
    with pytest.raises(PlanError, match=r"operators\[0\] reads columns \['e'\] that neither the source nor an"):
        check_input_columns(reversed_job, info)


def test_read_blocks_are_aligned_to_what_every_model_stage_batches():
    from jobs.pipeline import read_alignment

    one_fragment = SourceInfo(fragments=[Fragment("rows.parquet#0", 30)])
    assert read_alignment(plan_job(config({"batch_size": 4}), one_fragment, cpus=8, gpus=0)) == 4
    # Two variants each make the second stage's batch of 4 from 2 source rows; a batch of 3 needs 3.
    chained = config({"batch_size": 4, "variants": 2}, {"batch_size": 4}, {"batch_size": 3})
    assert read_alignment(plan_job(chained, one_fragment, cpus=8, gpus=0)) == 12
    no_model = standardize_job(__import__("pathlib").Path("in"))
    assert read_alignment(plan_job(no_model, one_fragment, cpus=2, gpus=0)) is None
    standardized_first = no_model.model_copy(update={"operators": [no_model.operators[0], chained.operators[0]]})
    assert read_alignment(plan_job(standardized_first, one_fragment, cpus=8, gpus=0)) == 4


def test_a_fragment_split_for_a_model_stage_gives_full_batches(ray_session, tmp_path):
    """One fragment on two CPUs is split for parallelism. Ray's own split cut 1 024 rows into its
    default 200 blocks, of 5 and 6 rows, so each model call of 4 rows ran as one of 4 and one of 1 or
    2; aligned, the blocks hold whole batches, 8 of them each."""
    import pyarrow.parquet as pq

    from jobs.pipeline import READ_BLOCKS_PER_CPU
    from jobs.sources import inspect_source, read_source
    from tests.conftest import make_batch, png_bytes

    table = make_batch([png_bytes(8, 8, (1, 0, 0))] * 1024).select(["id", "image"])
    pq.write_table(table, tmp_path / "rows.parquet")
    source = validate_config(
        {
            "source": {"uri": str(tmp_path / "rows.parquet")},
            "operators": [{"kind": "img2img", "model": "m", "prompt": "p"}],
            "sink": {"uri": str(tmp_path / "out")},
        }
    ).source
    info = inspect_source(source)

    def block_rows(dataset):
        return sorted(block.num_rows for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"))

    aligned = read_source(source, info, min_blocks=READ_BLOCKS_PER_CPU * 2, align=4, num_cpus=0.5)
    assert block_rows(aligned) == [32] * 32
    assert [row["id"] for row in aligned.take_all()] == table.column("id").to_pylist()
    assert set(block_rows(read_source(source, info, min_blocks=READ_BLOCKS_PER_CPU * 2, num_cpus=0.5))) == {5, 6}
