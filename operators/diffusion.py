"""Glue shared by the diffusers operators: prompt and sweep fields, variants, LoRA adapters,
schedulers, generators and the AUTOMATIC1111 parameters text."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, get_args

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from operators.acceleration import SPEED_FIELDS, SpeedSettings, check_speed_settings
from operators.base import Operator, OperatorConfig
from operators.ip_adapter import (
    IP_ADAPTER_FIELDS,
    IPAdapterConfig,
    ip_adapter_record,
    load_ip_adapter,
    prepare_reference,
)
from operators.models import ModelReference
from operators.rows import RowError

logger = logging.getLogger(__name__)

# Scheduler class names as diffusers exports them, with the sampler name AUTOMATIC1111 shows.
SCHEDULERS = {
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "DEISMultistepScheduler": "DEIS",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "EulerDiscreteScheduler": "Euler",
    "FlowMatchEulerDiscreteScheduler": "Euler",
    "HeunDiscreteScheduler": "Heun",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "KDPM2DiscreteScheduler": "DPM2",
    "LCMScheduler": "LCM",
    "LMSDiscreteScheduler": "LMS",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
}

SweepParameter = Literal[
    "prompt", "negative_prompt", "strength", "guidance_scale", "image_guidance_scale", "num_inference_steps", "seed"
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SizePolicy(_Frozen):
    """How an input's dimensions become the generated image's dimensions."""

    max_side: int | None = Field(
        None, ge=8, description="Scale down (aspect kept) so the longest side is at most this.", strict=True
    )
    multiple_of: int = Field(
        8, ge=1, description="Round each side to a multiple of this (8 for SD/SDXL, 16 for SD3 and Flux).", strict=True
    )


class Sweep(_Frozen):
    """Parameter lists expanded into variants, as a product of all lists or zipped item by item."""

    mode: Literal["product", "zip"] = Field("product", description="'product': every combination; 'zip': i-th items.")
    prompt: list[str] | None = Field(None, min_length=1, description="Prompts (templates may use {column}).")
    negative_prompt: list[str] | None = Field(None, min_length=1, description="Negative prompts.")
    strength: list[float] | None = Field(None, min_length=1, description="Strengths, each in [0, 1].")
    guidance_scale: list[float] | None = Field(None, min_length=1, description="Guidance scales, each >= 0.")
    image_guidance_scale: list[float] | None = Field(
        None, min_length=1, description="Image guidance scales of `instruct_edit`, each >= 1."
    )
    num_inference_steps: list[int] | None = Field(None, min_length=1, description="Step counts, each >= 1.")
    seed: list[int] | None = Field(
        None, min_length=1, description="Seeds used as given (the same for every row) instead of derived ones."
    )

    @model_validator(mode="after")
    def _valid_lists(self) -> Sweep:
        lists = self.lists()
        if not lists:
            raise ValueError(
                "a sweep needs at least one list: prompt, negative_prompt, strength, guidance_scale, "
                "image_guidance_scale, num_inference_steps or seed"
            )
        if self.mode == "zip" and len({len(values) for values in lists.values()}) > 1:
            lengths = {name: len(values) for name, values in lists.items()}
            raise ValueError(f"sweep.mode zip needs lists of one length, got {lengths}")
        for value in self.strength or []:
            if not 0 <= value <= 1:
                raise ValueError(f"sweep.strength values must be in [0, 1], got {value}")
        for value in self.guidance_scale or []:
            if value < 0:
                raise ValueError(f"sweep.guidance_scale values must be >= 0, got {value}")
        for value in self.image_guidance_scale or []:
            if value < 1:  # diffusers' InstructPix2Pix switches all guidance off below 1
                raise ValueError(f"sweep.image_guidance_scale values must be >= 1, got {value}")
        for value in self.num_inference_steps or []:
            if value < 1:
                raise ValueError(f"sweep.num_inference_steps values must be >= 1, got {value}")
        for value in self.seed or []:
            if not 0 <= value < 2**63:
                raise ValueError(f"sweep.seed values must be in [0, 2**63), got {value}")
        return self

    def lists(self) -> dict[str, list]:
        """The given lists by parameter name."""
        names = get_args(SweepParameter)
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def combinations(self) -> list[dict]:
        """One dict of parameter values per combination, in a fixed order."""
        lists = self.lists()
        names = list(lists)
        rows = itertools.product(*lists.values()) if self.mode == "product" else zip(*lists.values(), strict=True)
        return [dict(zip(names, values, strict=True)) for values in rows]


class LoraAdapter(_Frozen):
    """A LoRA adapter loaded once per actor and applied with a scale."""

    model: str = Field(description="A .safetensors file, a directory holding one, an s3:// prefix, or a Hub id.")
    weight_name: str | None = Field(None, description="File name inside a directory or repository.")
    revision: str | None = Field(None, description="Hub revision (required for Hub ids).")
    scale: float = Field(1.0, description="Adapter weight.")


class DiffusionConfig(SpeedSettings, OperatorConfig):
    """Fields shared by the diffusers operators that take prompts, with the speed and memory knobs of
    `operators.acceleration.SpeedSettings`."""

    model: str = Field(
        description="Checkpoint: a local diffusers directory, an s3:// prefix, or a Hub id (owner/name)."
    )
    revision: str | None = Field(None, description="Hub commit or tag (required for Hub ids); recorded per row.")
    variant: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_]+$",
        description="Weight variant to load, e.g. 'fp16' for `unet/diffusion_pytorch_model.fp16.safetensors` "
        "(diffusers' `variant`); components without files of this variant load their plain weights. "
        "Default: the plain weights.",
    )
    safety_checker: bool | None = Field(
        None,
        description="Run the checkpoint's safety checker (which blacks out flagged images; recorded per row). "
        "Default: as the checkpoint ships it (run when it has one); false loads without it; true refuses a "
        "checkpoint that has none.",
    )
    prompt: str | None = Field(None, description="Prompt for every row; a template may use {column} of the row.")
    prompt_column: str | None = Field(None, description="Column holding each row's prompt.")
    negative_prompt: str | None = Field(None, description="Negative prompt (a template may use {column}).")
    prompt_from: Literal["config", "png_parameters"] = Field(
        "config",
        description="'png_parameters': each row's prompt, negative prompt and seed come from its input file's own "
        "AUTOMATIC1111 `parameters` text (a PNG text chunk, or a JPEG's or WebP's EXIF comment), as AUTOMATIC1111's "
        "batch tab reuses them; a row without one, or a stage whose input is the stage before's pixels, uses the "
        "configured prompt. Each row records which it used in `prompt_source`.",
    )
    num_inference_steps: int = Field(30, ge=1, le=1000, description="Denoising steps.", strict=True)
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale.")
    scheduler: Literal[tuple(SCHEDULERS)] | None = Field(  # type: ignore[valid-type]
        None, description="Scheduler class name; default is the checkpoint's own."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Torch dtype of the weights; 'auto' is float16 on cuda, float32 on cpu."
    )
    variants: int = Field(
        1, ge=1, description="Outputs per input row and sweep combination, each its own seed.", strict=True
    )
    sweep: Sweep | None = Field(None, description="Parameter lists expanded into more variants.")
    loras: list[LoraAdapter] = Field(default_factory=list, description="LoRA adapters applied to the pipeline.")
    ip_adapter: IPAdapterConfig | None = Field(
        None, description="An IP-Adapter that steers each output towards a reference image (SD 1.x/2.x and SDXL)."
    )
    model_batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows per model call. Default: 1 on cpu, which makes every output's bytes independent of "
        "how rows were batched (batched kernels round differently per batch size); on cuda, every "
        "compatible row of a batch in one call, which keeps the GPU busy.",
        strict=True,
    )

    @model_validator(mode="after")
    def _prompt_sources(self) -> DiffusionConfig:
        sweeps_prompt = self.sweep is not None and self.sweep.prompt is not None
        given = sum(value is not None for value in (self.prompt, self.prompt_column)) + sweeps_prompt
        if given != 1:
            raise ValueError("give exactly one of prompt, prompt_column or sweep.prompt")
        if self.sweep is not None and self.sweep.seed is not None and self.variants > 1:
            raise ValueError("variants must be 1 when sweep.seed gives the seeds")
        if self.sweep is not None:
            # A sweep varies only what this operator passes to its pipeline.
            accepted = ["prompt", *self.call_defaults(), "seed"]
            refused = [name for name in self.sweep.lists() if name not in accepted]
            if refused:
                raise ValueError(f"sweep.{refused[0]} is no parameter of {self.kind}; it sweeps {', '.join(accepted)}")
        if self.ip_adapter is not None and self.attention == "eager":
            raise ValueError("ip_adapter brings diffusers' IP-Adapter attention processors; use attention 'sdpa'")
        check_speed_settings(self)
        return self

    def model_references(self) -> list[ModelReference]:
        """The checkpoint and LoRA adapters this operator loads, for vetting before the job runs."""
        references = [
            ModelReference(
                "model",
                self.model,
                self.revision,
                self.variant,
                "pipeline",
                None,
                self.safety_checker,
                negative_prompt=bool(self.negative_prompt or (self.sweep and self.sweep.negative_prompt)),
            )
        ]
        references += [
            ModelReference(f"loras[{index}]", lora.model, lora.revision, None, "lora", lora.weight_name)
            for index, lora in enumerate(self.loras)
        ]
        return references + (self.ip_adapter.model_references() if self.ip_adapter else [])

    def output_libraries(self) -> tuple[str, ...]:
        """Libraries whose versions can change the generated bytes (peft applies LoRA adapters)."""
        return ("torch", "diffusers", "transformers", *(("peft",) if self.loras else ()), "numpy", "pillow")

    def call_defaults(self) -> dict:
        """Each output's generation parameters before sweeps: what the config sets for every row."""
        return {
            "negative_prompt": self.negative_prompt,
            "guidance_scale": self.guidance_scale,
            "num_inference_steps": self.num_inference_steps,
        }

    def variant_count(self) -> int:
        """Output rows per input row."""
        combinations = len(self.sweep.combinations()) if self.sweep else 1
        return combinations * self.variants

    def resolved_dtype(self) -> str:
        """The torch dtype name the weights are loaded in."""
        return resolve_dtype(self.dtype, self.resolved_device())

    def resolved_model_batch_size(self) -> int:
        """Rows per model call (see `model_batch_size`)."""
        if self.model_batch_size is not None:
            return self.model_batch_size
        return 1 if self.resolved_device() == "cpu" else self.batch_size * self.variant_count()

    def input_columns(self) -> set[str]:
        """Columns the prompt templates and `prompt_column` refer to."""
        templates = [self.prompt, self.negative_prompt, *(self.sweep.prompt or [] if self.sweep else [])]
        templates += self.sweep.negative_prompt or [] if self.sweep else []
        return (
            {name for template in templates if template for _, name, _, _ in string.Formatter().parse(template) if name}
            | ({self.prompt_column} if self.prompt_column else set())
            | (self.ip_adapter.input_columns() if self.ip_adapter else set())
        )


