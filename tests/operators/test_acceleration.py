"""Speed knobs applied to tiny pipelines on cpu, the compile clock and the out-of-memory backoff, without Ray.

Running a torch.compile'd UNet takes over a minute on a small CPU, so here only its wrapping is checked;
compiled calls are measured by bench/gpu.py."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from PIL import Image
from pydantic import Field, ValidationError, model_validator

from operators.acceleration import (
    SPEED_FIELDS,
    CompileClock,
    SpeedSettings,
    apply_speed_settings,
    call_with_oom_backoff,
    check_speed_settings,
)
from operators.base import OperatorConfig

KNOB_FIELDS = ["attention", "channels_last", "compile", "vae_tiling", "vae_slicing", "cpu_offload"]


class SpeedConfig(OperatorConfig, SpeedSettings):
    """An operator config with the knobs mixed in, as the diffusers operators declare theirs."""

    kind: Literal["speed"] = Field(description="Operator kind.")

    @model_validator(mode="after")
    def _runnable(self) -> SpeedConfig:
        check_speed_settings(self)
        return self


def load_pipeline(path):
    import diffusers

    pipeline = diffusers.AutoPipelineForImage2Image.from_pretrained(str(path), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def processors(model) -> set[str]:
    return {type(processor).__name__ for processor in model.attn_processors.values()}


def test_settings_mix_into_an_operator_config():
    config = SpeedConfig(kind="speed", num_actors=2)
    assert {name: getattr(config, name) for name in [*KNOB_FIELDS, "oom_backoff"]} == {
        "attention": "sdpa",
        "channels_last": False,
        "compile": "none",
        "vae_tiling": False,
        "vae_slicing": False,
        "cpu_offload": "none",
        "oom_backoff": True,
    }
    assert config.num_actors == 2 and config.stage_name == "speed"
    assert all(SpeedConfig.model_fields[name].description for name in SpeedConfig.model_fields)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        SpeedConfig(kind="speed", attention_backend="flash")
    with pytest.raises(ValidationError, match="'none', 'default' or 'max-autotune'"):
        SpeedConfig(kind="speed", compile="fast")
    with pytest.raises(ValidationError, match="frozen"):
        config.compile = "default"


def test_cpu_offload_on_a_cpu_device_is_refused():
    with pytest.raises(ValidationError) as refused:
        SpeedConfig(kind="speed", cpu_offload="model")
    assert (
        "cpu_offload 'model' moves components to a GPU and needs device cuda, but this operator runs on 'cpu' "
        "(device 'auto' with num_gpus 0); on cpu only cpu_offload 'none' is accepted" in str(refused.value)
    )
    with pytest.raises(ValidationError, match="cpu_offload 'sequential' .* runs on 'cpu'; on cpu only"):
        SpeedConfig(kind="speed", cpu_offload="sequential", device="cpu", num_gpus=1)
    assert SpeedConfig(kind="speed", cpu_offload="model", num_gpus=1).cpu_offload == "model"
    with pytest.raises(ValidationError, match="compile 'default' cannot be combined with cpu_offload 'sequential'"):
        SpeedConfig(kind="speed", cpu_offload="sequential", compile="default", device="cuda")


def test_speed_fields_cover_the_record():
    assert [name for name, _ in SPEED_FIELDS] == [*KNOB_FIELDS, "compile_seconds", "oom_backoffs"]
    assert dict(SPEED_FIELDS)["compile_seconds"] == "double" and dict(SPEED_FIELDS)["oom_backoffs"] == "int32"


def test_attention_processors_set_as_asked(sd_model):
    pipeline = load_pipeline(sd_model)
    assert processors(pipeline.unet) == {"AttnProcessor2_0"}
    record = apply_speed_settings(pipeline, SpeedSettings(attention="eager"), "cpu")
    assert record == {
        "attention": "eager",
        "channels_last": False,
        "compile": "none",
        "vae_tiling": False,
        "vae_slicing": False,
        "cpu_offload": "none",
    }
    assert processors(pipeline.unet) == processors(pipeline.vae) == {"AttnProcessor"}
    apply_speed_settings(pipeline, SpeedSettings(attention="sdpa"), "cpu")
    assert processors(pipeline.unet) == processors(pipeline.vae) == {"AttnProcessor2_0"}


def test_channels_last_changes_the_unet_memory_format(sd_model):
    pipeline = load_pipeline(sd_model)
    weight = pipeline.unet.conv_in.weight
    assert not weight.is_contiguous(memory_format=torch.channels_last)
    record = apply_speed_settings(pipeline, SpeedSettings(channels_last=True), "cpu")
    assert record["channels_last"] is True
    assert pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not pipeline.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_vae_tiling_and_slicing_set_and_a_call_runs(sd_model):
    pipeline = load_pipeline(sd_model)
    record = apply_speed_settings(pipeline, SpeedSettings(vae_tiling=True, vae_slicing=True), "cpu")
    assert (record["vae_tiling"], record["vae_slicing"]) == (True, True)
    assert (pipeline.vae.use_tiling, pipeline.vae.use_slicing) == (True, True)
    image = Image.new("RGB", (32, 24), (200, 30, 60))
    result = pipeline(prompt=["a", "b"], image=[image, image], strength=0.5, num_inference_steps=2, output_type="pil")
    assert [output.size for output in result.images] == [(32, 24), (32, 24)]


def test_vae_knobs_refused_for_a_pipeline_without_a_vae(tiny_models):
    import diffusers

    pipeline = diffusers.LDMSuperResolutionPipeline.from_pretrained(
        str(tiny_models["ldm-super-resolution"]), local_files_only=True
    )
    with pytest.raises(ValueError) as refused:
        apply_speed_settings(pipeline, SpeedSettings(channels_last=True, vae_slicing=True), "cpu")
    assert str(refused.value) == (
        "vae_slicing needs a pipeline whose `vae` can slice (enable_slicing); LDMSuperResolutionPipeline "
        "cannot (it has no `vae`); set vae_slicing: false"
    )
    # Refused before anything changed.
    assert not pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="vae_tiling needs a pipeline whose `vae` can tile"):
        apply_speed_settings(pipeline, SpeedSettings(vae_tiling=True), "cpu")


def test_compile_wraps_the_unet_in_place(sd_model):
    pipeline = load_pipeline(sd_model)
    unet = pipeline.unet
    assert unet._compiled_call_impl is None
    record = apply_speed_settings(pipeline, SpeedSettings(compile="default"), "cpu")
    assert record["compile"] == "default"
    assert pipeline.unet is unet and type(unet).__name__ == "UNet2DConditionModel"
    assert unet._compiled_call_impl is not None


def test_compile_clock_reports_the_compiling_calls():
    off = CompileClock("none")
    with off.measure() as timing:
        pass
    assert (timing.compile_seconds, off.total_seconds) == (None, None)

    compiled = torch.compile(lambda tensor: tensor * 2 + 1, backend="eager")
    clock = CompileClock("default")
    with clock.measure() as first:
        compiled(torch.ones(3))
    with clock.measure() as second:
        compiled(torch.ones(3))
    assert first.compiled and first.compile_seconds == first.seconds > 0
    assert not second.compiled and second.compile_seconds == 0.0
    assert clock.total_seconds == first.seconds
    with pytest.raises(RuntimeError, match="call failed"), clock.measure():
        raise RuntimeError("call failed")
    assert (clock.calls, clock.total_seconds) == (2, first.seconds)


def out_of_memory_above(limit: int, calls: list):
    def run(rows):
        calls.append(list(rows))
        if len(rows) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory for {len(rows)} rows")
        return [row * 10 for row in rows]

    return run


def test_oom_backoff_halves_until_the_calls_fit(caplog):
    calls = []
    results, halvings = call_with_oom_backoff(out_of_memory_above(2, calls), list(range(8)), label="img2img")
    assert results == [0, 10, 20, 30, 40, 50, 60, 70]
    assert halvings == 3  # 8 -> 4 + 4, each 4 -> 2 + 2
    assert [len(rows) for rows in calls] == [8, 4, 2, 2, 4, 2, 2]
    assert "img2img: CUDA out of memory in a model call of 8 rows; retrying as 4 + 4 rows" in caplog.text
    odd, halvings = call_with_oom_backoff(out_of_memory_above(2, []), list(range(5)))
    assert (odd, halvings) == ([0, 10, 20, 30, 40], 2)  # 5 -> 3 + 2, 3 -> 2 + 1
    assert call_with_oom_backoff(out_of_memory_above(2, []), [1, 2]) == ([10, 20], 0)


def test_oom_backoff_reraises_for_one_row_and_when_disabled():
    calls = []
    with pytest.raises(torch.OutOfMemoryError, match="for 1 rows"):
        call_with_oom_backoff(out_of_memory_above(0, calls), [1, 2])
    assert [len(rows) for rows in calls] == [2, 1]
    assert issubclass(torch.cuda.OutOfMemoryError, torch.OutOfMemoryError)
    calls = []
    with pytest.raises(torch.cuda.OutOfMemoryError, match="for 8 rows"):
        call_with_oom_backoff(out_of_memory_above(2, calls), list(range(8)), enabled=False)
    assert len(calls) == 1


def test_other_errors_pass_through_unchanged():
    error = RuntimeError("expected a tensor of 4 dimensions")

    def run(rows):
        raise error

    with pytest.raises(RuntimeError) as raised:
        call_with_oom_backoff(run, [1, 2, 3, 4])
    assert raised.value is error
