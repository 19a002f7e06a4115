"""restyle against a plain diffusers loop on one GPU: full-size SD 1.5 and SDXL, batch sweep, compile on and off.

Both models are built from the public diffusers configs of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 with random weights (the throughput of a network does not
depend on its weights), saved once as float16 safetensors with `save_pretrained`, and loaded by both
sides through `from_pretrained` like a real checkpoint. Nothing is downloaded: the CLIP tokenizer is
the byte-level one of the tiny test checkpoints.

Each case (model, batch size, compile on or off) runs both sides on the same images (scikit-image's
photographs, center-cropped to squares of the model's size, repeated under distinct ids), prompt,
steps, strength and guidance:

  plain     `AutoPipelineForImage2Image` in this process, float16 on cuda with SDPA attention (the
            default processor), `torch.compile(unet)` (mode default) when compile is on. Inputs are
            decoded to PIL images beforehand and outputs stay PIL images (nothing is encoded or
            written), so this is an upper bound for a hand-written loop. One untimed warm-up call
            per case; with compile on it holds the compilation.
            plain_images_per_s            images / wall time of the timed calls (steady state)
            plain_end_to_end_images_per_s images / (load + warm-up + timed calls), what a user waits for
            plain_busy                    sum of the calls' `torch.cuda.Event` times / wall time of the
                                          timed calls; plain_end_to_end_busy divides by the end-to-end time
            compile_seconds               warm-up call time minus the median timed call time
  restyle   `restyle run JOB.yaml` in a subprocess on the same images stored as Parquet (id, image as
            the Hugging Face {bytes, path} struct of PNG bytes): operator img2img, one actor with one
            GPU, dtype float16, model_batch_size = batch size, `compile: default` when compile is on
            (a case is skipped, and says so, when the config refuses the knob).
            restyle_images_per_s          `images_per_second` of the run's summary.json: ok rows over the
                                          job's wall time (Ray start, actor start, model load, compile,
                                          reading, encoding and writing included)
            restyle_busy                  sum of the per-row `model_seconds` of the stage column / the
                                          job's wall time; null when the rows do not carry it
            restyle_compile_seconds       the largest `*compile*seconds` field of the stage column or the
                                          summary, when restyle reports one
  ratio = restyle_images_per_s / plain_end_to_end_images_per_s (both include loading and compiling);
  ratio_steady = restyle_images_per_s / plain_images_per_s.

Each side compiles with an empty inductor cache of its own, so neither reuses the other's kernels.
The whole run keeps to a time budget (--budget-seconds, default 450 s so that it ends within 8
minutes on one H200), in this order: SD 1.5 eager (the batch sweep), SD 1.5 compiled (its largest
batch: compile on against off), then SDXL the same way; within each, the largest batch first. A
case runs only when its plain and restyle sides both fit in what is left after the restyle runs its
phase still owes; one that does not is skipped and says so, as is a case whose plain side failed
(a compile error, out of memory), and the run goes on. Progress lines with the
elapsed time go to stderr; stdout gets a side-by-side table and then one JSON line.

`--smoke` runs the same code paths on the CPU in float32 with the tiny test checkpoints (sd-img2img
and sdxl-img2img), a few 64x64 images and 2 steps, and skips compile; its JSON has "smoke": true.
Run from the repository root:

    .venv/bin/python bench/gpu.py                 # on a GPU machine
    .venv/bin/python bench/gpu.py --smoke         # anywhere, to check the script
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image, ImageOps

from operators.rows import IMAGE_TYPE, derive_seed

logger = logging.getLogger("bench.gpu")

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "an oil painting"
STRENGTH = 0.5
GUIDANCE_SCALE = 7.5
RUN_SEED = 0
STAGE_NAME = "img2img"
# scikit-image's bundled colour photographs.
PHOTOGRAPHS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
# Seconds kept free at the end of the budget for the table, the JSON and clean-up.
BUDGET_MARGIN_SECONDS = 15
# Seconds a restyle run gets to shut Ray down after SIGINT before its process group is killed.
INTERRUPT_GRACE_SECONDS = 20
STARTED = time.perf_counter()


def elapsed() -> float:
    """Seconds since the script started."""
    return time.perf_counter() - STARTED


def progress(message: str, *args) -> None:
    """One progress line on stderr, prefixed with the elapsed time."""
    logger.info("[%6.1f s] " + message, elapsed(), *args)


# --------------------------------------------------------------------------
# Workloads and their checkpoints
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One model measured: its title, image side, default image count, batch sizes and time estimates."""

    name: str
    title: str
    size: int
    images: int
    batches: tuple[int, ...]
    # Batch sizes measured with compile on too (one is enough to set compile against eager).
    compiled_batches: tuple[int, ...]
    # Default seconds per case before any case of this workload was measured: (plain, restyle) for
    # eager and compiled runs on one H200; measured times replace them as the run goes.
    estimates: dict[bool, tuple[float, float]]
    # Default seconds to build and save its checkpoint and write its source images.
    build_seconds: float