def resolve_dtype(dtype: str, device: str) -> str:
    """A config's dtype with 'auto' resolved: float16 on cuda, float32 on cpu."""
    if dtype != "auto":
        return dtype
    return "float16" if device == "cuda" else "float32"


# The prepare step's copy of a row's input file's AUTOMATIC1111 text (`prompt_from: png_parameters`),
# read by the model step and dropped there.
SOURCE_PARAMETERS = "_source_parameters"
_A1111_SEED = re.compile(r"(?:^|, )Seed: (\d+)(?:,|$)")


def parse_a1111_parameters(text: str) -> dict:
    """The prompt, negative prompt (None when absent) and seed (None when absent) of an AUTOMATIC1111
    `parameters` text, read as AUTOMATIC1111 reads it back (`parse_generation_parameters`): the last
    line holding `Steps: ` is the generation line, a line starting `Negative prompt: ` starts the
    negative prompt, and the lines before it are the prompt."""
    lines = text.strip().split("\n")
    generation = lines.pop() if lines and "Steps: " in lines[-1] else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    seed = _A1111_SEED.search(generation)
    return {
        "prompt": "\n".join(prompt).strip(),
        "negative_prompt": "\n".join(negative).strip() if in_negative else None,
        "seed": int(seed.group(1)) if seed else None,
    }


