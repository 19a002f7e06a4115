"""The duty-cycle benchmark's restyle side runs restyle's own model step around a simulated pipeline:
its operator must keep working as the diffusers operator's set-up grows (it once lacked a field the
set-up had gained, and the benchmark failed on its first model call)."""

from __future__ import annotations

from pathlib import Path

from jobs.pipeline import operator_arguments
from tests.conftest import make_batch, png_bytes

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_the_simulated_img2img_actor_sets_up_and_generates_through_restyle(sd_model, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import duty_cycle

    args = duty_cycle.parse_arguments([])
    config = duty_cycle.job_config(args, tmp_path / "in.parquet", tmp_path / "out", sd_model)
    monkeypatch.setattr(duty_cycle.SimulatedImg2Img, "seconds_per_image", 0.001)
    monkeypatch.setattr(duty_cycle.SimulatedImg2Img, "interval_log", str(tmp_path / "intervals.log"))
    arguments = operator_arguments(config, 0)
    batch = make_batch([png_bytes(40, 32, (10 * i, 90, 200)) for i in range(3)])
    prepared = duty_cycle.SimulatedImg2Img(**arguments, load=False).prepare_batch(batch)
    output = duty_cycle.SimulatedImg2Img(**arguments).model_batch(prepared)
    assert output.column("status").to_pylist() == ["ok"] * 3
    records = output.column(config.operators[0].stage_name).to_pylist()
    assert {record["scheduler"] for record in records} == {duty_cycle.SCHEDULER}
    assert [record["model_call_rows"] for record in records] == [3] * 3
    assert len(duty_cycle.read_intervals(tmp_path / "intervals.log")) == 1  # one simulated call of three