WORKLOADS = {
    "sd15": Workload("sd15", "SD 1.5", 512, 64, (1, 4, 8), (8,), {False: (25, 45), True: (70, 90)}, 25),
    "sdxl": Workload("sdxl", "SDXL", 1024, 16, (1, 4), (4,), {False: (35, 60), True: (130, 150)}, 50),
}
# One batch size each keeps a smoke run to about two restyle runs (Ray start-up dominates on a CPU).
SMOKE_WORKLOADS = {
    "sd15": Workload("sd15", "SD 1.5 (tiny)", 64, 8, (4,), (4,), {False: (10, 60), True: (0, 0)}, 10),
    "sdxl": Workload("sdxl", "SDXL (tiny)", 64, 4, (2,), (2,), {False: (10, 60), True: (0, 0)}, 10),
}
TINY_MODEL_NAMES = {"sd15": "sd-img2img", "sdxl": "sdxl-img2img"}

# CLIP ViT-L/14's text tower: SD 1.5's text encoder and SDXL's first.
CLIP_VIT_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
# OpenCLIP ViT-bigG/14's text tower: SDXL's second text encoder (with its pooled projection).
OPENCLIP_BIGG_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "layer_norm_eps": 1e-5,
}
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    # Six micro-conditioning ids of 256 each, then the second text encoder's 1280-wide pooled output.
    "projection_class_embeddings_input_dim": 2816,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def tokenizer_from_tiny_checkpoint(directory: Path):
    """The offline byte-level CLIP tokenizer of the tiny sd-img2img checkpoint (built if missing)."""
    from transformers import CLIPTokenizer

    from jobs.tiny_models import make_tiny_models

    tiny = make_tiny_models(directory, names=("sd-img2img",))["sd-img2img"]
    return CLIPTokenizer.from_pretrained(tiny / "tokenizer")


def text_encoder(settings: dict, tokenizer, with_projection: bool = False):
    """A randomly initialised CLIP text encoder with the given architecture."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        **settings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def build_sd15(path: Path, tokenizer, device: str = "cuda") -> None:
    """Save a random-weight SD 1.5 checkpoint (no safety checker) as float16 safetensors."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    # Initialising on the GPU takes seconds where the CPU would take minutes at this size.
    with torch.device(device):
        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE).eval(),
            text_encoder=text_encoder(CLIP_VIT_L_TEXT, tokenizer),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**SD15_UNET).eval(),
            scheduler=PNDMScheduler(**SD_SCHEDULER, skip_prk_steps=True, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.to(dtype=torch.float16)
    pipeline.save_pretrained(path, safe_serialization=True)


def build_sdxl(path: Path, tokenizer, device: str = "cuda") -> None:
    """Save a random-weight SDXL base checkpoint as float16 safetensors."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        pipeline = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE).eval(),
            text_encoder=text_encoder(CLIP_VIT_L_TEXT, tokenizer),
            text_encoder_2=text_encoder(OPENCLIP_BIGG_TEXT, tokenizer, with_projection=True),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=UNet2DConditionModel(**SDXL_UNET).eval(),
            scheduler=EulerDiscreteScheduler(**SD_SCHEDULER, timestep_spacing="leading", prediction_type="epsilon"),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    pipeline.to(dtype=torch.float16)
    pipeline.save_pretrained(path, safe_serialization=True)


def free_memory(device: str) -> None:
    """Collect what Python no longer holds and, on cuda, hand the freed blocks back to the device."""
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def build_checkpoint(workload: Workload, directory: Path, smoke: bool) -> Path:
    """The checkpoint directory of a workload: a tiny test checkpoint in smoke mode, else full size."""
    if smoke:
        from jobs.tiny_models import make_tiny_models

        name = TINY_MODEL_NAMES[workload.name]
        return make_tiny_models(directory / "tiny", names=(name,))[name]
    path = directory / workload.name
    if not (path / "model_index.json").is_file():
        tokenizer = tokenizer_from_tiny_checkpoint(directory / "tiny")
        (build_sd15 if workload.name == "sd15" else build_sdxl)(path, tokenizer)
        free_memory("cuda")
    return path


def write_source(path: Path, count: int, size: int) -> Path:
    """Write `count` rows (id, image as {bytes, path} PNG) of `size`-pixel squares to a Parquet file."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    encoded = []
    for file_name in PHOTOGRAPHS:
        with Image.open(folder / file_name) as image:
            square = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        square.save(buffer, format="PNG")
        encoded.append((Path(file_name).stem, buffer.getvalue()))
    ids, images = [], []
    for index in range(count):
        stem, data = encoded[index % len(encoded)]
        ids.append(f"{stem}-{index:05d}")
        images.append({"bytes": data, "path": f"{ids[-1]}.png"})
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "image": pa.array(images, IMAGE_TYPE)}), path)
    return path