def source_parameters(images: list) -> list[str | None]:
    """Each input file's AUTOMATIC1111 text (`operators.images.read_parameters`), None where there is
    none or the file does not open."""
    from operators.images import read_parameters

    texts = []
    for data in images:
        try:
            texts.append(read_parameters(data) if data else None)
        except Exception:  # an image that does not open: decoding names the problem on this row
            texts.append(None)
    return texts


def variant_parameters(config: DiffusionConfig, row: dict) -> list[dict]:
    """The generation parameters of each output row made from one input row, in variant order; with
    `prompt_from: png_parameters`, the input file's own prompt, negative prompt and seed where it has
    them (seed, seed + 1, ... for `variants`, as an AUTOMATIC1111 batch)."""
    text = row.get(SOURCE_PARAMETERS) if config.prompt_from == "png_parameters" else None
    found = parse_a1111_parameters(text) if text else None
    if found is not None and not found["prompt"]:
        found = None
    base = config.call_defaults()
    if config.prompt_column is not None:
        prompt = row.get(config.prompt_column)
        if prompt is None or not str(prompt).strip():
            raise RowError(f"prompt column {config.prompt_column!r} is empty for this row")
        base["prompt"] = str(prompt)
    else:
        base["prompt"] = config.prompt
    combinations = config.sweep.combinations() if config.sweep else [{}]
    parameters = []
    for combination in combinations:
        values = {**base, **combination}
        if found is not None:  # the file's own text, taken as it is (its braces are no template)
            values.update(prompt=found["prompt"], negative_prompt=found["negative_prompt"])
            values["prompt_source"] = "png_parameters"
        else:
            values["prompt_source"] = "config"
            values["prompt"] = (
                render_template(values["prompt"], row) if config.prompt_column is None else values["prompt"]
            )
            if values["negative_prompt"]:
                values["negative_prompt"] = render_template(values["negative_prompt"], row)
        if "strength" in values and int(values["num_inference_steps"] * values["strength"]) < 1:
            raise RowError(
                f"num_inference_steps x strength gives no denoising step: {values['num_inference_steps']} x "
                f"{values['strength']}"
            )
        seed = found["seed"] if found is not None and "seed" not in combination else None
        parameters.extend(
            dict(values, **({"seed": seed + offset} if seed is not None else {})) for offset in range(config.variants)
        )
    return parameters


def render_template(template: str, row: dict) -> str:
    """Fill {column} fields of a prompt template from the row."""
    try:
        return template.format_map(row)
    except KeyError as missing:
        columns = sorted(key for key in row if key not in ("image",))
        raise RowError(f"prompt template {template!r} needs column {missing}; the row has {columns}") from None
    except (ValueError, IndexError) as error:
        raise RowError(f"prompt template {template!r} cannot be filled: {error}") from None


