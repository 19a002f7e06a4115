"""Speed and memory knobs of the diffusers operators: attention kernel, memory
format, torch.compile, VAE tiling and slicing, CPU offload, and halving a model call's batch on
CUDA out-of-memory.

A diffusers operator config mixes in `SpeedSettings` and calls `check_speed_settings` from a model
validator; its actor calls `apply_speed_settings` once after loading the pipeline, times each model
call with a `CompileClock` and runs it through `call_with_oom_backoff`. Every knob is recorded per
row (`SPEED_FIELDS`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from operators.base import OperatorConfig

logger = logging.getLogger(__name__)


class SpeedSettings(BaseModel):
    """Speed and memory knobs of a diffusers operator, mixed into its config. The defaults are safe
    on every device: each knob that trades something (start-up time, memory, speed) is off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="Attention kernel of the UNet or transformer and the VAE: 'sdpa' is torch's "
        "scaled_dot_product_attention (diffusers' AttnProcessor2_0, picks flash or memory-efficient kernels "
        "on cuda); 'eager' is the plain matmul-softmax-matmul (diffusers' AttnProcessor), slower and larger, "
        "for comparing outputs. Output bytes may differ between the two.",
    )
    channels_last: bool = Field(
        False,
        description="Keep the UNet's weights and activations in channels-last memory format, which is faster "
        "for convolutions on recent GPUs (tensor cores).",
    )
    compile: Literal["none", "default", "max-autotune"] = Field(
        "none",
        description="torch.compile the UNet or transformer with this mode. Each actor compiles on its first "
        "model call and again for new input shapes (minutes for large models, reported as compile_seconds); "
        "'max-autotune' compiles longest and runs fastest. 'none' runs eagerly.",
    )
    vae_tiling: bool = Field(
        False,
        description="Encode and decode large images with the VAE in overlapping tiles, so memory no longer "
        "grows with the image area (tile seams may show on some images). Needs a pipeline with a `vae`.",
    )
    vae_slicing: bool = Field(
        False,
        description="Decode a model call's images with the VAE one at a time, so the VAE's memory no longer "
        "grows with model_batch_size. Needs a pipeline with a `vae`.",
    )
    cpu_offload: Literal["none", "model", "sequential"] = Field(
        "none",
        description="For GPUs too small to hold the pipeline: 'model' keeps each component on the CPU and "
        "moves it to the GPU only while it runs (diffusers' enable_model_cpu_offload, a little slower); "
        "'sequential' moves one layer at a time (enable_sequential_cpu_offload, least memory, much slower). "
        "Needs cuda.",
    )
    oom_backoff: bool = Field(
        True,
        description="On CUDA out-of-memory, retry a model call's rows in halves (down to one row) instead of "
        "failing them; the number of halvings is recorded per row as oom_backoffs.",
    )


# Per-row fields of the speed knobs in a diffusers stage column.
SPEED_FIELDS = [
    ("attention", pa.string()),
    ("channels_last", pa.bool_()),
    ("compile", pa.string()),
    ("vae_tiling", pa.bool_()),
    ("vae_slicing", pa.bool_()),
    ("cpu_offload", pa.string()),
    # Wall time of the model call that compiled (see CompileClock); None without compile.
    ("compile_seconds", pa.float64()),
    # How often this row's model call was split in halves after CUDA out-of-memory.
    ("oom_backoffs", pa.int32()),
]

ACCEPTED = {
    "attention": ("sdpa", "eager"),
    "compile": ("none", "default", "max-autotune"),
    "cpu_offload": ("none", "model", "sequential"),
}


def check_speed_settings(config: OperatorConfig) -> None:
    """Refuse knob combinations that cannot run, before any model loads. `config` is an operator config
    that mixes in `SpeedSettings`; raises ValueError naming the field, its value and what is accepted."""
    device = config.resolved_device()
    if config.cpu_offload != "none" and device != "cuda":
        raise ValueError(
            f"cpu_offload {config.cpu_offload!r} moves components to a GPU and needs device cuda, but this "
            f"operator runs on {device!r}{device_origin(config)}; "
            f"on {device} only cpu_offload 'none' is accepted"
        )
    if config.cpu_offload == "sequential" and config.compile != "none":
        raise ValueError(
            f"compile {config.compile!r} cannot be combined with cpu_offload 'sequential', which moves each "
            f"layer to the GPU on its own call; use compile 'none', or cpu_offload 'model' or 'none'"
        )