# --------------------------------------------------------------------------
# Settings, cases and the time budget
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What both sides run with."""

    smoke: bool
    device: str
    dtype: str
    steps: int
    budget_seconds: float
    scratch: Path


@dataclass
class Case:
    """One (workload, batch size, compile) cell of the table and its figures."""

    workload: Workload
    batch: int
    compiled: bool
    figures: dict = field(default_factory=dict)
    skipped: str | None = None

    @property
    def key(self) -> str:
        return f"batch{self.batch}_{'compiled' if self.compiled else 'eager'}"

    @property
    def label(self) -> str:
        return f"{self.workload.name} batch {self.batch} {'compiled' if self.compiled else 'eager'}"


class Budget:
    """The run's time budget and per-side time estimates, refined by what was measured."""

    def __init__(self, seconds: float):
        self.deadline = STARTED + seconds - BUDGET_MARGIN_SECONDS
        self.measured: dict[tuple[str, str, bool], float] = {}

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def estimate(self, side: str, case: Case) -> float:
        index = 0 if side == "plain" else 1
        default = case.workload.estimates[case.compiled][index]
        return self.measured.get((side, case.workload.name, case.compiled), default)

    def fits(self, case: Case, extra_seconds: float = 0.0) -> bool:
        """Whether both sides of a case (after `extra_seconds` of other work) fit in what is left."""
        needed = extra_seconds + self.estimate("plain", case) + self.estimate("restyle", case)
        return self.remaining() >= needed

    def record(self, side: str, case: Case, seconds: float) -> None:
        key = (side, case.workload.name, case.compiled)
        self.measured[key] = max(seconds, self.measured.get(key, 0.0))


# --------------------------------------------------------------------------
# Plain side
# --------------------------------------------------------------------------