def set_scheduler(pipeline, name: str | None) -> None:
    """Swap in a scheduler by diffusers class name, keeping the checkpoint's scheduler config."""
    if name is not None:
        import diffusers

        pipeline.scheduler = getattr(diffusers, name).from_config(pipeline.scheduler.config)


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA adapter as loaded: how the stage column records it and how AUTOMATIC1111 names it."""

    label: str  # the stage column's form: 'style.safetensors:0.8'
    alias: str  # the name in `<lora:alias:scale>` and `Lora hashes`
    scale: float
    short_hash: str  # AUTOMATIC1111's: 12 hex digits of the sha256 of the tensor data after the header


def load_loras(pipeline, loras: list[LoraAdapter], offline: bool, storage_options: dict) -> list[LoadedLora]:
    """Load LoRA adapters (safetensors only) and activate them with their scales."""
    if not loras:
        return []
    names, scales, loaded = [], [], []
    for index, lora in enumerate(loras):
        path, weight_name = resolve_lora(lora, offline, storage_options)
        name = f"lora_{index}"
        pipeline.load_lora_weights(str(path), weight_name=weight_name, adapter_name=name, use_safetensors=True)
        names.append(name)
        scales.append(lora.scale)
        alias = lora_alias(lora.model, weight_name, [entry.alias for entry in loaded])
        loaded.append(
            LoadedLora(
                label=f"{lora.model}{'/' + lora.weight_name if lora.weight_name else ''}:{lora.scale:g}",
                alias=alias,
                scale=lora.scale,
                short_hash=lora_short_hash(Path(path) / weight_name),
            )
        )
    pipeline.set_adapters(names, adapter_weights=scales)
    return loaded


def lora_record(loras: list[LoadedLora]) -> str | None:
    """The stage column's `loras` value: each adapter's label, comma-separated; None without adapters."""
    return ",".join(lora.label for lora in loras) or None


# diffusers' default LoRA file name says nothing about the adapter; its folder or repository does.
GENERIC_LORA_STEMS = ("pytorch_lora_weights",)


def lora_alias(model: str, weight_name: str, taken: list[str]) -> str:
    """The adapter's name as AUTOMATIC1111 writes it: the weight file's stem (its folder's or
    repository's name for diffusers' generic file name), without the characters that would break
    `<lora:name:scale>` or `Lora hashes` (: , < >), made unique among the adapters before it."""
    stem = Path(weight_name).stem
    if stem in GENERIC_LORA_STEMS:
        stem = model.rstrip("/").rsplit("/", 1)[-1] or stem
        if stem.endswith(".safetensors"):
            stem = stem[: -len(".safetensors")]
    alias = "".join(char for char in stem if char not in ":,<>").strip() or "lora"
    unique, number = alias, 1
    while unique in taken:
        number += 1
        unique = f"{alias}_{number}"
    return unique


def lora_short_hash(path: Path) -> str:
    """AUTOMATIC1111's LoRA hash (the kohya-ss/additional-networks one): sha256 of a safetensors file's
    bytes after its 8-byte length and JSON header, first 12 hex digits. The header holds metadata
    that tools rewrite, so the hash names the weights alone."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header_length)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def resolve_lora(lora: LoraAdapter, offline: bool, storage_options: dict) -> tuple[Path, str | None]:
    """A local directory and weight file name for a LoRA adapter; refuses pickle weights."""
    from operators.models import ModelError, existing_local_path, is_hub_id, stage_files
    from operators.storage import is_remote

    uri = lora.model
    if is_remote(uri):
        directory = stage_files(uri, storage_options)
    elif is_hub_id(uri):
        if lora.revision is None:
            raise ModelError(f"LoRA {uri!r} is no local file or directory, so it is a Hub id; pin it with a revision")
        from huggingface_hub import snapshot_download

        directory = Path(
            snapshot_download(
                uri, revision=lora.revision, allow_patterns=["*.safetensors", "*.json"], local_files_only=offline
            )
        )
    else:
        path = existing_local_path("LoRA", uri, "file or directory")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ModelError(f"LoRA {uri} is not a .safetensors file; only safetensors weights are loaded")
            return path.parent, path.name
        directory = path
    if not directory.is_dir():
        raise ModelError(f"LoRA {uri!r} is neither a .safetensors file, a directory, an s3:// prefix nor a Hub id")
    weight_name = lora.weight_name
    if weight_name is None:
        candidates = sorted(file.name for file in directory.glob("*.safetensors"))
        if len(candidates) != 1:
            raise ModelError(
                f"LoRA {uri} holds {len(candidates)} .safetensors files ({candidates}); name one with weight_name"
            )
        weight_name = candidates[0]
    if not weight_name.endswith(".safetensors"):
        raise ModelError(f"LoRA weight_name must be a .safetensors file, got {weight_name!r}")
    return directory, weight_name


def generators(seeds: list[int], device: str):
    """One torch.Generator per row, so each output depends only on its own seed."""
    import torch

    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