def device_origin(config: OperatorConfig) -> str:
    """Where an 'auto' device came from, for messages: " (device 'auto' with num_gpus 0)"; else ""."""
    if config.device != "auto":
        return ""
    return f" (device 'auto' with num_gpus {config.num_gpus:g})"


def speed_record(settings: SpeedSettings) -> dict:
    """The knob fields of the stage column as configured (what `--dry-run` shows and each row records)."""
    return {
        "attention": settings.attention,
        "channels_last": settings.channels_last,
        "compile": settings.compile,
        "vae_tiling": settings.vae_tiling,
        "vae_slicing": settings.vae_slicing,
        "cpu_offload": settings.cpu_offload,
    }


def denoiser(pipeline):
    """The pipeline's denoising model: its `unet` or its `transformer`; None when it has neither."""
    for name in ("unet", "transformer"):
        component = getattr(pipeline, name, None)
        if component is not None:
            return component
    return None


def apply_speed_settings(pipeline, settings: SpeedSettings, device: str) -> dict:
    """Apply the knobs to a loaded diffusers pipeline and place it on `device`; returns the knob fields
    of the per-row record (`speed_record`).

    Placement is part of this call: with cpu_offload 'none' the pipeline is moved to `device` (a no-op
    when the loader already moved it); with 'model' or 'sequential' diffusers' offload hooks take the
    place of `.to(device)`, so the loader should leave the pipeline on the CPU (diffusers moves it back
    there anyway, after the cost of the transfer). Everything the settings cannot apply to this
    pipeline is refused, before anything changes, with a ValueError naming the knob. Call it once per
    actor, after LoRA adapters and the scheduler are set: compiling comes last.
    """
    import torch

    pipeline_name = type(pipeline).__name__
    model = denoiser(pipeline)
    if model is None and (settings.channels_last or settings.compile != "none" or settings.attention != "sdpa"):
        knob = "channels_last" if settings.channels_last else "compile" if settings.compile != "none" else "attention"
        raise ValueError(f"{knob} needs a pipeline with a `unet` or `transformer`; {pipeline_name} has neither")
    vae = getattr(pipeline, "vae", None)
    for knob, method, verb in (("vae_tiling", "enable_tiling", "tile"), ("vae_slicing", "enable_slicing", "slice")):
        if getattr(settings, knob) and not supports(vae, method):
            has = f"its `vae` is a {type(vae).__name__}" if vae is not None else "it has no `vae`"
            raise ValueError(
                f"{knob} needs a pipeline whose `vae` can {verb} ({method}); {pipeline_name} cannot ({has}); "
                f"set {knob}: false"
            )
    attention_models = [component for component in (model, vae) if component is not None]
    if settings.attention == "eager":
        for component in attention_models:
            unknown = sorted(set(processor_names(component)) - STANDARD_PROCESSORS)
            if unknown:
                raise ValueError(
                    f"attention 'eager' replaces diffusers' AttnProcessor2_0 with AttnProcessor, but "
                    f"{pipeline_name}'s {type(component).__name__} uses {', '.join(unknown)}; use attention 'sdpa'"
                )

    set_attention(attention_models, settings.attention)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if settings.vae_tiling:
        vae.enable_tiling()
    if settings.vae_slicing:
        vae.enable_slicing()
    if settings.cpu_offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif settings.cpu_offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        pipeline.to(device)
    if settings.compile != "none":
        # In place (`nn.Module.compile`), so the pipeline keeps its own module and its `config`.
        model.compile(mode=settings.compile)
    return speed_record(settings)


# diffusers' two generic attention processors; models that ship others (SD3, Flux, IP adapters) keep theirs.
STANDARD_PROCESSORS = {"AttnProcessor", "AttnProcessor2_0"}