class CallTimer:
    """Times pipeline calls with CUDA events on a GPU, with the wall clock on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.pending: list = []
        self.seconds: list[float] = []

    def __enter__(self):
        if self.device == "cuda":
            import torch

            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device == "cuda":
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self._start, end))
        else:
            self.seconds.append(time.perf_counter() - self._start)

    def call_seconds(self) -> list[float]:
        """Every timed call's duration, in order (synchronises the device first)."""
        if self.pending:
            import torch

            torch.cuda.synchronize()
            self.seconds.extend(start.elapsed_time(end) / 1000 for start, end in self.pending)
            self.pending.clear()
        return self.seconds


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def load_plain_pipeline(model: Path, settings: Settings):
    """`AutoPipelineForImage2Image` from the checkpoint, on the device, with SDPA attention."""
    import diffusers
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipeline = diffusers.AutoPipelineForImage2Image.from_pretrained(
        str(model), dtype=getattr(torch, settings.dtype), use_safetensors=True, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(settings.device)
    pipeline.unet.set_attn_processor(AttnProcessor2_0())
    return pipeline


def generate(pipeline, images: list, seeds: list[int], settings: Settings) -> list:
    """One plain pipeline call over a batch, one generator per image seeded as restyle seeds its row."""
    import torch

    return pipeline(
        prompt=[PROMPT] * len(images),
        image=images,
        strength=STRENGTH,
        num_inference_steps=settings.steps,
        guidance_scale=GUIDANCE_SCALE,
        generator=[torch.Generator(device=settings.device).manual_seed(seed) for seed in seeds],
        output_type="pil",
    ).images


def run_plain_case(
    pipeline, eager_unet, images: list, seeds: list[int], case: Case, settings: Settings, budget: Budget
) -> dict:
    """Warm up, then time every batch of one case; `load_seconds` is added by the caller."""
    import torch

    if case.compiled:
        # A fresh compilation per batch size, so each case compiles for its own static shapes.
        torch._dynamo.reset()
        pipeline.unet = torch.compile(eager_unet, mode="default")
    else:
        pipeline.unet = eager_unet
    batch = case.batch
    started = time.perf_counter()
    generate(pipeline, images[:batch], seeds[:batch], settings)
    synchronize(settings.device)
    warm_up_seconds = time.perf_counter() - started

    timer = CallTimer(settings.device)
    produced = 0
    complete = True
    started = time.perf_counter()
    for first in range(0, len(images), batch):
        if budget.remaining() <= 0:
            complete = False
            break
        with timer:
            batch_range = slice(first, first + batch)
            produced += len(generate(pipeline, images[batch_range], seeds[batch_range], settings))
    synchronize(settings.device)
    loop_seconds = time.perf_counter() - started
    calls = timer.call_seconds()
    return {
        "images": produced,
        "complete": complete,
        "warm_up_seconds": warm_up_seconds,
        "loop_seconds": loop_seconds,
        "call_seconds": sum(calls),
        "median_call_seconds": statistics.median(calls) if calls else None,
    }


def run_plain_phase(cases: list[Case], model: Path, source: Path, settings: Settings, budget: Budget) -> None:
    """Load the pipeline once and run the given cases of one workload in this process."""
    import torch

    table = pq.read_table(source)
    images = [Image.open(io.BytesIO(cell["bytes"])).convert("RGB") for cell in table.column("image").to_pylist()]
    seeds = [derive_seed(RUN_SEED, row_id, 0) for row_id in table.column("id").to_pylist()]
    started = time.perf_counter()
    pipeline = load_plain_pipeline(model, settings)
    load_seconds = time.perf_counter() - started
    progress("plain %s: loaded in %.1f s", cases[0].workload.name, load_seconds)
    eager_unet = pipeline.unet
    owed = 0.0  # the estimated restyle runs of this phase's cases whose plain side has run
    try:
        for case in cases:
            if not budget.fits(case, owed):
                case.skipped = f"time budget: {budget.remaining():.0f} s left"
                progress("plain %s: skipped (%s)", case.label, case.skipped)
                continue
            if case.compiled:
                cache = settings.scratch / "inductor" / f"plain-{case.key}"
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
                # Inductor pins TRITON_CACHE_DIR in os.environ at its first kernel; each case gets its own.
                os.environ["TRITON_CACHE_DIR"] = str(cache / "triton")
            started = time.perf_counter()
            try:
                figures = run_plain_case(pipeline, eager_unet, images, seeds, case, settings, budget)
            except Exception as error:  # one failed case (a compile error, out of memory) must not lose the others
                budget.record("plain", case, time.perf_counter() - started)
                case.skipped = f"plain side failed: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
                logger.exception("plain %s failed", case.label)
                pipeline.unet = eager_unet
                del error
                free_memory(settings.device)
                continue
            budget.record("plain", case, time.perf_counter() - started)
            owed += budget.estimate("restyle", case)
            figures["load_seconds"] = load_seconds
            case.figures["plain"] = figures
            progress(
                "plain %s: %d images, warm-up %.1f s, timed calls %.1f s of %.1f s wall",
                case.label,
                figures["images"],
                figures["warm_up_seconds"],
                figures["call_seconds"],
                figures["loop_seconds"],
            )
    finally:
        pipeline.unet = eager_unet
        del pipeline, eager_unet
        if settings.device == "cuda":
            torch._dynamo.reset()
        free_memory(settings.device)


# --------------------------------------------------------------------------
# restyle side
# --------------------------------------------------------------------------


def job_document(case: Case, model: Path, source: Path, sink: Path, settings: Settings) -> dict:
    """The YAML job of one case (see module docstring)."""
    gpus = 0 if settings.smoke else 1
    operator = {
        "kind": "img2img",
        "model": str(model),
        "prompt": PROMPT,
        "strength": STRENGTH,
        "num_inference_steps": settings.steps,
        "guidance_scale": GUIDANCE_SCALE,
        "batch_size": case.batch,
        "model_batch_size": case.batch,
        "num_actors": 1,
        "num_gpus": gpus,
        "device": settings.device,
        "dtype": settings.dtype,
    }
    if settings.smoke:
        # The plain loop uses torch's default, every core.
        operator["torch_threads"] = os.cpu_count() or 1
    if case.compiled:
        operator["compile"] = "default"
    return {
        "source": {"uri": str(source), "format": "parquet"},
        "operators": [operator],
        "sink": {"uri": str(sink), "mode": "overwrite"},
        "run": {"seed": RUN_SEED, "resources": {"num_gpus": gpus}},
    }


def refused_config(document: dict) -> str | None:
    """The config error restyle would print for this job, or None when it validates."""
    from jobs.config import validate_config
    from operators.base import UserError

    try:
        validate_config(document, source_name="benchmark job")
    except UserError as error:
        return " ".join(str(error).split())
    return None


def restyle_command(config_path: Path) -> list[str]:
    """`restyle run CONFIG`, through the venv's console script when it is there."""
    script = Path(sys.executable).with_name("restyle")
    if script.is_file():
        return [str(script), "run", str(config_path)]
    return [sys.executable, "-m", "jobs.cli", "run", str(config_path)]


def run_command(command: list[str], log_path: Path, timeout: float, environment: dict) -> int | None:
    """Run a command in its own process group with output to a log; None when it ran out of time.

    On time-out it gets SIGINT first, so that it can shut its Ray instance down, then its process
    group is killed."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=REPOSITORY_ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        try:
            return process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=INTERRUPT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            return None


def log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stage_figures(sink: Path) -> dict:
    """Sums and maxima over the rows' stage column: model seconds and any compile seconds."""
    files = sorted((sink / "data").glob("*.parquet"))
    if not files:
        return {"model_seconds": None, "compile_seconds": None}
    table = pa.concat_tables(pq.read_table(path, columns=[STAGE_NAME]) for path in files)
    stage = table.column(STAGE_NAME).combine_chunks()
    names = [stage.type.field(index).name for index in range(stage.type.num_fields)]
    figures = {"model_seconds": None, "compile_seconds": None}
    if "model_seconds" in names:
        values = [value for value in stage.field("model_seconds").to_pylist() if value is not None]
        figures["model_seconds"] = sum(values) if values else None
    compile_names = [name for name in names if "compile" in name and name.endswith("seconds")]
    values = [value for name in compile_names for value in stage.field(name).to_pylist() if value is not None]
    figures["compile_seconds"] = max(values) if values else None
    return figures


def run_restyle_case(case: Case, model: Path, source: Path, settings: Settings, budget: Budget) -> None:
    """Run one case through `restyle run` and read its figures back."""
    if budget.remaining() < budget.estimate("restyle", case) / 2:
        case.skipped = f"time budget: {budget.remaining():.0f} s left for the restyle run"
        progress("restyle %s: skipped (%s)", case.label, case.skipped)
        return
    directory = settings.scratch / "restyle" / f"{case.workload.name}-{case.key}"
    directory.mkdir(parents=True)
    sink = directory / "output"
    document = job_document(case, model, source, sink, settings)
    refusal = refused_config(document)
    if refusal is not None:
        case.skipped = f"restyle refuses the job: {refusal}"
        progress("restyle %s: skipped (%s)", case.label, case.skipped)
        return
    config_path = directory / "job.yaml"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    # TRITON_CACHE_DIR is dropped too: the plain side's inductor set it to its own cache, which restyle
    # would otherwise reuse.
    environment = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "TRITON_CACHE_DIR")}
    environment["TORCHINDUCTOR_CACHE_DIR"] = str(settings.scratch / "inductor" / f"restyle-{case.key}")
    log_path = directory / "restyle.log"
    started = time.perf_counter()
    code = run_command(restyle_command(config_path), log_path, budget.remaining(), environment)
    seconds = time.perf_counter() - started
    budget.record("restyle", case, seconds)
    if code is None:
        case.figures["restyle"] = {"error": f"stopped after {seconds:.0f} s: time budget"}
        progress("restyle %s: stopped at the time budget; log tail:\n%s", case.label, log_tail(log_path))
        return
    if code != 0:
        case.figures["restyle"] = {"error": f"exit {code}: {log_tail(log_path, 1)}"}
        progress("restyle %s: exit %d; log tail:\n%s", case.label, code, log_tail(log_path))
        return
    summary = json.loads((sink / "summary.json").read_text())
    figures = stage_figures(sink)
    summary_compile = [value for key, value in summary.items() if "compile" in key and isinstance(value, int | float)]
    if figures["compile_seconds"] is None and summary_compile:
        figures["compile_seconds"] = max(summary_compile)
    figures.update(
        images=summary["ok"],
        error_rows=summary["error"],
        wall_seconds=summary["wall_seconds"],
        images_per_second=summary["images_per_second"],
        process_seconds=seconds,
    )
    case.figures["restyle"] = figures
    progress(
        "restyle %s: %d ok, %d error rows, %.1f s job wall, %.1f s with process start",
        case.label,
        summary["ok"],
        summary["error"],
        summary["wall_seconds"],
        seconds,
    )


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def case_result(case: Case) -> dict:
    """The JSON figures of one case (keys in the module docstring)."""
    plain = case.figures.get("plain")
    restyle = case.figures.get("restyle") or {}
    plain_rate = plain_end_to_end_rate = plain_busy = plain_end_to_end_busy = compile_seconds = None
    if plain and plain["images"]:
        end_to_end = plain["load_seconds"] + plain["warm_up_seconds"] + plain["loop_seconds"]
        plain_rate = plain["images"] / plain["loop_seconds"]
        plain_end_to_end_rate = plain["images"] / end_to_end
        plain_busy = plain["call_seconds"] / plain["loop_seconds"]
        plain_end_to_end_busy = plain["call_seconds"] / end_to_end
        if case.compiled and plain["median_call_seconds"] is not None:
            compile_seconds = plain["warm_up_seconds"] - plain["median_call_seconds"]
    restyle_rate = restyle.get("images_per_second")
    restyle_busy = ratio(restyle.get("model_seconds"), restyle.get("wall_seconds"))
    return {
        "batch": case.batch,
        "compile": "default" if case.compiled else "none",
        "plain_images_per_s": rounded(plain_rate),
        "plain_end_to_end_images_per_s": rounded(plain_end_to_end_rate),
        "restyle_images_per_s": rounded(restyle_rate),
        "ratio": rounded(ratio(restyle_rate, plain_end_to_end_rate)),
        "ratio_steady": rounded(ratio(restyle_rate, plain_rate)),
        "plain_busy": rounded(plain_busy),
        "plain_end_to_end_busy": rounded(plain_end_to_end_busy),
        "restyle_busy": rounded(restyle_busy),
        "compile_seconds": rounded(compile_seconds, 2),
        "restyle_compile_seconds": rounded(restyle.get("compile_seconds"), 2),
        "plain_load_seconds": rounded(plain["load_seconds"], 2) if plain else None,
        "restyle_wall_seconds": restyle.get("wall_seconds"),
        "plain_complete": plain["complete"] if plain else None,
        "restyle_error": restyle.get("error"),
        "skipped": case.skipped,
    }