def a1111_quote(value) -> str:
    """A value as AUTOMATIC1111 writes it in its infotext (`infotext_utils.quote`): JSON-quoted when it
    holds a comma, a newline or a colon, as is otherwise."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(prompt: str, negative_prompt: str | None, fields: dict) -> str:
    """The `parameters` text as AUTOMATIC1111 writes it (`processing.create_infotext`): the prompt, a
    `Negative prompt:` line when there is one, then one line of `key: value` pairs in the order given,
    each value quoted by `a1111_quote`; None values are left out. Its parser takes the last line for
    the pairs only when it holds at least three, so callers give three or more."""
    generation = ", ".join(
        key if key == value else f"{key}: {a1111_quote(value)}" for key, value in fields.items() if value is not None
    )
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{generation}".strip()


def a1111_model_hash(revision: str | None, digits: int = 10) -> str | None:
    """The `Model hash` value: AUTOMATIC1111 writes the first 10 hex digits of a checkpoint file's sha256;
    a diffusers directory has no one file, so these are the first digits of its content fingerprint
    ('sha256:...', local and S3 models). None for a Hub revision, which names a commit, not weights."""
    if revision and revision.startswith("sha256:"):
        return revision.removeprefix("sha256:")[:digits]
    return None


def with_lora_tags(prompt: str, loras: list[LoadedLora]) -> str:
    """The prompt as AUTOMATIC1111 shows it with adapters applied: one `<lora:alias:scale>` per adapter."""
    tags = "".join(f"<lora:{lora.alias}:{lora.scale}>" for lora in loras)
    return f"{prompt} {tags}" if prompt and tags else prompt + tags


def a1111_lora_hashes(loras: list[LoadedLora]) -> str | None:
    """AUTOMATIC1111's `Lora hashes` value: 'alias: hash, alias2: hash2' (quoted when written)."""
    return ", ".join(f"{lora.alias}: {lora.short_hash}" for lora in loras) or None


def group_items(items: list, key, size: int) -> list[list]:
    """Items split into model calls: same key (size and call parameters) and at most `size` each."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [group[start : start + size] for group in groups.values() for start in range(0, len(group), size)]


def load_pipeline(
    class_name: str,
    path,
    dtype: str,
    device: str,
    variant: str | None = None,
    safety_checker: bool | None = None,
    components: dict | None = None,
    speed: SpeedSettings | None = None,
):
    """The one loader of every diffusers pipeline restyle runs: `class_name` is an `AutoPipeline*` task
    (`AutoPipelineForImage2Image`, which picks SD, SDXL or a ControlNet pipeline from the checkpoint and
    `components`) or a pipeline class; `path` a local, vetted checkpoint; `components` replace or add
    pipeline components (ControlNets, adapters). `variant` picks variant weight files; `safety_checker`
    None keeps the checkpoint's own (if any), False loads without it, True refuses a checkpoint that
    has none. `speed` applies the knobs of `operators.acceleration` and places the pipeline (offload
    instead of `.to(device)` when asked); without it the pipeline is moved to `device`. Returns the
    pipeline and the knobs' record fields."""
    import diffusers
    import torch

    from operators.acceleration import apply_speed_settings
    from operators.models import ships_safety_checker

    extra = dict(components or {})
    if safety_checker is False and ships_safety_checker(Path(path), safety_checker):
        extra.update(safety_checker=None, requires_safety_checker=False)
    elif safety_checker:
        ships_safety_checker(Path(path), safety_checker)  # refuses a checkpoint without one
    pipeline = getattr(diffusers, class_name).from_pretrained(
        str(path), dtype=getattr(torch, dtype), variant=variant, use_safetensors=True, local_files_only=True, **extra
    )
    pipeline.set_progress_bar_config(disable=True)
    if speed is None:
        return pipeline.to(device), {}
    return pipeline, apply_speed_settings(pipeline, speed, device)