def supports(component, method: str) -> bool:
    """Whether a diffusers autoencoder implements `enable_tiling`/`enable_slicing` (its mixin has the
    methods for every autoencoder, but only those with the matching `use_*` flag implement them)."""
    flag = {"enable_tiling": "use_tiling", "enable_slicing": "use_slicing"}[method]
    return component is not None and hasattr(component, method) and hasattr(component, flag)


def processor_names(component) -> list[str]:
    """Class names of a model's attention processors (none for a model without diffusers attention)."""
    processors = getattr(component, "attn_processors", None)
    return [type(processor).__name__ for processor in (processors or {}).values()]


def set_attention(components: list, attention: str) -> None:
    """Set SDPA or eager attention on models whose processors are all diffusers' generic ones."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for component in components:
        names = processor_names(component)
        if names and set(names) <= STANDARD_PROCESSORS:
            component.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


@dataclass
class CallTiming:
    """How one model call was timed: its wall time and the part reported as compile time."""

    seconds: float = 0.0
    compiled: bool = False  # whether torch.compile compiled during this call
    compile_seconds: float | None = None  # None when compile is off


class CompileClock:
    """Reports torch.compile's compile time, which is paid inside model calls.

    Rule: a call during which TorchDynamo compiled a new graph (its `unique_graphs` count grew: the
    first call, and a later call with an input shape the compiled graph does not cover) reports its
    whole wall time as `compile_seconds`; every other call reports 0.0. The figure is an upper bound,
    since it includes that call's own run time (a few percent of a compile). Where Dynamo's counter
    is missing, only the first call counts. With compile 'none' every call reports None.
    `total_seconds` sums the compiling calls: the actor's compile time."""

    def __init__(self, compile: str, device: str = "cpu"):
        self.enabled = compile != "none"
        self.device = device
        self.calls = 0
        self.total_seconds: float | None = 0.0 if self.enabled else None

    @contextmanager
    def measure(self) -> Iterator[CallTiming]:
        """Time the model call in the `with` block; the yielded timing is filled in when it ends. A call
        that raises is not counted."""
        timing = CallTiming()
        graphs = compiled_graph_count() if self.enabled else None
        start = time.perf_counter()
        yield timing
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        timing.seconds = time.perf_counter() - start
        if self.enabled:
            after = compiled_graph_count()
            timing.compiled = after > graphs if after is not None else self.calls == 0
            timing.compile_seconds = timing.seconds if timing.compiled else 0.0
            self.total_seconds += timing.compile_seconds
        self.calls += 1


def compiled_graph_count() -> int | None:
    """Graphs TorchDynamo has compiled in this process so far; None where torch does not expose it."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"]["unique_graphs"])


def call_with_oom_backoff(
    run: Callable[[list], list], group: list, enabled: bool = True, label: str | None = None
) -> tuple[list, int]:
    """Run `run(group)`, which returns one result per item, in order. On CUDA out-of-memory
    (`torch.OutOfMemoryError`, which `torch.cuda.OutOfMemoryError` names too) empty the CUDA cache, split
    the group in halves and run each the same way, down to single items; an out-of-memory on one item, or
    any with `enabled` false, is raised. Other exceptions pass through unchanged. Returns the results of
    all items in order and how many splits it took (0 when the first call fitted), which the caller
    records per row as `oom_backoffs`. `label` (e.g. the stage name) only prefixes the warning logged on each split."""
    import torch

    try:
        results = run(group)
    except torch.OutOfMemoryError:
        if not enabled or len(group) <= 1:
            raise
        # Retried outside the except block, so the failed call's frames and tensors are released first.
    else:
        results = list(results)
        if len(results) != len(group):
            raise ValueError(f"a model call returned {len(results)} results for {len(group)} rows")
        return results, 0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    middle = (len(group) + 1) // 2
    logger.warning(
        "%sCUDA out of memory in a model call of %d rows; retrying as %d + %d rows",
        f"{label}: " if label else "",
        len(group),
        middle,
        len(group) - middle,
    )
    first, first_splits = call_with_oom_backoff(run, group[:middle], enabled, label)
    second, second_splits = call_with_oom_backoff(run, group[middle:], enabled, label)
    return first + second, 1 + first_splits + second_splits