def format_table(results: dict, workloads: list[Workload], settings: Settings) -> str:
    """A side-by-side table: one line per case, a note under a skipped or failed one."""
    columns = (
        ("case", "", 18),
        ("plain img/s", "plain_images_per_s", 12),
        ("plain e2e", "plain_end_to_end_images_per_s", 10),
        ("restyle", "restyle_images_per_s", 9),
        ("ratio", "ratio", 7),
        ("steady", "ratio_steady", 7),
        ("plain busy", "plain_busy", 11),
        ("e2e busy", "plain_end_to_end_busy", 9),
        ("restyle busy", "restyle_busy", 13),
        ("compile s", "compile_seconds", 10),
        ("restyle compile s", "restyle_compile_seconds", 18),
    )

    def line(cells: list[str]) -> str:
        first, *rest = cells
        return f"{first:<{columns[0][2]}}" + "".join(
            f"{cell:>{width}}" for cell, (_, _, width) in zip(rest, columns[1:], strict=True)
        )

    lines = [
        f"{results['gpu']}: {settings.device} {settings.dtype}, {settings.steps} steps x strength {STRENGTH}, "
        f"guidance {GUIDANCE_SCALE}. ratio = restyle / plain e2e (load and compile included), "
        "steady = restyle / plain img/s"
    ]
    for workload in workloads:
        block = results[workload.name]
        lines += ["", f"{workload.title}: {block['settings']['images']} images of {workload.size}x{workload.size}"]
        lines.append(line([title for title, _, _ in columns]))
        for key, figures in block.items():
            if key == "settings":
                continue
            label = f"batch {figures['batch']} {'eager' if figures['compile'] == 'none' else 'compiled'}"
            cells = ["-" if figures[name] is None else f"{figures[name]:.2f}" for _, name, _ in columns[1:]]
            lines.append(line([label, *cells]))
            note = figures["skipped"] or figures["restyle_error"]
            if note:
                lines.append(f"    note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, tiny checkpoints, 64x64, no compile")
    parser.add_argument("--only", choices=("sd15", "sdxl"), default=None, help="measure one model only")
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="images per case (default 64 SD 1.5, 16 SDXL); a multiple of every batch size, or a compiled "
        "UNet recompiles for the last, smaller batch inside the timed loop",
    )
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default 20; smoke 2)")
    parser.add_argument(
        "--budget-seconds", type=float, default=None, help="whole-run time budget (default 450; smoke 175)"
    )
    args = parser.parse_args(argv)
    for option in ("images", "steps", "budget_seconds"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            parser.error("a CUDA device is needed, but torch sees none; accepted here: --smoke (runs on the CPU)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build the checkpoints, run every case on both sides, print the table and the JSON line."""
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import diffusers
    import torch

    catalogue = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    workloads = [catalogue[name] for name in (args.only,) if name] or list(catalogue.values())
    if args.images is not None:
        workloads = [replace(workload, images=args.images) for workload in workloads]
    gpu = "cpu" if args.smoke else torch.cuda.get_device_name(0)
    results: dict = {"gpu": gpu}

    with tempfile.TemporaryDirectory(prefix="restyle-gpu-bench-") as scratch:
        settings = Settings(
            smoke=args.smoke,
            device="cpu" if args.smoke else "cuda",
            dtype="float32" if args.smoke else "float16",
            steps=args.steps or (2 if args.smoke else 20),
            budget_seconds=args.budget_seconds or (175 if args.smoke else 450),
            scratch=Path(scratch),
        )
        budget = Budget(settings.budget_seconds)
        progress(
            "%s, torch %s, diffusers %s, budget %.0f s",
            gpu,
            torch.__version__,
            diffusers.__version__,
            settings.budget_seconds,
        )
        cases = {
            w.name: [Case(w, b, False) for b in w.batches] + [Case(w, b, True) for b in w.compiled_batches]
            for w in workloads
        }
        models: dict[str, Path] = {}
        sources: dict[str, Path] = {}
        phases = [(w, compiled) for w in workloads for compiled in (False, True)]
        for workload, compiled in phases:
            # The largest batch first: the most telling figure when the budget runs short.
            phase = sorted((case for case in cases[workload.name] if case.compiled == compiled), key=lambda c: -c.batch)
            if compiled:
                if settings.smoke:
                    for case in phase:
                        case.skipped = "smoke: compile is not measured on the cpu"
                    continue
            build_seconds = 0.0 if workload.name in models else workload.build_seconds
            if not any(budget.fits(case, build_seconds) for case in phase):
                for case in phase:
                    case.skipped = f"time budget: {budget.remaining():.0f} s left"
                progress(
                    "%s %s: skipped, %.0f s left",
                    workload.name,
                    "compiled" if compiled else "eager",
                    budget.remaining(),
                )
                continue
            if workload.name not in models:
                progress("%s: building the checkpoint", workload.name)
                models[workload.name] = build_checkpoint(workload, settings.scratch / "models", settings.smoke)
                sources[workload.name] = write_source(
                    settings.scratch / f"{workload.name}.parquet", workload.images, workload.size
                )
                progress("%s: checkpoint and %d source images ready", workload.name, workload.images)
            model, source = models[workload.name], sources[workload.name]
            run_plain_phase(phase, model, source, settings, budget)
            for case in phase:
                if case.skipped is None:
                    run_restyle_case(case, model, source, settings, budget)

        for workload in workloads:
            block = {
                "settings": {
                    "size": workload.size,
                    "images": workload.images,
                    "steps": settings.steps,
                    "strength": STRENGTH,
                    "guidance_scale": GUIDANCE_SCALE,
                }
            }
            ordered = sorted(cases[workload.name], key=lambda case: (case.compiled, case.batch))
            block.update({case.key: case_result(case) for case in ordered})
            results[workload.name] = block
    results["smoke"] = args.smoke
    results["total_seconds"] = round(elapsed(), 1)
    print(format_table(results, workloads, settings))
    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