# Per-row fields of a diffusers generation stage column (img2img, controlnet_img2img, ...).
GENERATION_FIELDS = [
    ("model", pa.string()),
    ("model_revision", pa.string()),
    ("model_variant", pa.string()),
    # The diffusers pipeline class that ran (AutoPipeline picks it from the checkpoint).
    ("pipeline", pa.string()),
    # Whether the checkpoint's safety checker ran, and whether it flagged (and blacked out) this image.
    ("safety_checker", pa.bool_()),
    ("nsfw_content_detected", pa.bool_()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    # Where the prompt came from: 'config', or 'png_parameters' (the input file's own text).
    ("prompt_source", pa.string()),
    ("strength", pa.float64()),
    ("num_inference_steps", pa.int32()),
    ("guidance_scale", pa.float64()),
    ("scheduler", pa.string()),
    ("loras", pa.string()),
    *IP_ADAPTER_FIELDS,
    ("dtype", pa.string()),
    ("device", pa.string()),
    # Most rows per model call: batched kernels round differently per batch size.
    ("model_batch_size", pa.int32()),
    # Rows in the model call that made this row (fewer than model_batch_size when the batch had fewer
    # rows of its size and parameters, or after an out-of-memory backoff).
    ("model_call_rows", pa.int32()),
    *SPEED_FIELDS,
]


# Distinct (prompt, negative prompt) pairs whose embeddings an actor keeps.
PROMPT_CACHE_SIZE = 256


def prompt_embedding_arguments(pipeline) -> tuple[str, ...] | None:
    """The pipeline arguments its `encode_prompt`'s results go to, in that order (SD 1.x/2.x and the SD
    x4 upscaler: prompt and negative embeddings; SDXL, SD3 and the SD latent upscaler: also the pooled
    ones); None for a text encoding restyle does not know, whose pipeline then gets the prompt strings
    (Flux, whose `encode_prompt` makes no negative embeddings)."""
    import inspect

    encode = getattr(pipeline, "encode_prompt", None)
    if encode is None:
        return None
    parameters = inspect.signature(encode).parameters
    if {"pooled_prompt_embeds", "prompt_2", "do_classifier_free_guidance"} <= set(parameters):  # SDXL, SD3
        return ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    if list(parameters)[:4] == ["prompt", "device", "num_images_per_prompt", "do_classifier_free_guidance"]:
        return ("prompt_embeds", "negative_prompt_embeds")
    if list(parameters)[:4] == ["prompt", "device", "do_classifier_free_guidance", "negative_prompt"] and (
        "pooled_prompt_embeds" in parameters
    ):  # the SD latent upscaler
        return ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return None


class DiffusersModelOperator(Operator):
    """What every operator that runs a diffusers pipeline shares: torch set-up, the checkpoint resolved
    and vetted, one pipeline loaded with its scheduler and speed knobs, model calls that are timed
    (compile time apart), retried in halves on CUDA out-of-memory and turned into error rows when they
    fail, and prompts encoded once per distinct prompt.

    A subclass names its `pipeline_class`, may add `components()` and `pipeline_options()`, and calls
    `call_model(group, run)` from `process()`."""

    pipeline_class: ClassVar[str] = "AutoPipelineForImage2Image"
    # What one model call's members are, as a failed call's error names them.
    call_unit: ClassVar[str] = "rows"

    def setup(self) -> None:
        from operators.acceleration import CompileClock

        self.start_torch()
        config = self.config
        self.model = self.resolve()
        self.pipeline, self.speed = self.load()
        set_scheduler(self.pipeline, config.scheduler)
        self.scheduler_name = type(self.pipeline.scheduler).__name__
        self.pipeline_name = type(self.pipeline).__name__
        self.clock = CompileClock(config.compile, self.device)
        self.prompt_cache: dict[tuple, tuple] = {}

    def start_torch(self) -> None:
        """Ready this actor process for a diffusers model: switch the Hub client offline (before it is
        imported) when the job is offline, give torch `torch_threads` CPU threads (from config, never
        from `num_cpus`: the count changes CPU output bytes)."""
        if self.offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
        import torch

        torch.set_num_threads(self.config.torch_threads)
        self.torch_threads = torch.get_num_threads()

    def resolve(self):
        """The checkpoint, local (staged from a store, or the Hub's cache) and vetted where vetting
        before the job could not (s3:// and Hub ones): an `operators.models.ResolvedModel`."""
        from operators.models import check_pipeline_options, resolve_model

        config = self.config
        model = resolve_model(
            config.model, config.revision, self.offline, self.model_storage_options, variant=config.variant
        )
        check_pipeline_options(model.path, config.model_references()[0])
        return model

    def load(self) -> tuple:
        """The pipeline of `self.model` on the device, with the speed knobs applied, and the knobs'
        record; `components()` may read `self.model`."""
        from operators.models import quiet_loading_bars

        quiet_loading_bars()
        config = self.config
        pipeline, speed = load_pipeline(
            self.pipeline_class,
            self.model.path,
            config.resolved_dtype(),
            self.device,
            variant=config.variant,
            components=self.components(),
            speed=config,
            **self.pipeline_options(),
        )
        return pipeline, speed

    def pipeline_options(self) -> dict:
        """Further `load_pipeline` arguments (the generation operators' `safety_checker`); none by default."""
        return {}

    def components(self) -> dict:
        """Pipeline components loaded before the pipeline (ControlNets, adapters); none by default."""
        return {}

    def call_model(self, group: list, run, items: list | None = None) -> list | None:
        """`run(subgroup)` returns one output per member of `subgroup`; it runs on the whole group, in
        halves after a CUDA out-of-memory (when `oom_backoff` is on). `items` are the rows the members
        belong to (the members themselves by default; an upscale's tiles belong to their rows). Adds the
        call's `compile_seconds` and its `oom_backoffs` to each item's record. A failure makes every
        item an error row and returns None."""
        from operators.acceleration import call_with_oom_backoff

        items = group if items is None else items
        try:
            with self.clock.measure() as timing:
                outputs, halvings = call_with_oom_backoff(run, group, self.config.oom_backoff, self.stage_label)
        except Exception as error:  # one call's failure must not sink the job
            logger.warning("%s: model call failed for %d rows: %s", self.stage_label, len(items), error)
            for item in items:
                item.error = (
                    f"model call failed for a batch of {len(group)} {self.call_unit}: {type(error).__name__}: {error}"
                )
            return None
        for item in items:
            if timing.compile_seconds is not None:  # a row made by several calls took all their compiling
                item.record["compile_seconds"] = (item.record.get("compile_seconds") or 0.0) + timing.compile_seconds
            item.record["oom_backoffs"] = max(halvings, item.record.get("oom_backoffs") or 0)
            item.record["model_call_rows"] = -(-len(group) >> halvings)  # ceil(len / 2**halvings)
        return outputs

    def prompt_arguments(self, prompts: list[str], negative_prompts: list[str | None]) -> dict:
        """The prompt arguments of one model call, one prompt and negative prompt per member: embeddings
        when the pipeline's text encoding is one restyle knows (SD 1.x/2.x and the SD x4 upscaler:
        `encode_prompt` returns prompt and negative embeddings; SDXL and the SD latent upscaler: also
        pooled ones), each distinct (prompt, negative prompt) encoded once per actor and reused by every
        row, tile and call that repeats it; otherwise the prompt strings, which the pipeline encodes
        itself. Encoding one prompt at a time gives every row the embeddings a one-row call would compute."""
        import torch

        # Judged by the pipeline called: one without a known `encode_prompt` gets the prompt strings.
        names = prompt_embedding_arguments(self.pipeline)
        if names is None:
            arguments = {"prompt": prompts}
            # Only when set: some pipelines (Flux) take no negative prompt at all. An empty negative
            # prompt is what the pipelines use for none.
            if any(negative_prompts):
                arguments["negative_prompt"] = [negative or "" for negative in negative_prompts]
            return arguments
        encoded = [
            self.encode_prompt(prompt, negative) for prompt, negative in zip(prompts, negative_prompts, strict=True)
        ]
        return {name: torch.cat([row[index] for row in encoded]) for index, name in enumerate(names)}

    def encode_prompt(self, prompt: str, negative_prompt: str | None) -> tuple:
        """One prompt's embeddings (batch of one), from a small per-actor cache. Always with the
        negative embeddings: a pipeline that does not guide ignores them. The other text encoders'
        prompts (SDXL's `prompt_2`, SD3's `prompt_2` and `prompt_3`) are None: the same prompt. Only
        the arguments this pipeline's `encode_prompt` takes are passed (the latent upscaler's has no
        `num_images_per_prompt`)."""
        import inspect

        import torch

        key = (prompt, negative_prompt)
        cache = self.prompt_cache
        if key not in cache:
            if len(cache) >= PROMPT_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            parameters = inspect.signature(self.pipeline.encode_prompt).parameters
            arguments = {
                "prompt": prompt,
                "prompt_2": None,
                "prompt_3": None,
                "device": self.pipeline._execution_device,
                "num_images_per_prompt": 1,
                "do_classifier_free_guidance": True,
                "negative_prompt": negative_prompt,
            }
            accepted = {name: value for name, value in arguments.items() if name in parameters}
            with torch.no_grad():
                cache[key] = tuple(self.pipeline.encode_prompt(**accepted))
        return cache[key]

    def speed_fields(self, item) -> dict:
        """The knobs' fields of one row's record."""
        return {
            **self.speed,
            "compile_seconds": item.record.get("compile_seconds"),
            "oom_backoffs": item.record.get("oom_backoffs"),
        }


class DiffusersOperator(DiffusersModelOperator):
    """What every diffusers generation operator shares besides the pipeline (img2img, ControlNet,
    inpainting, instruct edits, T2I-Adapter): LoRAs, an optional IP-Adapter and the safety checker;
    sweeps and variants, rows grouped into model calls by size and call parameters, the AUTOMATIC1111
    text and the record.

    A subclass names its `pipeline_class`, may add `components()` (e.g. ControlNets), and supplies
    `prepare()`; its `process()` is this one or calls `call_model(group, run)` itself."""

    stage_fields = GENERATION_FIELDS
    # Parameters every row of one model call shares (besides the input size and negative prompt).
    call_parameters: ClassVar[tuple[str, ...]] = ("strength", "num_inference_steps", "guidance_scale")

    def setup(self) -> None:
        super().setup()
        config = self.config
        self.loras = load_loras(self.pipeline, config.loras, self.offline, self.model_storage_options)
        self.ip_adapter = load_ip_adapter(self)
        self.safety_checker = getattr(self.pipeline, "safety_checker", None) is not None

    def pipeline_options(self) -> dict:
        """The checkpoint's safety checker as the config asks (see `DiffusionConfig.safety_checker`)."""
        return {"safety_checker": self.config.safety_checker}

    def prepare_batch(self, batch):
        """The base prepare step, first keeping each input file's AUTOMATIC1111 text as
        `SOURCE_PARAMETERS` when `prompt_from` asks for it and the input is a file (not pixels)."""
        from operators.rows import is_pixels

        column = batch.column("image") if "image" in batch.column_names else None
        if self.config.prompt_from == "png_parameters" and column is not None and not is_pixels(column.type):
            texts = pa.array(source_parameters(column.to_pylist()), pa.string())
            batch = batch.drop_columns([SOURCE_PARAMETERS]) if SOURCE_PARAMETERS in batch.column_names else batch
            batch = batch.append_column(SOURCE_PARAMETERS, texts)
        return super().prepare_batch(batch)

    def model_batch(self, batch):
        """The base model step; the input file's AUTOMATIC1111 text is not passed on."""
        output = super().model_batch(batch)
        return output.drop_columns([SOURCE_PARAMETERS]) if SOURCE_PARAMETERS in output.column_names else output

    def prepare_extras(self, row: dict) -> dict:
        """A per-row IP-Adapter reference, decoded on the prepare step."""
        return prepare_reference(self.config.ip_adapter, row, self.max_image_pixels)

    def process(self, items: list) -> None:
        """Rows of one input size and call parameters go into model calls of up to `model_batch_size()`."""
        calls = group_items(
            items,
            key=lambda item: (
                self.input_image(item).shape,
                *(item.parameters[name] for name in self.call_parameters),
                item.parameters["negative_prompt"],
                self.ip_adapter.key(item) if self.ip_adapter else None,
            ),
            size=self.model_batch_size(),
        )
        for group in calls:
            self.generate(group)

    def input_image(self, item):
        """The prepared image of one row (the "image" entry when prepare returned several arrays)."""
        return item.input["image"] if isinstance(item.input, dict) else item.input

    def call_inputs(self, members: list) -> dict:
        """The image arguments of one model call; subclasses add theirs (control images, masks)."""
        from PIL import Image

        return {"image": [Image.fromarray(self.input_image(item)) for item in members]}

    def generate(self, group: list) -> None:
        """One pipeline call for rows that share a size and call parameters; a failure becomes error rows."""
        import numpy as np

        parameters = group[0].parameters

        def run(members: list) -> list:
            arguments = {
                **self.prompt_arguments(
                    [item.parameters["prompt"] for item in members], [parameters["negative_prompt"]] * len(members)
                ),
                **{name: parameters[name] for name in self.call_parameters},
                "generator": generators([item.seed for item in members], self.device),
                "output_type": "pil",
                **self.call_inputs(members),
                **(self.ip_adapter.call_arguments(members) if self.ip_adapter else {}),
            }
            result = self.pipeline(**arguments)
            flags = getattr(result, "nsfw_content_detected", None) if self.safety_checker else None
            flags = [bool(flag) for flag in flags] if flags is not None else [None] * len(result.images)
            return list(zip(result.images, flags, strict=True))

        outputs = self.call_model(group, run)
        for item, (output, flagged) in zip(group, outputs or [], strict=False):
            item.output = np.asarray(output.convert("RGB"))
            item.record["nsfw_content_detected"] = flagged

    def model_batch_size(self) -> int:
        """Most rows per model call."""
        return self.config.resolved_model_batch_size()

    def parameters_text(self, item) -> str:
        """The AUTOMATIC1111 `parameters` text of one output: LoRAs as `<lora:name:scale>` in the prompt
        and `Lora hashes`, as AUTOMATIC1111 writes them."""
        parameters = item.parameters
        prompt = with_lora_tags(parameters["prompt"], self.loras)
        return a1111_parameters(prompt, parameters["negative_prompt"], self.infotext_fields(item))

    def infotext_fields(self, item) -> dict:
        """The `key: value` pairs of the `parameters` text, in AUTOMATIC1111's order."""
        parameters = item.parameters
        return {
            "Steps": parameters["num_inference_steps"],
            "Sampler": SCHEDULERS.get(self.scheduler_name, self.scheduler_name),
            "CFG scale": parameters["guidance_scale"],
            "Seed": item.seed,
            "Size": f"{item.size[0]}x{item.size[1]}",
            "Model hash": a1111_model_hash(self.model.revision),
            "Model": self.config.model,
            "Denoising strength": parameters.get("strength"),
            "Lora hashes": a1111_lora_hashes(self.loras),
            **(self.ip_adapter.infotext_fields(item) if self.ip_adapter else {}),
        }

    def record(self, item) -> dict:
        parameters = item.parameters
        config = self.config
        # An error row has no parameters: it shows the config's (its prompt stays unknown).
        defaults = {name: value for name, value in config.call_defaults().items() if "prompt" not in name}
        return {
            "model": config.model,
            "model_revision": self.model.revision,
            "model_variant": config.variant,
            "pipeline": self.pipeline_name,
            "safety_checker": self.safety_checker,
            "nsfw_content_detected": item.record.get("nsfw_content_detected"),
            "prompt": parameters.get("prompt"),
            "negative_prompt": parameters.get("negative_prompt"),
            "prompt_source": parameters.get("prompt_source"),
            **{name: parameters.get(name, value) for name, value in defaults.items()},
            "scheduler": self.scheduler_name,
            "loras": lora_record(self.loras),
            **ip_adapter_record(self.ip_adapter, item),
            "dtype": config.resolved_dtype(),
            "device": self.device,
            "model_batch_size": self.model_batch_size(),
            "model_call_rows": item.record.get("model_call_rows"),
            **self.speed_fields(item),
        }
